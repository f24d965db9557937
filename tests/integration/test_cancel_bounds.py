"""`cancel()` on real workers: a lost broadcast, a later shorter grace (issue 18, 1 and 11).

* Point 1: a worker whose broker is a private ``redis-server`` that the test
  ``SIGSTOP`` s right after ``cancel()`` recorded the cancellation (between
  the broker check and the broadcast).  ``cancel()`` returns within its
  bound with a `BroadcastFailedWarning`, and the worker still stops the task
  from the ledger (which lives with the results on the harness's Redis).
* Point 11: ``cancel(grace=60)`` then ``cancel(grace=0)`` of a task that
  blocks in ``time.sleep``: the second, shorter grace wins.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.test_celery_cancel_bounds import StoppableRedis

import cancellable.celery as cc
from cancellable.celery._runtime import runtime

from . import conftest
from .conftest import Keys, Worker, assert_revoked, task_meta, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: What the shared 2-CPU machine's load may add to a bound (seconds).
SLACK = 1.5


@pytest.fixture(name="private_broker")
def private_broker_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[StoppableRedis]:
    """A private redis-server, known to the harness as the broker ``"private"``.

    Ask for it before ``make_worker``: the server must outlive the worker.
    """
    server = StoppableRedis()
    monkeypatch.setitem(conftest.BROKERS, "private", server.url)
    yield server
    server.kill()


def start_loop(worker: Worker, keys: Keys, name: str, task: str = "cit.loop") -> Any:
    """Send ``task`` and wait until its body runs."""
    result = worker.send(task, keys.key(name))
    wait_for(
        lambda: keys.flag(name, "looping"),
        20,
        message=lambda: f"{task} to start ({task_meta(result)['status']})",
    )
    return result


def test_a_broadcast_lost_to_a_stopped_broker_still_stops_the_task(
    private_broker: StoppableRedis, make_worker: Callable[..., Worker], keys: Keys
) -> None:
    """The broker stops between ``cancel()``'s check and its broadcast: the call
    returns within its 6 s bound with a `BroadcastFailedWarning` (on main the
    publish retried for ever), and the prefork worker, whose broker is still
    stopped, stops the running task from the ledger at its next poll (0.5 s):
    REVOKED with the reason, hook run."""
    worker = make_worker(broker="private", pool="prefork")
    result = start_loop(worker, keys, "lost")
    ledger = runtime().ledgers.get(worker.app)
    original = ledger.record

    def record(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        private_broker.pause()  # the broker stops right after the ledger write

    ledger.record = record  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.monotonic()
            cc.cancel(result, "the broadcast is lost", app=worker.app)
            returned_in = time.monotonic() - began
        assert_revoked(result, "the broadcast is lost", timeout=20)
    finally:
        ledger.record = original  # type: ignore[method-assign]
        private_broker.resume()

    assert [cc.BroadcastFailedWarning] == [w.category for w in caught]
    assert returned_in < 6.0 + SLACK, returned_in
    assert ["cleanup"] == keys.hooks("lost")
    assert keys.flag("lost", "done") is None


def test_a_later_shorter_grace_wins(shared_worker: Callable[..., Worker], keys: Keys) -> None:
    """Issue 18, point 11: ``cancel(grace=60)`` of a task blocked in
    ``time.sleep(3600)``, then ``cancel(grace=0)``: the task is interrupted at
    once (REVOKED "interrupted", hook run), not after 60 s.  On main the second
    call was ignored and the task ran on."""
    worker = shared_worker(pool="prefork")
    result = start_loop(worker, keys, "graced", task="cit.ladder.sleep")

    cc.cancel(result, "take your time", grace=60, app=worker.app)
    worker.barrier()
    time.sleep(0.5)
    assert keys.flag("graced", "exc") is None  # the 60 s grace is running
    assert "PENDING" == task_meta(result)["status"]

    began = time.monotonic()
    cc.cancel(result, "now", grace=0, app=worker.app)
    assert_revoked(result, "interrupted", timeout=15)
    stopped_in = time.monotonic() - began

    assert stopped_in < 2.0 + SLACK, stopped_in
    assert ["cleanup"] == keys.hooks("graced")
    assert "Cancelled" == keys.flag("graced", "exc")


def test_a_later_longer_grace_does_not_extend(
    shared_worker: Callable[..., Worker], keys: Keys
) -> None:
    """``cancel(grace=1)`` then, at once, ``cancel(grace=60)``: the first, shorter
    deadline still holds (interrupted after about 1 s)."""
    worker = shared_worker(pool="prefork")
    result = start_loop(worker, keys, "kept", task="cit.ladder.sleep")

    began = time.monotonic()
    cc.cancel(result, "one second", grace=1, app=worker.app)
    cc.cancel(result, "an hour", grace=60, app=worker.app)
    assert_revoked(result, "interrupted", timeout=15)
    stopped_in = time.monotonic() - began

    assert 1.0 <= stopped_in < 1.0 + 2.0 + SLACK, stopped_in
    assert ["cleanup"] == keys.hooks("kept")
