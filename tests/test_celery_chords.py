"""The polling chord join (``celery.chord_unlock``) with the worker's wrapper.

Celery's builtin task is run eagerly (``task.apply``) against a real
``db+sqlite://`` result backend, one database per test module, with the
header's states stored first; the broker is ``memory://`` (a body that is
sent lands there, and nothing else reads it).  Running workers on the SQL
backends are exercised in ``tests/integration/test_sql_ledger.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain
from celery.exceptions import ChordError, Retry, TaskRevokedError
from celery.result import AsyncResult

from cancellable.celery import _celery_internals as internals
from cancellable.celery import _chords


@pytest.fixture(name="results_db", scope="module")
def results_db_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One database for the module (Celery 5.3 prepares the tables of the first one only).
    return tmp_path_factory.mktemp("chords") / "results.db"


@pytest.fixture(name="app")
def app_fixture(results_db: Path) -> Iterator[Celery]:
    """An app with a SQLite result backend and its ``celery.chord_unlock`` wrapped."""
    app = Celery(
        f"chords-{uuid.uuid4().hex[:8]}", broker="memory://", backend=f"db+sqlite:///{results_db}"
    )
    app.conf.cancellable_ledger_url = "none"

    @app.task(name="chords.body", shared=False)
    def body(results: Any) -> Any:
        return results

    _chords.install(app)
    yield app
    app.close()


def header(app: Celery, states: list[str]) -> list[Any]:
    """Result tuples of a header whose members have the given stored states."""
    results = []
    for state in states:
        task_id = str(uuid.uuid4())
        if state == "SUCCESS":
            app.backend.store_result(task_id, 1, state)
        elif state == "FAILURE":
            app.backend.store_result(task_id, ValueError("boom"), state)
        elif state == "REVOKED":
            app.backend.store_result(task_id, TaskRevokedError("revoked by ops: stop"), state)
        results.append(AsyncResult(task_id, app=app).as_tuple())
    return results


def unlock(app: Celery, body: Any, states: list[str]) -> Any:
    """Run the wrapped ``celery.chord_unlock`` once, eagerly, for ``body``."""
    task = app.tasks[internals.CHORD_UNLOCK]
    return task.apply(args=(str(uuid.uuid4()), dict(body)), kwargs={"result": header(app, states)})


def meta(app: Celery, task_id: str) -> tuple[str, str]:
    found = app.backend.get_task_meta(task_id, cache=False)
    return str(found["status"]), str(found["result"])


def test_install_is_idempotent(app: Celery) -> None:
    """The wrapper is installed once per app (a second install is refused)."""
    assert not _chords.install(app)


def test_a_revoked_body_of_several_tasks_is_revoked_whole(app: Celery) -> None:
    """The chord's body is a chain whose first task is stored REVOKED: the join
    ends without sending or failing it, and the chain's other tasks (never sent)
    are stored REVOKED with the same message, as a worker would for a discarded
    first link."""
    body = chain(app.signature("chords.body"), app.signature("chords.body", immutable=True))
    body.freeze()
    ids = [task["options"]["task_id"] for task in body.tasks]
    app.backend.store_result(ids[0], TaskRevokedError("revoked by ops: stop"), "REVOKED")

    unlock(app, body, ["SUCCESS", "REVOKED"])

    assert [("REVOKED", "revoked by ops: stop")] * 2 == [meta(app, i) for i in ids]


def test_a_chord_that_was_not_cancelled_is_joined_by_celery(app: Celery) -> None:
    """No REVOKED body: Celery's own join runs unchanged. A header that
    succeeded sends the body (it stays PENDING here: nobody consumes), and a
    header with a failed member fails the body with a ChordError."""
    sent = app.signature("chords.body")
    sent.freeze()
    failed = app.signature("chords.body")
    failed.freeze()

    unlock(app, sent, ["SUCCESS", "SUCCESS"])
    unlock(app, failed, ["SUCCESS", "FAILURE"])

    assert "PENDING" == meta(app, sent.id)[0]
    found = app.backend.get_task_meta(failed.id, cache=False)
    assert "FAILURE" == found["status"]
    assert isinstance(found["result"], ChordError)


def test_a_header_not_ready_is_polled_again(app: Celery) -> None:
    """No REVOKED body and a header still running: the join asks for a retry,
    as Celery does (called directly, ``self.retry`` raises ``Retry``; an eager
    retry would re-run it at once, for ever), and the body is untouched."""
    task = app.tasks[internals.CHORD_UNLOCK]
    body = app.signature("chords.body")
    body.freeze()

    with pytest.raises(Retry):
        task.run(str(uuid.uuid4()), dict(body), result=header(app, ["SUCCESS", "PENDING"]))

    assert "PENDING" == meta(app, body.id)[0]
