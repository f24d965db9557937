"""(h) The solo and gevent pools (prefork and threads are covered everywhere else).

solo runs the task in the consumer's own thread, so the worker reads
broadcasts only between tasks: a plain ``revoke()`` of a RUNNING solo task is
not seen until the task returns.  What solo can do, and what these tests
assert: a running task is stopped through the ledger poll, so `cancel`
stops it within ``cancellable_poll_interval`` (0.5 s here) plus a margin; and
a task cancelled while queued behind a running one never runs.
"""

from __future__ import annotations

import time

import pytest

from .conftest import Keys, assert_revoked, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

POLL_INTERVAL = 0.5
#: Delivery through the ledger poll: one poll interval, the next checkpoint,
#: cleanup and storing the result.  Generous for a loaded 2-core machine.
POLL_MARGIN = 2.5


def start_loop(worker, keys: Keys, name: str, seconds: float = 20.0):
    result = worker.send("cit.loop", keys.key(name), seconds)
    wait_for(lambda: keys.flag(name, "looping"), 20, message=f"{name} to start looping")
    return result


def test_solo_running_task_stopped_by_cancel_within_poll_interval(shared_worker, keys: Keys):
    """(h) solo: `cancel` stops a running task within poll_interval + margin, hooks once."""
    from cancellable.celery import cancel

    worker = shared_worker(pool="solo")
    result = start_loop(worker, keys, "t")

    began = time.monotonic()
    cancel(result.id, reason="solo stop", requested_by="ops", app=worker.app)
    assert_revoked(result, "solo stop", "ops", timeout=20)
    elapsed = time.monotonic() - began

    assert elapsed < POLL_INTERVAL + POLL_MARGIN, f"took {elapsed:.2f}s"
    assert "Cancelled" == keys.flag("t", "exc")
    assert ["cleanup"] == keys.hooks("t")
    assert worker.alive()


def test_solo_task_cancelled_while_queued_never_runs(shared_worker, keys: Keys):
    """(h) solo: a task cancelled while it waits behind a running task never runs."""
    from cancellable.celery import cancel

    worker = shared_worker(pool="solo")
    blocker = start_loop(worker, keys, "blocker", seconds=2.0)
    victim = worker.send("cit.loop", keys.key("victim"), 5.0)

    cancel(victim.id, reason="not wanted", app=worker.app)

    assert "done" == blocker.get(timeout=20)
    wait_for(worker.idle, 30, interval=0.2, message="the worker to be idle")
    assert_revoked(victim)
    assert [] == keys.started("victim")


@pytest.mark.parametrize("how", ["AsyncResult.revoke", "cancel"])
def test_gevent_running_task_stops_at_checkpoint(shared_worker, keys: Keys, how):
    """(h) gevent -c 10: a running task stops at its checkpoint, hooks once, REVOKED."""
    worker = shared_worker(pool="gevent")
    result = start_loop(worker, keys, "t")
    other = start_loop(worker, keys, "other", seconds=2.0)

    if how == "cancel":
        from cancellable.celery import cancel

        cancel(result.id, reason="user pressed stop", requested_by="alice", app=worker.app)
        assert_revoked(result, "user pressed stop", "alice")
    else:
        result.revoke()
        assert_revoked(result, "revoked")

    assert "Cancelled" == keys.flag("t", "exc")
    assert ["cleanup"] == keys.hooks("t")
    assert [worker.pid] == keys.started("t")
    assert "done" == other.get(timeout=20), "the other greenlet was disturbed"
    assert [] == keys.hooks("other")
