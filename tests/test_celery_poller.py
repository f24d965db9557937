"""The worker's poller (`cancellable.celery._poller`): reading the ledger into the
index and delivering what it gained, and its thread's lifecycle in real
embedded workers (``celery.contrib.testing.worker.start_worker``).
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from structlog.testing import capture_logs
from tests.celery_runtime import running_worker
from tests.celery_worker import (  # noqa: F401 - fixtures, found by pytest by name
    REDIS_URL,
    Messages,
    app_fixture,
    box_fixture,
    clean_worker_state,
    ledger_entries,
    make_app,
    messages_fixture,
    revoke,
    rt_fixture,
    running,
)

import cancellable.celery  # noqa: F401 - activates the integration (patches at worker start)
from cancellable import CancelReason
from cancellable.celery._mailbox import Mailbox
from cancellable.celery._poller import WARN_EVERY, Poller
from cancellable.celery._revokes import (
    deliver_targets,
)
from cancellable.celery._runtime import WorkerRuntime, runtime


class TestLedgerPoll:
    """The poller's read of the ledger (`_Poller.sync`) and `deliver_targets`."""

    def test_sync_indexes_and_delivers_once(self, rt: WorkerRuntime, app: Celery) -> None:
        """A cancellation recorded elsewhere is indexed and delivered once."""
        task_id, queued = str(uuid.uuid4()), str(uuid.uuid4())
        runtime().ledgers.get(app).record(
            [("task", task_id), ("task", queued)], CancelReason(message="late")
        )
        poller = Poller(rt)
        with running(rt, task_id) as entry, capture_logs() as logs:
            poller.sync()
            poller.sync()

        assert entry.revoked()
        assert "late" == entry.scope.cancel_reason.message  # type: ignore[union-attr]
        assert 1 == [e["event"] for e in logs].count("cancel.delivered")
        assert "late" == rt.index.match(queued).message  # type: ignore[union-attr]

    def test_sync_with_the_ledger_down_logs(self, rdb: redis.Redis) -> None:
        """An unreachable ledger is logged; the cursor is kept."""
        app = make_app(cancellable_ledger_url="redis://127.0.0.1:1/0")
        with running_worker(app) as rt:
            rt.index.cursor = "5-0"

            with capture_logs() as logs:
                Poller(rt).sync()

        assert ["ledger.unavailable"] == [e["event"] for e in logs]
        assert "5-0" == rt.index.cursor
        app.close()

    def test_a_ledger_that_stays_down_is_not_logged_every_poll(self, rdb: redis.Redis) -> None:
        """While the ledger stays unreachable, one warning a minute (with how many
        reads failed since the last one), not one per poll interval."""
        app = make_app(cancellable_ledger_url="redis://127.0.0.1:1/0")
        with running_worker(app) as rt:
            poller = Poller(rt)
            with capture_logs() as logs:
                for _ in range(5):
                    poller.sync()
                assert poller.warned_at is not None
                poller.warned_at -= WARN_EVERY  # a minute later
                poller.sync()

        warnings = [e for e in logs if e["event"] == "ledger.unavailable"]
        assert [1, 5] == [e["failures"] for e in warnings]
        app.close()

    def test_a_group_target_from_the_ledger_keeps_its_grace(
        self, rt: WorkerRuntime, app: Celery
    ) -> None:
        """``cancel(group, grace=7)`` read from the ledger: the group's task is laddered at 7 s.

        (A worker that missed the broadcast, or a busy solo worker, must honour
        the grace the call gave, not fall back to the task's or the app's.)
        """
        group = str(uuid.uuid4())
        runtime().ledgers.get(app).record([("group", group)], CancelReason(message="late"), 7.0)
        with running(rt, "in-group", group=group) as entry:
            Poller(rt).sync()
            rung = rt.ladder.rungs().get("in-group")

        assert entry.scope.cancel_called
        assert rung is not None
        assert 7.0 == rung.grace

    def test_a_group_target_reaches_a_held_request(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages
    ) -> None:
        """A group target is delivered to the held request of that group, and only it."""
        group = str(uuid.uuid4())
        member, other = messages.held(group_id=group), messages.held()
        added = rt.index.add([("group", group)], CancelReason(message="group"))

        delivered = deliver_targets(rt, added)

        assert 1 == delivered
        assert [member.id] == list(rt.delivery.forwarding())
        assert other.id not in box.find({other.id})

    def test_a_group_target_reaches_a_task_running_here(self, rt: WorkerRuntime) -> None:
        """A group target cancels a @cancellable task of that group running in this
        process (threads pool), found through the registry."""
        group = str(uuid.uuid4())
        added = rt.index.add([("group", group)], CancelReason(message="group"))
        with running(rt, "in-group", group=group) as entry, running(rt, "not-in-group") as other:
            delivered = deliver_targets(rt, added)

        assert 1 == delivered
        assert entry.scope.cancel_called
        assert not other.scope.cancel_called


def pollers() -> list[threading.Thread]:
    """Poller threads alive in this process."""
    return [t for t in threading.enumerate() if t.name == "cancellable-poller" and t.is_alive()]


def count_calls(calls: list[float], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, recording when each call was made."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return function(*args, **kwargs)

    return wrapper


class TestPollerLifecycle:
    """One poller per running worker, gone when the worker is."""

    def test_a_poller_stops_and_reads_no_more(
        self, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A started poller reads the ledger every interval; after stop() its thread
        has ended and it reads nothing more."""
        app = make_app(cancellable_poll_interval=0.1)
        ledger = runtime().ledgers.get(app)
        reads: list[float] = []
        monkeypatch.setattr(ledger, "read", count_calls(reads, ledger.read))
        poller = Poller(WorkerRuntime(app))

        poller.start()
        time.sleep(0.5)
        poller.stop()
        at_stop = len(reads)
        time.sleep(0.4)

        assert at_stop >= 2
        assert not poller.thread.is_alive()
        assert at_stop == len(reads)
        app.close()

    def test_twenty_embedded_workers_leave_no_poller(
        self, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """start_worker() 20 times in a row: afterwards no poller thread is alive and
        no ledger read happens after the last worker stopped."""
        app = Celery(f"ws-life-{uuid.uuid4().hex[:8]}", broker=REDIS_URL, backend="cache+memory://")
        app.conf.cancellable_ledger_url = REDIS_URL
        app.conf.cancellable_poll_interval = 0.1
        app.conf.broker_connection_retry_on_startup = True
        ledger = runtime().ledgers.get(app)
        reads: list[float] = []
        monkeypatch.setattr(ledger, "read", count_calls(reads, ledger.read))
        # A worker's first read is paged (TargetIndex.load).
        monkeypatch.setattr(ledger, "read_pages", count_calls(reads, ledger.read_pages))
        alive_during: list[int] = []
        try:
            for _ in range(20):
                with start_worker(app, pool="threads", perform_ping_check=False):
                    alive_during.append(len(pollers()))
            stopped_at = time.monotonic()
            time.sleep(0.5)
            left = [t.name for t in pollers()]
            late_reads = len([t for t in reads if t > stopped_at])
        finally:
            app.close()

        assert [1] * 20 == alive_during
        assert runtime().worker is None
        assert len(reads) >= 20
        assert {"pollers alive": [], "reads after the last stop": 0} == {
            "pollers alive": left,
            "reads after the last stop": late_reads,
        }
