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

The same three are measured on a ``--pool=threads`` worker
(``latency.threads_redis.*``) and with RabbitMQ as the broker
(``latency.prefork_rabbitmq.*``) in the full run, and Celery's own
``revoke(terminate=True)`` of the same loop without ``@cancellable`` gives
``latency.terminate.revoke_to_revoked_state`` for comparison.

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

STEPS = ("revoke_to_checkpoint", "revoke_to_cleanup", "revoke_to_revoked_state")

#: Variant -> (pool, broker: None for Redis, else a URL).  The unnamed variant
#: (prefork, Redis broker) has the plain names ``latency.<step>``; the others
#: are ``latency.<variant>.<step>`` and run in the full run only.
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
VARIANTS: dict[str, tuple[str, str | None]] = {
    "": ("prefork", None),
    "threads_redis": ("threads", None),
    "prefork_rabbitmq": ("prefork", AMQP_URL),
}
#: Celery's own ``revoke(terminate=True)`` on the same loop without
#: ``@cancellable`` (prefork, Redis): the child is killed; only the state
#: can be timed.
TERMINATE_NAME = "latency.terminate.revoke_to_revoked_state"


def variant_names(variant: str) -> list[str]:
    """The result names of one variant."""
    prefix = f"latency.{variant}." if variant else "latency."
    return [prefix + step for step in STEPS]


NAMES = (*(n for variant in VARIANTS for n in variant_names(variant)), TERMINATE_NAME)

#: Cancellations per mode: (main variant, other variants, terminate).
SAMPLES = {"full": (60, 30, 20), "quick": (6, 0, 3), "smoke": (2, 0, 1)}
#: How long the task runs before it is revoked (the worker's main process
#: learns the child's pid when the child accepts the task).
RUNNING_BEFORE_REVOKE = 0.1
#: Pause after a terminate, while the pool replaces the killed child.
AFTER_TERMINATE = 1.0
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
    """Run, revoke and observe one ``bench.spin`` task; latencies in ms, keyed by step."""
    key = f"cancellable-bench:latency:{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    try:
        result = worker.app.send_task("bench.spin", args=(key,), task_id=task_id)
        _wait_for(lambda: client.hget(key, "started"), STEP_TIMEOUT, "the task to start", worker)
        time.sleep(RUNNING_BEFORE_REVOKE)
        revoked_at = time.time()
        result.revoke()
        state_at = _wait_for_revoked(pubsub, task_id, worker)
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
        result.forget()
        return {
            "revoke_to_checkpoint": (raised - revoked_at) * 1000.0,
            "revoke_to_cleanup": (cleanup - revoked_at) * 1000.0,
            "revoke_to_revoked_state": (state_at - revoked_at) * 1000.0,
        }
    finally:
        pubsub.close()
        client.delete(key)


def one_terminate_sample(worker: Any, client: Any) -> float:
    """``revoke(terminate=True)`` of a plain busy task: ms until REVOKED is published."""
    key = f"cancellable-bench:terminate:{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    try:
        result = worker.app.send_task("bench.spin_plain", args=(key,), task_id=task_id)
        _wait_for(lambda: client.hget(key, "started"), STEP_TIMEOUT, "the task to start", worker)
        time.sleep(RUNNING_BEFORE_REVOKE)
        revoked_at = time.time()
        result.revoke(terminate=True)
        state_at = _wait_for_revoked(pubsub, task_id, worker)
        result.forget()
        time.sleep(AFTER_TERMINATE)
        return (state_at - revoked_at) * 1000.0
    finally:
        pubsub.close()
        client.delete(key)


def _wait_for_revoked(pubsub: Any, task_id: str, worker: Any) -> float:
    # The Redis result backend publishes each stored state on the task's
    # channel; stamp the REVOKED message when it arrives.
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            if json.loads(message["data"]).get("status") == "REVOKED":
                return time.time()
        elif time.monotonic() > deadline:
            raise LatencyError(f"no REVOKED state published for {task_id}")
        worker.check_alive()


def _sample_variant(
    worker: Any, client: Any, variant: str, count: int, names: list[str]
) -> list[dict[str, Any]]:
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(count):
        for step, value in one_sample(worker, client).items():
            samples[step].append(value)
    records = []
    for name, step in zip(variant_names(variant), STEPS, strict=True):
        median = statistics.median(samples[step])
        log(f"{name}: median {median:.2f} ms over {count} revokes")
        if name in names:
            records.append(measured(name, samples[step], "ms", runs=count))
    return records


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    worker: Any = None,
) -> list[dict[str, Any]]:
    """Result records for the selected latency names.

    ``worker`` (prefork, Redis broker) runs the main variant and the
    terminate comparison; the other variants start their own workers.
    """
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

    from _workers import Worker

    main_count, other_count, terminate_count = SAMPLES[mode]
    client = redis.Redis.from_url(redis_url)
    records: list[dict[str, Any]] = []
    try:
        for variant, (pool, broker) in VARIANTS.items():
            wanted = [n for n in variant_names(variant) if n in names]
            if not wanted:
                continue
            if not variant:
                records += _sample_variant(worker, client, variant, main_count, wanted)
            elif not other_count:
                why = f"only in the full run (the {mode} run starts one prefork worker)"
                records += [skipped(name, why) for name in wanted]
            else:
                with Worker(redis_url, pool=pool, broker_url=broker) as other:
                    log(f"latency: {variant} worker {other.nodename} is up")
                    records += _sample_variant(other, client, variant, other_count, wanted)
        if TERMINATE_NAME in names:
            values = [one_terminate_sample(worker, client) for _ in range(terminate_count)]
            log(f"{TERMINATE_NAME}: median {statistics.median(values):.2f} ms")
            records.append(measured(TERMINATE_NAME, values, "ms", runs=len(values)))
    finally:
        client.close()
    return records
