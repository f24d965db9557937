"""``async def`` task bodies on real workers (docs/async.md).

prefork and threads receive a plain ``revoke()`` while the task runs; solo
reads broadcasts only between tasks, so there a running task is reached
through the ledger poll, which `cancel` feeds, and so does a plain revoke
sent by a process that loaded the integration (see docs/celery.md).  The
tasks are in `tests.integration.app` (``cit.async.*``).
"""

from __future__ import annotations

import statistics
import time

import pytest

from .conftest import Keys, Worker, assert_revoked, task_meta, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

POOLS = ["prefork", "threads", "solo"]


def start(worker: Worker, keys: Keys, task: str, name: str, *args: object):
    """Send ``task`` and wait until its body is awaiting (it sets ``looping``)."""
    result = worker.send(task, keys.key(name), *args)
    wait_for(
        lambda: keys.flag(name, "looping"),
        20,
        message=lambda: f"{task} to start ({task_meta(result)['status']})",
    )
    return result


def assert_cancelled_at_await(keys: Keys, name: str, message: str) -> None:
    """CancelledError was raised at the await, with the reason; finally and hook ran once."""
    assert "CancelledError" == keys.flag(name, "exc")
    assert message in (keys.flag(name, "message") or "")
    assert "1" == keys.flag(name, "finally")
    assert ["cleanup"] == keys.hooks(name)
    assert keys.flag(name, "done") is None
    assert 1 == keys.runs(name)


#: solo reaches a running task through the ledger poll: `cancel` records
#: there, and so does a plain revoke from a process that loaded the
#: integration (its client side records Celery's own revokes).
CANCEL_CASES = [
    ("prefork", "AsyncResult.revoke"),
    ("prefork", "cancel"),
    ("threads", "AsyncResult.revoke"),
    ("threads", "cancel"),
    ("solo", "AsyncResult.revoke"),
    ("solo", "cancel"),
]


@pytest.mark.parametrize(("pool", "how"), CANCEL_CASES)
def test_async_task_awaiting_sleep_is_cancelled(shared_worker, keys: Keys, pool, how):
    """An async body awaiting ``asyncio.sleep(3600)`` ends REVOKED with the reason.

    The coroutine sees CancelledError at its await with the reason as the
    message, its ``finally`` and its ``on_cancel`` hook run, and the worker
    stays up; the receipt says it stopped at a checkpoint (the await), with
    the message docs/async.md shows.  solo: both reach the running task
    through the ledger poll.
    """
    worker = shared_worker(pool=pool)
    result = start(worker, keys, "cit.async.sleep", "t")

    if how == "cancel":
        from cancellable.celery import Outcome, cancel

        receipt = cancel(result.id, reason="user pressed stop", requested_by="alice",
                         app=worker.app)  # fmt: skip
        (outcome,) = receipt.wait(20)
        assert Outcome.STOPPED == outcome.outcome, outcome
        assert "revoked by alice: user pressed stop (stopped at a checkpoint" in str(
            outcome.message
        )
        assert_revoked(result, "user pressed stop", "alice")
        assert_cancelled_at_await(keys, "t", "user pressed stop")
    else:
        result.revoke()
        assert_revoked(result, "revoked")
        assert_cancelled_at_await(keys, "t", "revoked")
    assert worker.healthy()


@pytest.mark.parametrize("pool", POOLS)
def test_async_task_result_is_returned_unchanged(shared_worker, pool):
    """A finished async body's return value reaches the client unchanged."""
    worker = shared_worker(pool=pool)
    value = {"a": [1, 2.5, "three"], "b": None}

    result = worker.send("cit.async.echo", value)

    assert value == result.get(timeout=20)
    assert "SUCCESS" == result.state


@pytest.mark.parametrize("pool", POOLS)
def test_async_task_deadline_ends_revoked(shared_worker, keys: Keys, pool):
    """``@cancellable(timeout=0.5)`` on an async body: REVOKED with the deadline reason."""
    worker = shared_worker(pool=pool)

    result = worker.send("cit.async.deadline", keys.key("t"))

    assert_revoked(result, "deadline", timeout=20)
    assert "1" == keys.flag("t", "finally")
    assert ["cleanup"] == keys.hooks("t")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_async_task_cancelled_while_awaiting_a_thread(shared_worker, keys: Keys, pool):
    """Cancelled while awaiting ``asyncio.to_thread(helper)``: the helper stops too.

    The thread inherits the call's context, so the helper's ``checkpoint()``
    raises Cancelled; the task ends REVOKED once the thread is done
    (``asyncio.run`` waits for it), with the hook run once.
    """
    worker = shared_worker(pool=pool)
    result = start(worker, keys, "cit.async.to_thread", "t", 30.0)

    result.revoke()

    assert_revoked(result, "revoked")
    assert "Cancelled" == keys.flag("t", "exc"), "the helper's checkpoint did not raise"
    assert keys.flag("t", "done") is None
    assert keys.flag("t", "finally") is not None
    assert ["cleanup"] == keys.hooks("t")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_async_first_link_of_a_cancelled_workflow(shared_worker, keys: Keys, pool):
    """``cancel(chain, workflow=True)`` while its async first link awaits: the await is cancelled.

    The first link sees CancelledError with the reason at its await (finally
    and hook ran); it and the link that never ran both end REVOKED with it.
    """
    from celery import chain

    from cancellable.celery import cancel

    worker = shared_worker(pool=pool)
    first = worker.app.signature(
        "cit.async.sleep", args=(keys.key("t"),), options={"queue": worker.queue}, immutable=True
    )
    second = worker.app.signature(
        "cit.async.echo", args=("never",), options={"queue": worker.queue}, immutable=True
    )
    result = chain(first, second).apply_async()
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the first link to await")

    cancel(result, reason="report closed", workflow=True, app=worker.app)

    assert_revoked(result.parent, "report closed")
    assert_cancelled_at_await(keys, "t", "report closed")
    assert_revoked(result, "report closed")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_async_task_cancelled_with_a_grace_stops_at_its_await(shared_worker, keys: Keys, pool):
    """``cancel(grace=30)``: an awaiting async body is cancelled at once, not after the grace.

    The grace only bounds how long the cooperative step may take; an await
    is a cancellation point, so nothing escalates.
    """
    from cancellable.celery import cancel

    worker = shared_worker(pool=pool)
    result = start(worker, keys, "cit.async.sleep", "t")
    began = time.monotonic()

    cancel(result.id, reason="stop", grace=30, app=worker.app)

    assert_revoked(result, "stop")
    assert time.monotonic() - began < 10, "waited for the grace instead of stopping at the await"
    assert "(interrupted" not in str(task_meta(result)["result"])
    assert_cancelled_at_await(keys, "t", "stop")


def _revoke_latencies_ms(worker: Worker, keys: Keys, task: str, rounds: int) -> list[float]:
    """revoke() -> the body sees the cancellation (CancelledError or Cancelled), per round."""
    latencies = []
    for n in range(rounds):
        name = f"r{n}"
        result = start(worker, keys, task, name)
        time.sleep(0.05)
        began = time.time()
        result.revoke()
        assert_revoked(result, "revoked")
        seen = keys.flag(name, "cancelled_at")
        if seen is None:  # cit.loop records no time; its checkpoint_loop sets exc
            seen = keys.flag(name, "exc_at")
        assert seen is not None
        latencies.append((float(seen) - began) * 1000.0)
    return latencies


@pytest.mark.parametrize("task", ["cit.async.sleep", "cit.loop"])
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_revoke_latency(shared_worker, keys: Keys, capsys, pool, task):
    """p50 revoke() -> the body sees it is below 100 ms, async and sync alike (printed)."""
    worker = shared_worker(pool=pool)

    latencies = _revoke_latencies_ms(worker, keys, task, 15)

    p50 = statistics.median(latencies)
    with capsys.disabled():
        print(
            f"\n{pool} {task} revoke->cancelled in body, ms: p50={p50:.1f} "
            f"min={min(latencies):.1f} max={max(latencies):.1f} n={len(latencies)}"
        )
    assert p50 < 100.0, latencies
