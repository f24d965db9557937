"""What a cancellation does to plain tasks and to tasks waiting for their ETA.

Issue 18, point 4: a running task that is not ``@cancellable`` is left alone
as plain Celery leaves it (its prefork child is never signalled).  Point 10:
a task held in the worker's timer for its countdown ends REVOKED with the
reason as soon as ``cancel()`` reaches the worker, and never runs.
"""

from __future__ import annotations

import time

import pytest
import redis

from .conftest import Keys, Worker, assert_revoked, task_meta, wait_for
from .settings import REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def scheduled_ids(worker: Worker) -> set[str]:
    """Ids of the tasks the worker says it holds for their ETA (``inspect scheduled``)."""
    replies = worker.inspect().scheduled() or {}
    return {entry["request"]["id"] for entries in replies.values() for entry in entries}


def unacked_on_redis(task_id: str) -> bool:
    """Whether the Redis broker holds a message of ``task_id`` delivered but not acknowledged."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return any(task_id.encode() in raw for raw in client.hvals("unacked"))
    finally:
        client.close()


@pytest.mark.parametrize("how", ["AsyncResult.revoke", "cancel"])
def test_a_running_plain_task_gets_no_signal(shared_worker, keys: Keys, how: str) -> None:
    """A plain task on a prefork worker, revoked while it runs its many short
    C-level sleeps, receives 0 wake-up signals and runs to its end (before, its
    child got a SIGURG every 0.5 s until it ended)."""
    worker = shared_worker(broker="redis", pool="prefork")
    result = worker.send("cit.plain.count_signals", keys.key("p"), 3.0)
    wait_for(lambda: keys.started("p"), 20, message="the plain task to start")

    if how == "cancel":
        from cancellable.celery import cancel

        cancel(result.id, reason="stop it", app=worker.app)
    else:
        result.revoke()

    wait_for(lambda: keys.flag("p", "done"), 20, message="the plain task to end")
    assert "0" == keys.flag("p", "signals")
    assert 1 == keys.runs("p")


@pytest.mark.parametrize(("broker", "pool"), [("redis", "prefork"), ("rabbitmq", "threads")])
def test_a_cancelled_countdown_task_ends_revoked_at_once(
    shared_worker, keys: Keys, broker: str, pool: str
) -> None:
    """A task sent with a 6 s countdown and cancelled while the worker holds it in
    its timer ends REVOKED with the reason within 2 s (before, it stayed PENDING
    until its ETA), its message acknowledged, and it never runs, also after its
    ETA has passed."""
    worker = shared_worker(broker=broker, pool=pool)
    sent = time.monotonic()
    result = worker.send("cit.loop", keys.key("eta"), 1.0, countdown=6)
    wait_for(lambda: result.id in scheduled_ids(worker), 10, message="the worker to hold it")
    assert broker != "redis" or unacked_on_redis(result.id)
    from cancellable.celery import cancel

    cancelled = time.monotonic()
    cancel(result.id, reason="not needed any more", requested_by="bob", app=worker.app)
    wait_for(lambda: task_meta(result)["status"] == "REVOKED", 10, message="REVOKED")
    took = time.monotonic() - cancelled

    assert_revoked(result, "not needed any more", "bob")
    assert took < 2.0, f"REVOKED after {took:.1f} s"
    assert broker != "redis" or not unacked_on_redis(result.id)
    time.sleep(max(0.0, sent + 6 + 1.5 - time.monotonic()))
    assert 0 == keys.runs("eta")
    assert "REVOKED" == task_meta(result)["status"]
