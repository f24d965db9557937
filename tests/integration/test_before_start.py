"""Tasks cancelled before they start never run their body.

Acceptance items (d) queued / prefetched / handed to the threads pool, and
(e) durability: cancelled while no worker was online.
Every task body records "started" in Redis as its first line.
"""

from __future__ import annotations

import pytest

from .conftest import Keys, Worker, assert_revoked, wait_for, wait_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BROKER_NAMES = ["redis", "rabbitmq"]


def wait_idle(worker: Worker, timeout: float = 30.0) -> None:
    """Wait until the worker has consumed and finished everything sent to it."""
    wait_for(worker.idle, timeout, interval=0.2, message=f"{worker.name} to be idle")


def test_queued_behind_busy_tasks_never_runs(make_worker, keys: Keys):
    """(d-i) Tasks still in the broker queue behind busy children never run once revoked.

    prefork -c 2, prefetch multiplier 1 and two ``acks_late`` blockers: the
    worker holds no other message, so the victims wait in Redis.  One victim
    is revoked with ``AsyncResult.revoke()``, the other with `cancel`.
    """
    from cancellable.celery import cancel

    worker = make_worker(prefetch=1)
    blockers = [worker.send("cit.plain.sleep_late", keys.key(f"b{i}"), 3.0) for i in range(2)]
    wait_for(lambda: keys.started("b0") and keys.started("b1"), 20, message="blockers to start")
    victims = [worker.send("cit.loop", keys.key(f"v{i}"), 5.0) for i in range(2)]
    wait_for(lambda: worker.queue_length() == 2, 10, message="the victims to wait in the queue")
    assert not (worker.reserved_ids() & {v.id for v in victims})

    victims[0].revoke()
    cancel(victims[1].id, reason="not needed any more", app=worker.app)

    for blocker in blockers:
        assert "slept" == blocker.get(timeout=20)
    wait_idle(worker)
    for i, victim in enumerate(victims):
        assert_revoked(victim)
        assert [] == keys.started(f"v{i}"), f"victim {i} ran its body"


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_prefetched_tasks_never_run(shared_worker, keys: Keys, broker):
    """(d-ii) Tasks the prefork worker already reserved (prefetched) never run once revoked.

    Default prefetch multiplier (4) with -c 2: while two blockers run, three
    more tasks are reserved by the worker; revoking them (one broadcast)
    means none of their bodies starts.
    """
    worker = shared_worker(broker=broker)
    blockers = [worker.send("cit.loop", keys.key(f"b{i}"), 2.0) for i in range(2)]
    wait_for(lambda: keys.started("b0") and keys.started("b1"), 20, message="blockers to start")
    victims = [worker.send("cit.loop", keys.key(f"v{i}"), 5.0) for i in range(3)]
    victim_ids = {v.id for v in victims}
    wait_for(lambda: victim_ids <= worker.reserved_ids(), 10, message="victims to be reserved")

    worker.app.control.revoke(sorted(victim_ids))

    for blocker in blockers:
        assert "done" == blocker.get(timeout=20)
    wait_idle(worker)
    for i, victim in enumerate(victims):
        assert_revoked(victim)
        assert [] == keys.started(f"v{i}"), f"victim {i} ran its body"


def test_threads_pool_tasks_already_handed_to_pool_never_run(shared_worker, keys: Keys):
    """(d-iii) threads pool: tasks already submitted to the thread pool never run once revoked.

    Celery itself does not re-check these (they sit in the executor's queue);
    the ``@cancellable`` start check must.
    """
    from cancellable.celery import cancel

    worker = shared_worker(pool="threads")
    blockers = [worker.send("cit.loop", keys.key(f"b{i}"), 2.0) for i in range(2)]
    wait_for(lambda: keys.started("b0") and keys.started("b1"), 20, message="blockers to start")
    victims = [worker.send("cit.loop", keys.key(f"v{i}"), 5.0) for i in range(2)]
    victim_ids = {v.id for v in victims}
    wait_for(lambda: victim_ids <= worker.reserved_ids(), 10, message="victims to be reserved")

    victims[0].revoke()
    cancel(victims[1], reason="handed over", app=worker.app)

    for blocker in blockers:
        assert "done" == blocker.get(timeout=20)
    wait_idle(worker)
    for i, victim in enumerate(victims):
        assert_revoked(victim)
        assert [] == keys.started(f"v{i}"), f"victim {i} ran its body"


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_cancel_while_no_worker_is_online_is_durable(make_worker, keys: Keys, broker):
    """(e) `cancel` of a queued task while no worker runs: a worker started later never runs it.

    A second, uncancelled task in the same queue proves the new worker did
    consume the queue.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker, start=False)
    cancelled = worker.send("cit.loop", keys.key("cancelled"), 1.0)
    control = worker.send("cit.loop", keys.key("control"), 1.0)
    wait_for(lambda: worker.queue_length() == 2, 10, message="both tasks to be queued")

    cancel(cancelled.id, reason="cancelled while offline", app=worker.app)
    worker.start()

    assert "done" == control.get(timeout=30)
    wait_idle(worker)
    assert_revoked(cancelled)
    assert [] == keys.started("cancelled"), "the cancelled task ran"
    assert "REVOKED" == wait_state(cancelled, "REVOKED", 1)
