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
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests import sql_dbs

from .conftest import APP_NAME, Keys, Worker, assert_revoked, wait_for, wait_state

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
    store = request.param
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
        for folder in ("queue", "control"):
            (tmp_path / folder).mkdir()
        db_url = f"sqlite:///{tmp_path / 'results.db'}"
        return {
            "broker": "filesystem",
            "broker_url": "filesystem://",
            "backend_url": f"db+{db_url}",
            "settings": {
                "broker_transport_options": {
                    "data_folder_in": str(tmp_path / "queue"),
                    "data_folder_out": str(tmp_path / "queue"),
                    "control_folder": str(tmp_path / "control"),
                    "polling_interval": 0.05,
                }
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
