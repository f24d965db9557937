"""(f) An ``acks_late`` task cancelled, then its worker crashes: it never runs again.

The task is cancelled while it is in a section without checkpoints, so it
cannot stop and its message stays unacknowledged.  Then the worker is
``kill -9``-ed (children too).  The broker redelivers the message (Redis
after the visibility timeout, 5 s here; RabbitMQ at once, on connection
loss) to a new worker, which must discard it: the run count stays 1.
"""

from __future__ import annotations

import json
import time

import pytest
import redis
from kombu import Connection
from kombu.transport.redis import Channel as RedisChannel

from .conftest import AMQP_URL, REDIS_URL, Keys, Worker, assert_revoked, wait_for

VISIBILITY_TIMEOUT = 5.0

#: How long a killed worker's unacknowledged message may take to come back.  kombu 5.7's
#: Redis transport sweeps for them every second here (``unacked_restore_interval`` and
#: ``unacked_restore_throttle``, see settings.py); older releases about every 100 s.
REDELIVERY_WAIT = VISIBILITY_TIMEOUT + (
    25 if hasattr(RedisChannel, "unacked_restore_throttle") else 125
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(REDELIVERY_WAIT + 90)]


def redis_unacked_ids() -> set[str]:
    """Task ids of messages kombu's Redis transport holds as delivered, not acked."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        ids = set()
        for payload in client.hvals("unacked"):
            message = json.loads(payload)[0]
            ids.add(message.get("headers", {}).get("id"))
        return ids
    finally:
        client.close()


def redis_redelivery_state(queue: str) -> str:
    """What kombu's Redis restore machinery looks like, for failure messages."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return (
            f"queue={client.lrange(queue, 0, -1)} "
            f"unacked={sorted(redis_unacked_ids())} "
            f"index={client.zrange('unacked_index', 0, -1, withscores=True)} "
            f"mutex_ttl={client.ttl('unacked_mutex')} now={time.time():.1f}"
        )
    finally:
        client.close()


def rabbit_ready_count(queue: str) -> int:
    with Connection(AMQP_URL, connect_timeout=3) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).message_count)


def rabbit_consumer_count(queue: str) -> int:
    with Connection(AMQP_URL, connect_timeout=3) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).consumer_count)


def finished_on(worker: Worker, task_id: str) -> bool:
    """The worker answered inspect and no longer lists ``task_id`` as active."""
    replies = worker.inspect().active() or {}
    return worker.name in replies and all(r["id"] != task_id for r in replies[worker.name])


def awaiting_redelivery(worker: Worker, task_id: str) -> bool:
    """True once the broker holds the message for redelivery."""
    if worker.broker == "redis":
        return task_id in redis_unacked_ids() or worker.queue_length() == 1
    return rabbit_ready_count(worker.queue) == 1


def redelivered_and_settled(worker: Worker, task_id: str) -> bool:
    """The new worker took the message and acknowledged it (nothing left anywhere)."""
    if worker.broker == "redis":
        return task_id not in redis_unacked_ids() and worker.queue_length() == 0
    return rabbit_ready_count(worker.queue) == 0 and not worker.active_ids()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_acks_late_task_cancelled_then_worker_killed_does_not_rerun(
    make_worker, keys: Keys, broker
):
    """(f) cancel() during a checkpoint-free section, kill -9 the worker: no second run."""
    from cancellable.celery import cancel

    first = make_worker(broker=broker, visibility_timeout=VISIBILITY_TIMEOUT)
    result = first.send("cit.blind_then_loop", keys.key("t"), 30.0, 20.0)
    wait_for(lambda: keys.flag("t", "blind"), 20, message="the task to enter its blind section")
    assert result.id in first.active_ids()

    cancel(result.id, reason="stop before the crash", app=first.app)
    first.barrier()  # the running worker has handled the broadcast
    assert keys.flag("t", "blind_over") is None, "the blind section ended too early"
    first.kill9()

    assert 1 == keys.runs("t")
    wait_for(lambda: awaiting_redelivery(first, result.id), 15,
             message="the broker to hold the message for redelivery")  # fmt: skip

    second = make_worker(
        broker=broker,
        queue=first.queue,
        control_exchange=first.control_exchange,
        visibility_timeout=VISIBILITY_TIMEOUT,
    )
    wait_for(
        lambda: keys.runs("t") > 1 or redelivered_and_settled(second, result.id),
        REDELIVERY_WAIT,
        interval=0.2,
        message=lambda: (
            "the new worker to take and settle the redelivered message; "
            + redis_redelivery_state(first.queue)
        ),
    )

    assert 1 == keys.runs("t"), "the cancelled task ran a second time"
    assert_revoked(result)
    assert keys.flag("t", "done") is None


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_harness_redelivers_acks_late_message_after_kill9(make_worker, keys: Keys, broker):
    """Control for (f): without any cancellation, the killed task does run a second time.

    Proves the crash scenario really redelivers within the test's time (so
    the single run above is the library's doing, not a lost message).
    """
    first = make_worker(broker=broker, visibility_timeout=VISIBILITY_TIMEOUT)
    result = first.send("cit.plain.sleep_late", keys.key("t"), 4.0)
    wait_for(lambda: keys.started("t"), 20, message="the task to start")
    first.kill9()

    second = make_worker(
        broker=broker,
        queue=first.queue,
        control_exchange=first.control_exchange,
        visibility_timeout=VISIBILITY_TIMEOUT,
    )

    wait_for(lambda: keys.runs("t") == 2, REDELIVERY_WAIT, interval=0.2,
             message=lambda: "the second run; " + redis_redelivery_state(first.queue))  # fmt: skip
    assert "slept" == result.get(timeout=20)
    assert 2 == keys.runs("t")
    assert second.alive()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_acks_late_task_stopped_at_checkpoint_is_acknowledged(make_worker, keys: Keys, broker):
    """An ``acks_late`` task that stops at a checkpoint is acknowledged: nothing to redeliver.

    After it ends REVOKED the worker is killed with SIGKILL; the broker must
    hold no copy of the message (Redis: not in the unacked hash nor the
    queue; RabbitMQ: not requeued).
    """
    worker = make_worker(broker=broker, visibility_timeout=VISIBILITY_TIMEOUT)
    result = worker.send("cit.blind_then_loop", keys.key("t"), 0.0, 20.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")
    wait_for(lambda: result.id in worker.active_ids(), 10, message="the task to be active")

    result.revoke()
    assert_revoked(result, "revoked")
    # REVOKED is written by the child; the main process acknowledges when it
    # handles the child's result.  Kill only after that, or the test races
    # the ack (the main process answers inspect only between two handlers).
    wait_for(lambda: finished_on(worker, result.id), 10,
             message="the worker's main process to finish the task")  # fmt: skip
    worker.kill9()

    assert ["cleanup"] == keys.hooks("t")
    if broker == "redis":
        assert result.id not in redis_unacked_ids()
        assert 0 == worker.queue_length()
    else:
        # Once RabbitMQ has dropped the dead consumer, an unacked message would be back.
        wait_for(lambda: rabbit_consumer_count(worker.queue) == 0, 15,
                 message="RabbitMQ to notice the dead consumer")  # fmt: skip
        assert 0 == rabbit_ready_count(worker.queue)
