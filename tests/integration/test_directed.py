"""A cancel of a running task goes to the worker that runs it, and to no other (issue 22).

With ``task_track_started`` on, a running task's STARTED state names its
worker; `cancel()` then sends the revoke to that worker's own queue
(`cancellable.celery._direct`: a list on Redis, a transient queue on AMQP,
on the broker's default exchange), so the control exchange, which every
worker receives, carries nothing; the other workers learn the cancellation
from the ledger.  A queued task's cancel still reaches every worker.  Real
prefork workers share one control exchange; a subscriber on it (Redis: a
pattern subscription to its channel; AMQP: a queue of our own bound to the
fanout) records every revoke the exchange carried.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from .conftest import Keys, assert_revoked, wait_for, wait_state
from .settings import AMQP_URL, REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TRACK = {"CIT_SETTINGS": json.dumps({"task_track_started": True})}
#: A ledger poll too rare to stop anything during a test: a task that stops
#: was reached by a message.
NO_POLL = 120.0


class Revokes:
    """Revoke messages published on a control exchange, with their ``destination``."""

    def __init__(self, control_exchange: str) -> None:
        self.client = redis.Redis.from_url(REDIS_URL)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"*{control_exchange}.pidbox*")
        self.seen: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            message = self.pubsub.get_message(timeout=0.05)
            if message is None or message["type"] != "pmessage":
                continue
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            decoded = json.loads(body)
            if decoded.get("method") == "revoke":
                self.seen.append(decoded)

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [m for m in self.seen if task_id in m["arguments"]["task_id"]]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2.0)
        self.pubsub.close()
        self.client.close()


def direct_queue(worker: Any) -> str:
    """The name of ``worker``'s directed queue (`cancellable.celery._direct.queue_name`)."""
    from cancellable.celery._direct import queue_name

    return queue_name(worker.app, worker.name)


def test_a_running_task_is_revoked_on_its_worker_only(make_worker, keys: Keys) -> None:
    """A task running on worker A (STARTED names A), ledger polls too rare to matter:
    cancel() sends the revoke to A's own queue, the control exchange carries nothing for
    it (so B, whose only other way in is its own queue, never receives it), and the task
    stops at a checkpoint with its reason and cleanup.  A queued task's cancel is
    published on the control exchange to every worker (no destination) and it never
    runs.  B's own task keeps running."""
    from cancellable.celery import cancel

    exchange = f"cit-direct-{uuid.uuid4().hex[:8]}"
    a = make_worker(
        concurrency=1, control_exchange=exchange, extra_env=TRACK, poll_interval=NO_POLL
    )
    b = make_worker(
        concurrency=1, control_exchange=exchange, extra_env=TRACK, poll_interval=NO_POLL
    )
    a.app.conf.task_track_started = True
    revokes = Revokes(exchange)
    try:
        running = a.send("cit.loop", keys.key("running"), 60.0)
        other = b.send("cit.loop", keys.key("other"), 60.0)
        for name in ("running", "other"):
            wait_for(lambda name=name: keys.flag(name, "looping"), 30, message=f"{name} loops")
        wait_state(running, "STARTED", 10)
        queued = a.send("cit.loop", keys.key("queued"), 60.0)  # behind the running one

        cancel(queued, reason="queued", app=a.app)
        cancel(running, reason="direct", app=a.app)
        assert_revoked(running, "direct")
        assert ["cleanup"] == keys.hooks("running")
        assert_revoked(queued, "queued")
        assert 0 == len(keys.started("queued"))

        wait_for(lambda: revokes.of(queued.id), 5, message="the queued task's revoke")
        [broadcast] = revokes.of(queued.id)
        assert broadcast["destination"] is None
        b.barrier()  # B handled every control message sent before
        assert [] == revokes.of(running.id)
        assert "STARTED" == other.state
        # A took the message off its queue; nothing is left for anyone.
        client = redis.Redis.from_url(REDIS_URL)
        assert 0 == client.exists(direct_queue(a), direct_queue(b))
        client.close()
    finally:
        revokes.close()
        cancel(other, reason="done", app=b.app)
    assert_revoked(other, "done")


def _name_worker(result: Any, hostname: str) -> None:
    """Store a STARTED state for ``result`` that names the worker ``hostname``."""
    result.backend.store_result(result.id, {"pid": 1, "hostname": hostname}, "STARTED")


def test_a_gone_worker_falls_back_to_the_ledger_and_keeps_nothing(make_worker, keys: Keys) -> None:
    """Redis.  A running task's STARTED state names a worker that is gone (as after a
    redelivery).  cancel() sends the revoke to the gone worker's queue, where no one
    reads it; the worker that runs the task stops it from the ledger at its next poll,
    with its reason and cleanup.  The gone worker's list has a time to live of at most
    `_direct.TTL` (nothing accumulates), and the control exchange carried nothing.  A
    task whose state names no worker (tracking off on the client) is broadcast."""
    from cancellable.celery import cancel
    from cancellable.celery._direct import TTL, queue_name

    exchange = f"cit-gone-{uuid.uuid4().hex[:8]}"
    b = make_worker(concurrency=2, control_exchange=exchange, extra_env=TRACK, poll_interval=0.5)
    b.app.conf.task_track_started = True
    revokes = Revokes(exchange)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        task = b.send("cit.loop", keys.key("task"), 60.0)
        wait_for(lambda: keys.flag("task", "looping"), 30, message="the task loops")
        wait_state(task, "STARTED", 10)
        gone = f"cit-gone-{uuid.uuid4().hex[:8]}@nowhere"
        _name_worker(task, gone)
        cancel(task, reason="gone", app=b.app)
        assert_revoked(task, "gone")
        assert ["cleanup"] == keys.hooks("task")
        ttl_ms = client.pttl(queue_name(b.app, gone))
        assert 0 < ttl_ms <= TTL * 1000, ttl_ms
        assert 1 == client.llen(queue_name(b.app, gone))

        unknown = b.send("cit.loop", keys.key("unknown"), 60.0)
        wait_for(lambda: keys.flag("unknown", "looping"), 30, message="the task loops")
        b.app.conf.task_track_started = False  # the client cannot know the worker
        cancel(unknown, reason="unknown", app=b.app)
        assert_revoked(unknown, "unknown")
        wait_for(lambda: revokes.of(unknown.id), 5, message="the broadcast")
        assert [] == revokes.of(task.id)
    finally:
        revokes.close()
        client.close()


class AmqpRevokes:
    """Revokes an AMQP control exchange carried: a queue of ours bound to its fanout."""

    def __init__(self, control_exchange: str) -> None:
        self.conn = Connection(AMQP_URL, connect_timeout=3)
        self.queue = Queue(
            f"cit-probe-{uuid.uuid4().hex[:8]}",
            Exchange(f"{control_exchange}.pidbox", type="fanout", durable=False),
            durable=False,
            auto_delete=True,
        )
        self.seen: list[dict[str, Any]] = []
        self.consumer = Consumer(
            self.conn.channel(), [self.queue], callbacks=[self._on], accept=["json"], no_ack=True
        )
        self.consumer.consume()

    def _on(self, body: Any, message: Any) -> None:
        if isinstance(body, dict) and body.get("method") == "revoke":
            self.seen.append(body)

    def drain(self) -> None:
        """Take every message the broker has for us (until none comes for 0.5 s)."""
        while True:
            try:
                self.conn.drain_events(timeout=0.5)
            except TimeoutError:
                return

    def of(self, task_id: str) -> list[dict[str, Any]]:
        self.drain()
        return [m for m in self.seen if task_id in m["arguments"]["task_id"]]

    def close(self) -> None:
        self.conn.release()


def _amqp_queue_exists(name: str) -> bool:
    from amqp.exceptions import NotFound

    with Connection(AMQP_URL, connect_timeout=3) as conn:
        try:
            conn.channel().queue_declare(name, passive=True)
        except NotFound:
            return False
        return True


def test_directed_over_amqp_and_a_dead_workers_queue_goes(make_worker, keys: Keys) -> None:
    """RabbitMQ.  Worker A runs a task (STARTED names A), ledger polls too rare to matter:
    cancel() sends the revoke to A's transient queue; the control exchange's fanout
    carries nothing for it (a queue of ours bound to it receives no revoke), B never
    receives it, and the task stops with its reason and cleanup.  Then A is killed
    (SIGKILL): its queue is deleted by the broker (auto-delete), and a cancel of a task
    whose state still names A is dropped by the broker: nothing accumulates."""
    from cancellable.celery import cancel

    exchange = f"cit-amqp-direct-{uuid.uuid4().hex[:8]}"
    kwargs: dict[str, Any] = {
        "broker": "rabbitmq",
        "concurrency": 1,
        "control_exchange": exchange,
        "extra_env": TRACK,
        "poll_interval": NO_POLL,
    }
    a = make_worker(**kwargs)
    b = make_worker(**kwargs)
    a.app.conf.task_track_started = True
    revokes = AmqpRevokes(exchange)
    try:
        wait_for(lambda: _amqp_queue_exists(direct_queue(a)), 10, message="A's queue")
        running = a.send("cit.loop", keys.key("running"), 60.0)
        other = b.send("cit.loop", keys.key("other"), 60.0)
        for name in ("running", "other"):
            wait_for(lambda name=name: keys.flag(name, "looping"), 30, message=f"{name} loops")
        wait_state(running, "STARTED", 10)
        cancel(running, reason="amqp direct", app=a.app)
        assert_revoked(running, "amqp direct")
        assert ["cleanup"] == keys.hooks("running")
        b.barrier()
        assert [] == revokes.of(running.id)
        assert "STARTED" == other.state

        a.kill9()
        wait_for(lambda: not _amqp_queue_exists(direct_queue(a)), 10, message="A's queue to go")
        stale = a.app.AsyncResult(str(uuid.uuid4()))
        _name_worker(stale, a.name)
        receipt = cancel(stale, reason="to a dead worker", app=a.app)
        assert not receipt.finished
        assert not _amqp_queue_exists(direct_queue(a))
        assert [] == revokes.of(stale.id)
    finally:
        revokes.close()
        cancel(other, reason="done", app=b.app)
    assert_revoked(other, "done")


def test_fresh_workers_stop_every_task_cancelled_as_it_starts(make_worker, keys: Keys) -> None:
    """Two fresh prefork workers (2 children each, STARTED tracked): four rounds of
    four tasks, each cancelled the moment its body records its start (the race
    with the child's row, its wake-up handler and the pool's accepted message).
    Every one ends REVOKED with its reason and its cleanup hook run: no
    cancellation of a running task is lost, directed or not.  (The fleet
    benchmark's "lost first deliveries" were tasks that had ended before their
    cancel, see benchmarks/fleet.py.)"""
    from cancellable.celery import cancel

    token = uuid.uuid4().hex[:8]
    exchange, queue = f"cit-fresh-{token}", f"cit-fresh-q-{token}"
    a = make_worker(concurrency=2, control_exchange=exchange, queue=queue, extra_env=TRACK)
    b = make_worker(concurrency=2, control_exchange=exchange, queue=queue, extra_env=TRACK)
    a.app.conf.task_track_started = True
    cancelled = []
    for round_ in range(4):
        batch = {
            f"r{round_}t{i}": a.send("cit.loop", keys.key(f"r{round_}t{i}"), 60.0, 0.005)
            for i in range(4)
        }
        pending = dict(batch)
        deadline = time.monotonic() + 30
        while pending:
            assert time.monotonic() < deadline, f"not started: {sorted(pending)}"
            for name in [n for n in pending if keys.started(n)]:
                cancel(pending.pop(name), reason=f"fresh {name}", app=a.app)
                cancelled.append(name)
            time.sleep(0.002)
        for name, result in batch.items():
            assert_revoked(result, f"fresh {name}")
            assert ["cleanup"] == keys.hooks(name), name
    assert 16 == len(cancelled)
    assert a.alive()
    assert b.alive()
