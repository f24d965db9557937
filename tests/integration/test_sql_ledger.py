"""Durability without Redis: the SQL ledger behind a database result backend.

Real workers on RabbitMQ with ``db+postgresql://`` (psycopg2) and with
``db+mysql+pymysql://`` (MariaDB) result backends, on the filesystem broker
with a ``db+sqlite:///`` result backend (no server at all), and on RabbitMQ
with django-celery-results' ``django-db`` backend (a minimal Django settings
module, `tests.django_settings`, on PostgreSQL; Django is set up in this
process too, to send and read results).  The app names no ledger: it must
come from the result backend.  Each server test
module run has its own databases (`tests.sql_dbs`), dropped afterwards.
(Task bodies still report that they started to the harness's Redis: that is
the test's observation channel, not part of the app.)

The second half runs the workflow semantics of docs/workflows.md on each SQL
result backend (issue 19), on one worker per store that the module's
workflow tests share.  The SQL backends of Celery itself (``db+...``) have no
native chords: a chord's body is sent by Celery's ``celery.chord_unlock``,
which polls the header (``django-db`` counts the members as Redis does).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import chain, chord, group
from tests import sql_dbs

from .conftest import (
    APP_NAME,
    Keys,
    Worker,
    assert_revoked,
    spawn_worker,
    state_of,
    wait_for,
    wait_state,
)
from .test_workflows import assert_get_raises, assert_stopped, loop, si

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

STORES = ["postgresql", "mysql", "sqlite", "django"]


@pytest.fixture(name="server_dbs", scope="module")
def server_dbs_fixture() -> Iterator[dict[str, str]]:
    """A database of this module's own on PostgreSQL and on MariaDB."""
    with sql_dbs.temporary_database("postgresql") as pg, sql_dbs.temporary_database("mysql") as my:
        yield {"postgresql": pg, "mysql": my}


@pytest.fixture(name="django_db", scope="module")
def django_db_fixture() -> Iterator[str]:
    """A PostgreSQL database with django-celery-results' tables; Django set up on it here."""
    with sql_dbs.temporary_database("postgresql") as name:
        env = {
            "CANCELLABLE_TEST_DJANGO_DB": name,
            "DJANGO_SETTINGS_MODULE": "tests.django_settings",
        }
        os.environ.update(env)
        try:
            import django
            from django.core.management import call_command

            django.setup()
            call_command("migrate", "django_celery_results", verbosity=0)
        finally:
            for key in env:
                os.environ.pop(key, None)
        yield name
        from django.db import connections

        connections.close_all()


@pytest.fixture(name="deployment")
def deployment_fixture(
    request: pytest.FixtureRequest, server_dbs: dict[str, str], tmp_path: Path
) -> dict[str, Any]:
    """``make_worker`` keyword arguments for the store under test, plus its ``db_url``."""
    return deployment_of(request, request.param, server_dbs, tmp_path)


def deployment_of(
    request: pytest.FixtureRequest, store: str, server_dbs: dict[str, str], folder: Path
) -> dict[str, Any]:
    """``make_worker`` keyword arguments for ``store``, plus its ``db_url``.

    ``folder``: where the filesystem broker and the SQLite database of the
    ``sqlite`` store live.
    """
    if store == "django":
        database = request.getfixturevalue("django_db")
        return {
            "broker": "rabbitmq",
            "backend_url": "django-db",
            "extra_env": {
                "DJANGO_SETTINGS_MODULE": "tests.django_settings",
                "CANCELLABLE_TEST_DJANGO_DB": database,
            },
            "db_url": sql_dbs.url("postgresql", database),
        }
    if store == "sqlite":
        for sub in ("queue", "control"):
            (folder / sub).mkdir()
        db_url = f"sqlite:///{folder / 'results.db'}"
        return {
            "broker": "filesystem",
            "broker_url": "filesystem://",
            "backend_url": f"db+{db_url}",
            "settings": {
                # kombu's own filesystem transport writes a message file in
                # place, and a worker that polls in between reads it empty
                # ("Unrecoverable error: JSONDecodeError", kombu #1551; two
                # whole CI runs lost this case to it): the demo's transport
                # writes each file whole, then renames it into place.
                "broker_transport": "cancellable._demo:_AtomicFilesystemTransport",
                "broker_transport_options": {
                    "data_folder_in": str(folder / "queue"),
                    "data_folder_out": str(folder / "queue"),
                    "control_folder": str(folder / "control"),
                    "polling_interval": 0.05,
                },
            },
            "db_url": db_url,
        }
    driver = "psycopg2" if store == "postgresql" else "pymysql"
    db_url = sql_dbs.url(store, server_dbs[store], driver=driver)
    return {"broker": "rabbitmq", "backend_url": f"db+{db_url}", "db_url": db_url}


def ledger_rows_naming(db_url: str, task_id: str) -> int:
    """How many rows of the app's SQL ledger name ``task_id``."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT targets FROM cancellable_ledger WHERE name = :n"), {"n": APP_NAME}
            ).all()
    finally:
        engine.dispose()
    return sum(f"task:{task_id}" in targets.split("\n") for (targets,) in rows)


def make(make_worker: Any, deployment: dict[str, Any], **kwargs: Any) -> Worker:
    """A worker of the deployment (not started)."""
    options = {k: v for k, v in deployment.items() if k != "db_url"}
    return make_worker(start=False, **options, **kwargs)


def wait_queued(worker: Worker, count: int) -> None:
    """On RabbitMQ, wait until ``count`` messages wait in the worker's queue."""
    if worker.broker == "rabbitmq":
        wait_for(lambda: worker.queue_length() == count, 10, message=f"{count} queued tasks")


def cancel_quietly(task_id: str, reason: str, worker: Worker) -> None:
    """`cancel` and assert it raised no warning (a not-durable or ledger warning)."""
    from cancellable.celery import cancel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cancel(task_id, reason=reason, app=worker.app)

    assert [] == [str(w.message) for w in caught]


def assert_no_ledger_trouble(worker: Worker) -> None:
    """The worker's log has no not-durable or ledger-unavailable event."""
    log = worker.log_path.read_text(errors="replace")
    for event in ("ledger.not_durable", "ledger.unavailable", "ledger.poll_failed"):
        assert event not in log, f"{event} in {worker.name}'s log\n{worker.tail()}"


@pytest.mark.parametrize("deployment", STORES, indirect=True)
def test_cancelled_while_no_worker_is_online_never_runs(
    make_worker: Any, keys: Keys, deployment: dict[str, Any]
) -> None:
    """A task sent and cancelled (with a reason) while no worker is online: the
    worker that starts later never runs it, and it ends REVOKED with the reason.
    A second, uncancelled task in the same queue proves the worker consumed it;
    the cancellation is a row of the SQL ledger, and nobody warned."""
    worker = make(make_worker, deployment)
    cancelled = worker.send("cit.loop", keys.key("cancelled"), 1.0)
    control = worker.send("cit.loop", keys.key("control"), 1.0)
    wait_queued(worker, 2)

    cancel_quietly(cancelled.id, "cancelled while offline", worker)
    rows = ledger_rows_naming(deployment["db_url"], cancelled.id)
    worker.start()

    assert 1 == rows
    assert "done" == control.get(timeout=40)
    assert_revoked(cancelled, "cancelled while offline", timeout=30)
    assert [] == keys.started("cancelled"), "the cancelled task ran"
    assert_no_ledger_trouble(worker)


@pytest.mark.parametrize("deployment", STORES, indirect=True)
def test_cancelled_between_worker_restarts_never_runs(
    make_worker: Any, keys: Keys, deployment: dict[str, Any]
) -> None:
    """A worker runs a task and stops; a task is sent and cancelled while it is
    down; a new worker on the same queue starts: the cancelled task never runs
    and ends REVOKED with the reason, while the task sent beside it runs."""
    first = make(make_worker, deployment)
    first.start()
    assert "done" == first.send("cit.loop", keys.key("before"), 0.1).get(timeout=40)
    first.stop()

    cancelled = first.send("cit.loop", keys.key("cancelled"), 1.0)
    control = first.send("cit.loop", keys.key("control"), 1.0)
    wait_queued(first, 2)
    cancel_quietly(cancelled.id, "cancelled between restarts", first)
    second = make(make_worker, deployment, queue=first.queue)
    second.start()

    assert "done" == control.get(timeout=40)
    assert_revoked(cancelled, "cancelled between restarts", timeout=30)
    assert "REVOKED" == wait_state(cancelled, "REVOKED", 1)
    assert [] == keys.started("cancelled"), "the cancelled task ran"
    assert_no_ledger_trouble(first)
    assert_no_ledger_trouble(second)


def test_a_missing_driver_is_one_clear_message_at_worker_start_and_at_cancel(
    make_worker: Any,
) -> None:
    """``cancellable_ledger_url = "mysql://..."`` names mysqlclient, which is not
    installed: the worker does not start, and its log names the setting and the
    package; ``cancel()`` raises SettingError with the same message."""
    from cancellable.celery import SettingError, cancel

    url = "mysql://root@127.0.0.1:3306/none"
    worker = make_worker(start=False, broker="rabbitmq", settings={"cancellable_ledger_url": url})

    with pytest.raises(RuntimeError, match="exited"):
        worker.start()
    with pytest.raises(SettingError, match="cancellable_ledger_url") as caught:
        cancel("some-task-id", reason="r", app=worker.app)

    log = worker.log_path.read_text(errors="replace")
    assert "cancellable_ledger_url" in log
    assert "mysqlclient" in log
    assert "mysqlclient" in str(caught.value)


# --------------------------------------------------------------------------
# Workflows (docs/workflows.md) on every SQL result backend (issue 19).
#
# One representative of each semantic per store: a chain, a chord, a group
# nested in a chain (a chord Celery makes, whose chord_unlock a worker
# sends), a workflow cancelled by a later member's bare id, a fail-fast
# member of a chord, and a workflow cancelled while no worker is online.


@dataclasses.dataclass
class FlowWorker:
    """A store's shared worker, and where its log stood when the test began."""

    store: str
    worker: Worker
    log_offset: int

    def log(self) -> str:
        """What the worker logged during this test."""
        with self.worker.log_path.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")


class StoreWorker:
    """The started worker of one store (prefork, ``-c 2``), replaced if it stops answering."""

    def __init__(
        self,
        request: pytest.FixtureRequest,
        store: str,
        log_dir: Path,
        server_dbs: dict[str, str],
        folders: pytest.TempPathFactory,
    ) -> None:
        self.request = request
        self.store = store
        self.log_dir = log_dir
        self.server_dbs = server_dbs
        self.folders = folders
        self.worker: Worker | None = None

    def get(self) -> Worker:
        if self.worker is not None and not self.worker.healthy():
            self.close()
        if self.worker is None:
            folder = self.folders.mktemp(f"flows-{self.store}")
            options = deployment_of(self.request, self.store, self.server_dbs, folder)
            options.pop("db_url")
            self.worker = spawn_worker(self.log_dir, **options)
            self.worker.start()
        return self.worker

    def close(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop()
            worker.app.close()


@pytest.fixture(name="store_worker", scope="module", params=STORES)
def store_worker_fixture(
    request: pytest.FixtureRequest,
    worker_logs: Path,
    server_dbs: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StoreWorker]:
    """One store's worker, shared by the workflow tests (pytest runs them store by store)."""
    shared = StoreWorker(request, request.param, worker_logs, server_dbs, tmp_path_factory)
    yield shared
    shared.close()


def settled(worker: Worker) -> bool:
    """Nothing active, reserved or scheduled (a chord_unlock retry), nothing queued."""
    try:
        replies = worker.inspect().scheduled() or {}
        if any(replies.values()) or worker.active_ids() or worker.reserved_ids():
            return False
        return worker.broker != "rabbitmq" or worker.queue_length() == 0
    except Exception:
        return False


@pytest.fixture(name="flow")
def flow_fixture(request: pytest.FixtureRequest, store_worker: StoreWorker) -> Iterator[FlowWorker]:
    """The store's shared worker; after the test it must settle, or it is replaced."""
    worker = store_worker.get()
    request.node.__dict__.setdefault("cit_workers", []).append(worker)
    yield FlowWorker(store_worker.store, worker, worker.log_path.stat().st_size)
    try:
        wait_for(lambda: settled(worker), 30, interval=0.2, message=f"{worker.name} to settle")
    except AssertionError:
        store_worker.close()


def assert_no_chord_error(flow: FlowWorker) -> None:
    """The worker logged no ChordError (Celery's "Chord ... raised") during the test."""
    log = flow.log()
    assert "ChordError" not in log, f"a ChordError in {flow.worker.name}'s log\n{log[-3000:]}"
    assert "Chord '" not in log, f"Celery's chord join failed in the log\n{log[-3000:]}"


def wait_chord_join_ended(flow: FlowWorker) -> None:
    """A polling join (chord_unlock) logged that it ended for a cancelled chord (``db+``
    stores); django-db joins natively, so there we wait past a poll interval instead."""
    if flow.store == "django":
        time.sleep(1.5)
        return
    wait_for(lambda: "chord.cancelled" in flow.log(), 15, message="chord.cancelled in the log")


def test_sql_chain_cancelled_while_its_first_link_runs(flow: FlowWorker, keys: Keys) -> None:
    """A chain of three links, cancelled with workflow=True while the first runs:
    the first stops at a checkpoint, the others never run, all three end REVOKED
    with the reason, and ``get()`` of the chain raises it."""
    from cancellable.celery import cancel

    worker = flow.worker
    result = chain(loop(worker, keys, "a"), loop(worker, keys, "b"), loop(worker, keys, "c"))()
    wait_for(lambda: keys.flag("a", "looping"), 20, message="the first link to loop")

    cancel(result, reason="user closed the report", workflow=True)

    for link in (result.parent.parent, result.parent, result):
        assert_revoked(link, "user closed the report")
    assert_stopped(keys, "a")
    assert_get_raises(result, "user closed the report")
    time.sleep(1.0)  # nothing is sent later either
    assert [] == keys.started("b") + keys.started("c")


def test_sql_chord_cancelled_while_its_header_runs(flow: FlowWorker, keys: Keys) -> None:
    """A chord of four header tasks plus a body (``-c 2``: two run, two wait),
    cancelled with workflow=True: the body never runs and stays REVOKED with the
    reason (not FAILURE with a ChordError, issue 19), every header member ends
    REVOKED, ``get()`` raises promptly, the polling join ends quietly
    (``chord.cancelled``) and nothing is logged at ERROR."""
    from cancellable.celery import cancel

    worker = flow.worker
    header = [loop(worker, keys, f"h{i}") for i in range(4)]
    result = chord(header, loop(worker, keys, "body", 1.0)).apply_async()
    members = list(result.parent.results)
    wait_for(lambda: len([i for i in range(4) if keys.flag(f"h{i}", "looping")]) == 2, 20,
             message="two header members to loop")  # fmt: skip
    running = [i for i in range(4) if keys.flag(f"h{i}", "looping")]

    cancel(result, reason="chord no longer needed", workflow=True)

    assert assert_get_raises(result, "chord no longer needed") < 15.0
    for member in members:
        assert_revoked(member, "chord no longer needed")
    for i in running:
        assert_stopped(keys, f"h{i}")
    wait_chord_join_ended(flow)
    assert_revoked(result, "chord no longer needed")
    assert [] == keys.started("body")
    assert 2 == sum(keys.runs(f"h{i}") for i in range(4)), "a waiting header member ran"
    assert_no_chord_error(flow)
    assert "ERROR/" not in flow.log()


def test_sql_chord_not_cancelled_runs_its_body(flow: FlowWorker, keys: Keys) -> None:
    """A chord nobody cancels is joined as before: the body runs once after the
    header and ``get()`` returns its result (the wrapped chord_unlock stays out
    of the way)."""
    worker = flow.worker
    header = [loop(worker, keys, f"h{i}", 0.1) for i in range(2)]
    result = chord(header, loop(worker, keys, "body", 0.1)).apply_async()

    assert "done" == result.get(timeout=30)
    assert 1 == keys.runs("body")
    assert "chord.cancelled" not in flow.log()


def test_sql_group_nested_in_a_chain(flow: FlowWorker, keys: Keys) -> None:
    """chain(a, group(b1, b2), c), cancelled while the group runs (Celery makes
    a chord of the group and ``c``, applied by the worker that ran ``a``): ``a``
    stays SUCCESS, b1 and b2 stop, c never runs, all REVOKED with the reason,
    and no ChordError."""
    from cancellable.celery import cancel

    worker = flow.worker
    canvas = chain(
        loop(worker, keys, "a", 0.1),
        group(loop(worker, keys, "b1"), loop(worker, keys, "b2")),
        loop(worker, keys, "c", 0.1),
    )
    result = canvas.apply_async()
    first = result.parent.parent
    wait_for(lambda: keys.flag("b1", "looping") and keys.flag("b2", "looping"), 20,
             message="both group members to loop")  # fmt: skip

    cancel(result, reason="nested stop", workflow=True)

    for member in result.parent.results:
        assert_revoked(member, "nested stop")
    for name in ("b1", "b2"):
        assert_stopped(keys, name)
    assert_get_raises(result, "nested stop")
    assert "SUCCESS" == state_of(first)
    time.sleep(2.0)  # past a chord_unlock poll
    assert_revoked(result, "nested stop")
    assert [] == keys.started("c")
    assert_no_chord_error(flow)


def test_sql_cancel_by_a_later_members_id(flow: FlowWorker, keys: Keys) -> None:
    """cancel(<id of the chain's second link>, workflow=True), a bare id, while
    the first link runs: the worker finds the link that would send it, stops it,
    and marks the unsent links REVOKED."""
    from cancellable.celery import cancel

    worker = flow.worker
    result = chain(loop(worker, keys, "a"), loop(worker, keys, "b"), loop(worker, keys, "c"))()
    wait_for(lambda: keys.flag("a", "looping"), 20, message="the first link to loop")

    cancel(result.parent.id, reason="by member id", workflow=True, app=worker.app)

    for link in (result.parent.parent, result.parent, result):
        assert_revoked(link, "by member id")
    assert_stopped(keys, "a")
    time.sleep(1.0)
    assert [] == keys.started("b") + keys.started("c")


def test_sql_fail_fast_member_of_a_chord(flow: FlowWorker, keys: Keys) -> None:
    """A chord whose header has a ``cancel_siblings_on_failure`` member that fails:
    the siblings end REVOKED naming it, the failed member stays FAILURE, and the
    body is REVOKED with the same reason, never run, with no ChordError."""
    worker = flow.worker
    members = [si(worker, "cit.fail_fast", keys.key("f"), 1.0)]
    members += [loop(worker, keys, f"s{i}") for i in range(3)]
    result = chord(members, loop(worker, keys, "body", 0.1)).apply_async()
    failing, *siblings = result.parent.results

    assert "FAILURE" == wait_state(failing, ("SUCCESS", "FAILURE", "REVOKED"), 30)
    for sibling in siblings:
        assert_revoked(sibling, f"group member {failing.id} failed")
    assert_revoked(result, f"group member {failing.id} failed")
    wait_chord_join_ended(flow)
    assert_revoked(result, f"group member {failing.id} failed")
    assert [] == keys.started("body")
    assert_no_chord_error(flow)


@pytest.mark.parametrize("deployment", STORES, indirect=True)
def test_sql_workflow_cancelled_while_no_worker_is_online(
    make_worker: Any, keys: Keys, deployment: dict[str, Any]
) -> None:
    """A chain and a chord sent and cancelled (workflow=True) while no worker
    runs: the worker started later reads the targets from the SQL ledger, runs
    none of them, and every task ends REVOKED with the reason."""
    from cancellable.celery import cancel

    worker = make(make_worker, deployment)
    chained = chain(loop(worker, keys, "a"), loop(worker, keys, "b"), loop(worker, keys, "c"))()
    chorded = chord([loop(worker, keys, f"h{i}") for i in range(3)], loop(worker, keys, "body"))()
    control = si(worker, "cit.loop", keys.key("control"), 0.05).apply_async()

    cancel([chained, chorded], reason="cancelled while offline", workflow=True, app=worker.app)
    worker.start()

    assert "done" == control.get(timeout=60)
    for link in (chained.parent.parent, chained.parent, chained):
        assert_revoked(link, "cancelled while offline")
    for member in chorded.parent.results:
        assert_revoked(member, "cancelled while offline")
    assert_revoked(chorded, "cancelled while offline")
    names = ["a", "b", "c", "body", *(f"h{i}" for i in range(3))]
    assert [] == [name for name in names if keys.started(name)]
    time.sleep(1.5)  # past a chord_unlock poll
    assert_revoked(chorded, "cancelled while offline")
    log = worker.log_path.read_text(errors="replace")
    assert "ChordError" not in log
