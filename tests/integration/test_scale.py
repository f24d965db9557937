"""Cancellations at production shapes: bulk batches, many ids per revoke, lost reasons.

Each test here failed on the design before the local index (afd5778):

* bulk cancels beyond Celery's revoked-set limit ran their bodies;
* a revoke naming more than 64 ids overwrote a running prefork task's
  mailbox slot, and the task ended SUCCESS;
* tasks discarded before they started lost their reason (plain "revoked").

The workers run with ``CELERY_WORKER_REVOKES_MAX=100``: a scaled-down
stand-in for Celery's default of 50,000 ids, so that batches of a few
hundred exercise what a batch of 100,000 would in production.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from celery import group

from .conftest import (
    REPO_ROOT,
    Keys,
    Worker,
    assert_revoked,
    task_meta,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BROKER_NAMES = ["redis", "rabbitmq"]
SMALL_REVOKED_SET = {"CELERY_WORKER_REVOKES_MAX": "100"}
BATCH = 300


def quick_tasks(worker: Worker, keys: Keys, count: int, prefix: str = "q") -> list:
    """Send ``count`` short ``cit.loop`` tasks (0.05 s each)."""
    return [worker.send("cit.loop", keys.key(f"{prefix}{i}"), 0.05) for i in range(count)]


def started(keys: Keys, count: int, prefix: str = "q") -> list[int]:
    """Indexes of the quick tasks whose body started."""
    return [i for i in range(count) if keys.started(f"{prefix}{i}")]


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_bulk_cancel_of_queued_tasks_runs_none(make_worker, keys: Keys, broker):
    """300 queued tasks cancelled in one call while the worker is busy: none runs.

    prefork -c 2, prefetch 1, two ``acks_late`` blockers; Celery's revoked set
    holds 100 ids.  Every task ends REVOKED with the reason.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker, prefetch=1, extra_env=SMALL_REVOKED_SET)
    blockers = [worker.send("cit.plain.sleep_late", keys.key(f"b{i}"), 4.0) for i in range(2)]
    wait_for(lambda: keys.started("b0") and keys.started("b1"), 20, message="blockers to start")
    victims = quick_tasks(worker, keys, BATCH)

    cancel(victims, reason="bulk stop", requested_by="ops", app=worker.app)

    for blocker in blockers:
        assert "slept" == blocker.get(timeout=30)
    for victim in victims:
        assert_revoked(victim, "bulk stop", "ops", timeout=60)
    assert [] == started(keys, BATCH), "cancelled tasks ran their body"


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_bulk_cancel_while_no_worker_is_online(make_worker, keys: Keys, broker):
    """300 tasks cancelled while no worker runs; a worker started later runs none.

    The worker learns them from the ledger at start (the broadcast reached
    nobody), and each discard stores the reason.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker, extra_env=SMALL_REVOKED_SET, start=False)
    victims = quick_tasks(worker, keys, BATCH)
    control = [worker.send("cit.loop", keys.key("control"), 0.05)]

    cancel(victims, reason="cancelled while offline", app=worker.app)
    worker.start()

    assert "done" == control[0].get(timeout=60)
    for victim in victims:
        assert_revoked(victim, "cancelled while offline", timeout=60)
    assert [] == started(keys, BATCH)


@pytest.mark.parametrize("how", ["app.control.revoke", "cancel"])
def test_running_task_stops_when_one_revoke_names_hundreds_of_ids(make_worker, keys: Keys, how):
    """A running prefork task named among 300 ids of one revoke still stops.

    Before, every id got a slot in a 64-slot ring, so the running task's slot
    was overwritten before its child read it.
    """
    from cancellable.celery import cancel

    worker = make_worker(extra_env=SMALL_REVOKED_SET)
    result = worker.send("cit.loop", keys.key("t"), 30.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")
    ids = [str(uuid.uuid4()) for _ in range(BATCH)]
    ids.insert(BATCH // 2, result.id)

    if how == "cancel":
        cancel(ids, reason="one of many", app=worker.app)
        assert_revoked(result, "one of many")
    else:
        worker.app.control.revoke(ids)
        assert_revoked(result, "revoked")
    assert ["cleanup"] == keys.hooks("t")
    assert "Cancelled" == keys.flag("t", "exc")


def test_running_task_stops_after_a_storm_of_unrelated_revokes(make_worker, keys: Keys):
    """Cancelled in a section without checkpoints, then 150 unrelated revokes: it still stops.

    The cancellation must survive everything that arrives before the task's
    next checkpoint.
    """
    from cancellable.celery import cancel

    worker = make_worker(extra_env=SMALL_REVOKED_SET)
    result = worker.send("cit.blind_then_loop", keys.key("t"), 8.0, 20.0)
    wait_for(lambda: keys.flag("t", "blind"), 20, message="the blind section")

    cancel(result.id, reason="before the storm", app=worker.app)
    for _ in range(150):
        worker.app.control.revoke(str(uuid.uuid4()))
    worker.barrier()
    assert keys.flag("t", "blind_over") is None, "the blind section ended too early"

    assert_revoked(result, "before the storm", timeout=30)
    assert ["cleanup"] == keys.hooks("t")
    assert "1" == keys.flag("t", "blind_over")


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_group_members_discarded_before_start_keep_the_reason(make_worker, keys: Keys, broker):
    """cancel(GroupResult) of 150 queued members: each ends REVOKED with the reason."""
    from cancellable.celery import cancel

    worker = make_worker(broker=broker, prefetch=1, extra_env=SMALL_REVOKED_SET)
    blockers = [worker.send("cit.plain.sleep_late", keys.key(f"b{i}"), 3.0) for i in range(2)]
    wait_for(lambda: keys.started("b0") and keys.started("b1"), 20, message="blockers to start")
    members = group(
        worker.signature("cit.loop", keys.key(f"g{i}"), 0.05) for i in range(150)
    ).apply_async()

    cancel(members, reason="the batch is obsolete", requested_by="alice", app=worker.app)

    for blocker in blockers:
        blocker.get(timeout=30)
    for member in members.results:
        assert_revoked(member, "revoked by alice: the batch is obsolete", timeout=60)
    assert [] == started(keys, 150, "g")


def test_celery_cancel_command_keeps_the_reason_of_queued_tasks(make_worker, keys: Keys):
    """``celery cancel A B --reason`` on two queued tasks: both REVOKED with the reason."""
    worker = make_worker(prefetch=1)
    # The blockers run until the `celery` command has returned, so the victims are still
    # queued when it runs.  (Blockers of a fixed 8 s ended first once: under CI load, the
    # command's start took longer, and the victims ran and ended SUCCESS before it.)
    blockers = [worker.send("cit.plain.hold", keys.key(f"b{i}"), 120.0) for i in range(2)]
    wait_for(lambda: keys.started("b0") and keys.started("b1"), 20, message="blockers to start")
    victims = quick_tasks(worker, keys, 2)

    env = worker_env(
        broker_url=worker.app.conf.broker_url,
        queue=worker.queue,
        control_exchange=worker.control_exchange,
    )
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.app", "cancel",
         victims[0].id, victims[1].id, "--reason", "typo in the request", "--by", "bob",
         "--wait", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # Waiting in the broker's queue, the two are known to no worker: the
    # command says "unknown" (recorded anyway) and exits 1, as for a typo.
    assert 1 == done.returncode, done.stdout + done.stderr
    assert 2 == done.stdout.count("unknown (not seen by any online worker); recorded")
    assert [] == started(keys, 2)  # still queued behind the blockers

    for i in range(2):
        keys.r.set(f"{keys.key(f'b{i}')}:release", 1)
    for blocker in blockers:
        assert "released" == blocker.get(timeout=30)
    for victim in victims:
        assert_revoked(victim, "revoked by bob: typo in the request")
    assert [] == started(keys, 2)


def test_retry_from_a_cancelled_task_ends_revoked_and_never_reruns(shared_worker, keys: Keys):
    """A body that catches Cancelled and calls self.retry(): REVOKED, and no second run."""
    from cancellable.celery import cancel

    worker = shared_worker()
    result = worker.send("cit.retry_on_cancel", keys.key("t"))
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")

    cancel(result, reason="stop, no retry", app=worker.app)

    assert_revoked(result, "stop, no retry")
    worker.barrier()
    wait_for(worker.idle, 20, interval=0.2, message="the worker to be idle")
    assert 1 == keys.runs("t"), f"the task ran again: {task_meta(result)}"


@pytest.mark.parametrize("how", ["AsyncResult.revoke", "GroupResult.revoke"])
def test_plain_revoke_while_no_worker_is_online(make_worker, keys: Keys, how):
    """Celery's own revoke, sent while no worker runs, still holds for a worker started later.

    The revoke broadcast reaches nobody; the client side recorded it in the
    ledger, which the worker reads when it starts.  (A process records its
    plain revokes once it has called `cancel`, as this one does first, for a
    task that was never sent.)
    """
    from cancellable.celery import cancel

    worker = make_worker(extra_env=SMALL_REVOKED_SET, start=False)
    cancel(f"never-sent-{uuid.uuid4()}", reason="this process cancels", app=worker.app)
    if how == "GroupResult.revoke":
        victims = group(worker.signature("cit.loop", keys.key(f"q{i}"), 0.05) for i in range(150))
        result = victims.apply_async()
        members = list(result.results)
        result.revoke()
    else:
        members = quick_tasks(worker, keys, 150)
        for member in members:
            member.revoke()
    worker.start()

    for member in members:
        assert_revoked(member, "revoked", timeout=60)
    assert [] == started(keys, 150)
