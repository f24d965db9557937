"""Delivery latency over a real prefork worker: revoke -> raise -> cleanup -> REVOKED.

Each sample starts ``bench.spin`` (a ``@cancellable`` busy loop with a
checkpoint per iteration) on a real ``celery worker --pool=prefork -c 2``,
waits until it has been running for a moment, then calls the standard
``AsyncResult.revoke()`` and measures, from just before that call:

* ``latency.revoke_to_checkpoint``: until the task's checkpoint raised
  `Cancelled` (``time.time()`` taken in the task's ``except`` block);
* ``latency.revoke_to_cleanup``: until its ``on_cancel`` hook ran;
* ``latency.revoke_to_revoked_state``: until the REVOKED state was published
  by the result backend (the client is subscribed to the task's result
  channel before it revokes, and stamps the message on arrival).

All clocks are ``time.time()`` on the same machine.  Times in milliseconds.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, log, measured, selected, skipped
from _integration import celery_integration

NAMES = (
    "latency.revoke_to_checkpoint",
    "latency.revoke_to_cleanup",
    "latency.revoke_to_revoked_state",
)

#: Cancellations per mode.
SAMPLES = {"full": 60, "quick": 6, "smoke": 2}
#: How long the task runs before it is revoked (the worker's main process
#: learns the child's pid when the child accepts the task).
RUNNING_BEFORE_REVOKE = 0.1
#: Longest wait for any one step.
STEP_TIMEOUT = 15.0


class LatencyError(RuntimeError):
    """A sample did not complete in time."""


def _wait_for(predicate: Any, timeout: float, what: str, worker: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        worker.check_alive()
        if time.monotonic() > deadline:
            raise LatencyError(f"timed out waiting for {what}")
        time.sleep(0.002)


def one_sample(worker: Any, client: Any) -> dict[str, float]:
    """Run, revoke and observe one ``bench.spin`` task; latencies in ms."""
    key = f"cancellable-bench:latency:{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    channel = f"celery-task-meta-{task_id}"
    pubsub.subscribe(channel)
    try:
        result = worker.app.send_task("bench.spin", args=(key,), task_id=task_id)
        _wait_for(lambda: client.hget(key, "started"), STEP_TIMEOUT, "the task to start", worker)
        time.sleep(RUNNING_BEFORE_REVOKE)
        revoked_at = time.time()
        result.revoke()
        state_at = None
        deadline = time.monotonic() + STEP_TIMEOUT
        while state_at is None:
            message = pubsub.get_message(timeout=0.5)
            if message is not None and message["type"] == "message":
                if json.loads(message["data"]).get("status") == "REVOKED":
                    state_at = time.time()
            elif time.monotonic() > deadline:
                raise LatencyError(f"no REVOKED state published for {task_id}")
            worker.check_alive()
        marks = _wait_for(
            lambda: (lambda m: m if b"cleanup" in m else None)(client.hgetall(key)),
            STEP_TIMEOUT,
            "the cleanup marks",
            worker,
        )
        raised = float(marks[b"raised"])
        cleanup = float(marks[b"cleanup"])
        if result.state != "REVOKED":
            raise LatencyError(f"task {task_id} ended as {result.state}, expected REVOKED")
        return {
            "latency.revoke_to_checkpoint": (raised - revoked_at) * 1000.0,
            "latency.revoke_to_cleanup": (cleanup - revoked_at) * 1000.0,
            "latency.revoke_to_revoked_state": (state_at - revoked_at) * 1000.0,
        }
    finally:
        pubsub.close()
        client.delete(key)


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    worker: Any = None,
) -> list[dict[str, Any]]:
    """Result records for the selected latency names."""
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    _module, reason = celery_integration()
    if reason is not None:
        return [skipped(name, reason) for name in names]
    if worker is None:
        from _workers import session

        with session(redis_url) as own:
            return run(mode, only, redis_url, own)
    import redis

    client = redis.Redis.from_url(redis_url)
    samples: dict[str, list[float]] = {name: [] for name in NAMES}
    try:
        for _ in range(SAMPLES[mode]):
            for name, value in one_sample(worker, client).items():
                samples[name].append(value)
    finally:
        client.close()
    for name in NAMES:
        median = statistics.median(samples[name])
        log(f"{name}: median {median:.2f} ms over {len(samples[name])} revokes")
    return [measured(name, samples[name], "ms", runs=len(samples[name])) for name in names]
