"""What ``cancel()`` returns, on real prefork workers (issue 20, Done-when 2).

The receipt carries the recorded reason and the targets, and ``wait()``
reports each task's outcome from the result backend: stopped at a
checkpoint, interrupted, terminated, discarded before it started, already
finished (nothing recorded), finished without observing the cancellation,
still running at the timeout, unknown; for a group, one outcome per member.
"""

from __future__ import annotations

import time
import uuid

import pytest
from celery import chain, group

from cancellable import CancelReason
from cancellable.celery import CancelReceipt, Outcome, cancel

from .conftest import Keys, Worker, ledger_keys, task_meta, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def start(worker: Worker, keys: Keys, task: str, name: str, *args: object):
    """Send ``task`` and wait until its body runs (its ``looping`` flag)."""
    result = worker.send(task, keys.key(name), *args)
    wait_for(
        lambda: keys.flag(name, "looping"),
        20,
        message=lambda: f"{task} to start ({task_meta(result)['status']})",
    )
    return result


def only(receipt: CancelReceipt, timeout: float = 20.0):
    """The one outcome of a receipt that names one task."""
    (outcome,) = receipt.wait(timeout)
    return outcome


def test_stopped_at_a_checkpoint(shared_worker, keys: Keys):
    """A running loop: the receipt has the reason and target; wait() says stopped at a
    checkpoint once the hook ran, with the REVOKED message."""
    worker = shared_worker()
    result = start(worker, keys, "cit.loop", "a")

    receipt = cancel(result, "user pressed stop", requested_by="alice", app=worker.app)
    outcome = only(receipt)

    assert isinstance(receipt.reason, CancelReason)
    assert ("user pressed stop", "alice") == (receipt.reason.message, receipt.reason.requested_by)
    assert ((("task", result.id),), (result.id,)) == (receipt.targets, receipt.task_ids)
    assert (Outcome.STOPPED, "REVOKED") == (outcome.outcome, outcome.state), outcome
    assert outcome.message is not None
    assert outcome.message.startswith("revoked by alice: user pressed stop (stopped at a check")
    assert outcome.cancelled
    assert ["cleanup"] == keys.hooks("a")


def test_interrupted_after_the_grace(shared_worker, keys: Keys):
    """A task blocked in time.sleep, grace=1: interrupted."""
    worker = shared_worker()
    result = start(worker, keys, "cit.ladder.sleep", "s")

    outcome = only(cancel(result, "too slow", grace=1, app=worker.app))

    assert Outcome.INTERRUPTED == outcome.outcome, outcome
    assert "too slow (interrupted after 1." in (outcome.message or "")


def test_terminated_after_grace_and_kill_after(shared_worker, keys: Keys):
    """A task stuck in a C call holding the GIL, grace=1 (kill_after 1 s): terminated."""
    worker = shared_worker()
    result = start(worker, keys, "cit.ladder.gil", "g")

    outcome = only(cancel(result, "runaway", grace=1, app=worker.app))

    assert Outcome.TERMINATED == outcome.outcome, outcome
    assert "runaway (terminated after 2." in (outcome.message or "")


def test_discarded_finished_and_unknown(shared_worker, keys: Keys):
    """One call naming a task waiting behind busy children, a finished task and an
    unknown id: discarded, finished (not recorded, not sent), unknown (recorded)."""
    worker = shared_worker()
    finished = worker.send("cit.plain.add", 2, 3)
    assert 5 == finished.get(timeout=20)
    blockers = [worker.send("cit.plain.sleep", keys.key(f"b{i}"), 3.0) for i in range(2)]
    wait_for(lambda: keys.started("b0") and keys.started("b1"), 20, message="blockers")
    queued = worker.send("cit.loop", keys.key("q"))
    wait_for(lambda: queued.id in worker.reserved_ids(), 10, message="the task to be reserved")
    unknown = str(uuid.uuid4())

    receipt = cancel([queued, finished, unknown], "tidy up", app=worker.app)
    outcomes = {o.task_id: o for o in receipt.wait(10, workers_timeout=1.0)}

    assert ((finished.id, "SUCCESS"),) == receipt.finished
    assert (("task", queued.id), ("task", unknown)) == receipt.targets
    assert (queued.id, finished.id, unknown) == receipt.task_ids
    assert Outcome.DISCARDED == outcomes[queued.id].outcome, outcomes[queued.id]
    assert "revoked: tidy up" == outcomes[queued.id].message
    assert (Outcome.FINISHED, "SUCCESS") == (
        outcomes[finished.id].outcome,
        outcomes[finished.id].state,
    )
    assert Outcome.UNKNOWN == outcomes[unknown].outcome
    assert [] == ledger_keys(finished.id)
    assert ledger_keys(unknown)
    assert [] == keys.started("q")
    for blocker in blockers:
        blocker.get(timeout=20)


def test_cancelling_only_finished_tasks_records_nothing(shared_worker):
    """Cancelling a finished task says so, and records and sends nothing (idempotent)."""
    worker = shared_worker()
    done = worker.send("cit.plain.add", 1, 1)
    assert 2 == done.get(timeout=20)

    receipt = cancel(done, "too late", app=worker.app)

    assert (False, ()) == (receipt.recorded, receipt.targets)
    assert Outcome.FINISHED == only(receipt, 0).outcome
    assert [] == ledger_keys(done.id)
    assert "SUCCESS" == done.state


def test_running_at_the_timeout_then_finished_without_observing(shared_worker, keys: Keys):
    """A @cancellable task with no checkpoint: still running at a short timeout, then
    SUCCESS without ever observing the cancellation."""
    worker = shared_worker()
    result = start(worker, keys, "cit.no_checkpoint", "n", 3.0)

    receipt = cancel(result, "stop", app=worker.app)
    early = only(receipt, 0.3)
    late = only(receipt, 20)

    assert (Outcome.RUNNING, False) == (early.outcome, early.cancelled), early
    assert (Outcome.UNOBSERVED, "SUCCESS") == (late.outcome, late.state), late
    assert "1" == keys.flag("n", "done")


def test_a_group(shared_worker, keys: Keys):
    """A group of a finished member and two running loops: one outcome per member,
    the finished one finished (before the cancel), the loops stopped."""
    worker = shared_worker()
    add = worker.signature("cit.plain.add", 1, 2)
    loops = [worker.signature("cit.loop", keys.key(name), 30.0) for name in ("g1", "g2")]
    result = group([add, *loops]).apply_async()
    wait_for(lambda: keys.flag("g1", "looping") and keys.flag("g2", "looping"), 20, message="loops")
    wait_for(lambda: result.results[0].ready(), 10, message="the add to finish")
    time.sleep(0.05)  # its date_done is before the cancellation

    receipt = cancel(result, "group done", app=worker.app)
    outcomes = receipt.wait(20)

    assert (("group", result.id),) == receipt.targets
    assert tuple(r.id for r in result.results) == receipt.task_ids
    assert [Outcome.FINISHED, Outcome.STOPPED, Outcome.STOPPED] == [o.outcome for o in outcomes]


def test_a_whole_chain(shared_worker, keys: Keys):
    """cancel(chain_result, workflow=True): the receipt knows every link it holds; the
    first finished before the cancel, the running one stopped, the unsent last one
    discarded (never started)."""
    worker = shared_worker()
    flow = chain(
        worker.app.signature("cit.plain.add", args=(1, 2), options={"queue": worker.queue},
                             immutable=True),
        worker.app.signature("cit.loop", args=(keys.key("c"), 30.0),
                             options={"queue": worker.queue}, immutable=True),
        worker.app.signature("cit.plain.add", args=(3, 4), options={"queue": worker.queue},
                             immutable=True),
    )  # fmt: skip
    result = flow.apply_async()
    wait_for(lambda: keys.flag("c", "looping"), 20, message="the second link to loop")

    receipt = cancel(result, "chain done", app=worker.app, workflow=True)
    outcomes = receipt.wait(20)

    ids = (result.parent.parent.id, result.parent.id, result.id)
    assert ids == receipt.task_ids
    assert [Outcome.FINISHED, Outcome.STOPPED, Outcome.DISCARDED] == [
        o.outcome for o in outcomes
    ], outcomes


def test_a_chain_without_workflow_cancels_only_its_last_link(shared_worker, keys: Keys):
    """cancel(chain_result) names the last link only (what cancel()'s docs warn): the
    running link runs on to SUCCESS, the last link is discarded when it is sent."""
    worker = shared_worker()
    flow = chain(
        worker.app.signature("cit.loop", args=(keys.key("l"), 1.5),
                             options={"queue": worker.queue}, immutable=True),
        worker.app.signature("cit.plain.add", args=(3, 4), options={"queue": worker.queue},
                             immutable=True),
    )  # fmt: skip
    result = flow.apply_async()
    wait_for(lambda: keys.flag("l", "looping"), 20, message="the first link to loop")

    receipt = cancel(result, "only the end", app=worker.app)
    (outcome,) = receipt.wait(20)

    assert (result.id,) == receipt.task_ids
    assert Outcome.DISCARDED == outcome.outcome, outcome
    assert "SUCCESS" == result.parent.state
    assert "1" == keys.flag("l", "done")
