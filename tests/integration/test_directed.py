"""A cancel of a running task goes to the worker that runs it (issue 22, point 2).

With ``task_track_started`` on, a running task's STARTED state names its
worker; `cancel()` then sends the revoke to that worker only
(``destination=``), and the other workers learn the cancellation from the
ledger.  A queued task's cancel still reaches every worker.  Two real
prefork workers share one control exchange; a pattern subscriber on the
exchange records each revoke as the broker delivered it.
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

from .conftest import Keys, assert_revoked, wait_for, wait_state
from .settings import REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TRACK = {"CIT_SETTINGS": json.dumps({"task_track_started": True})}


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


def test_a_running_task_is_revoked_on_its_worker_only(make_worker, keys: Keys) -> None:
    """A task running on worker A (STARTED names A): cancel() publishes the revoke with
    destination [A]; the task stops at a checkpoint with its reason and cleanup.  A queued
    task's cancel is published to every worker (no destination) and it never runs; the
    other worker B learns both from the ledger and keeps running its own task."""
    from cancellable.celery import cancel

    exchange = f"cit-direct-{uuid.uuid4().hex[:8]}"
    a = make_worker(concurrency=1, control_exchange=exchange, extra_env=TRACK)
    b = make_worker(concurrency=1, control_exchange=exchange, extra_env=TRACK)
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
        [direct] = revokes.of(running.id)
        assert [a.name] == direct["destination"]
        [broadcast] = revokes.of(queued.id)
        assert broadcast["destination"] is None
        time.sleep(1.0)  # several poll intervals: B read both from the ledger
        assert "STARTED" == other.state
        b.barrier()
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
