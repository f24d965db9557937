"""The Celery app that the benchmarks' real workers run (``celery -A bench_app worker``).

`_workers.Worker` starts ``celery -A bench_app worker`` with this directory
on ``PYTHONPATH`` and the settings below in the environment, so that each
run has its own queue and its own control exchange and never talks to other
workers on the same Redis.  The tasks serve `real_workers.py` and its parts:

* ``bench.spin``: a ``@cancellable`` busy loop with a checkpoint per
  iteration; it records when it started, when its checkpoint raised and when
  its cleanup hook ran.
* ``bench.nap``: a ``@cancellable`` ``cancellable.sleep`` that a cancel
  wakes at once; it records the same moments (``fleet.py``: many at once
  without taking the CPU).
* ``bench.nap_poll``: a checkpoint every 2 ms between ``time.sleep``
  calls (``fleet.py``'s default task).
* ``bench.spin_async``: a ``@cancellable`` ``async def`` awaiting
  ``asyncio.sleep``; it records when the ``CancelledError`` reached it and
  when its cleanup hook ran.
* ``bench.spin_plain``: the same loop without ``@cancellable``, stopped
  with Celery's own ``revoke(terminate=True)`` for comparison.
* ``bench.abortable_poll``: Celery's ``AbortableTask``, polling
  ``self.is_aborted()`` every 100 ms (the documented idiom), for comparison.
* ``bench.noop_plain`` / ``bench.noop_cancellable``: no-op tasks, the second
  under ``@cancellable``; each counts itself in Redis (throughput).
* ``bench.bulk_count``: counts its runs, result stored (``bulk.py``: a
  cancelled task must never run); the inspect command
  ``cancellable_bench_index`` reports the main process's index size, RSS
  and Celery revoked-set size.
* ``bench.measure_revoked``: times ``current_task.request.revoked()``
  inside a running ``@cancellable`` task (``celery.*``).
* ``bench.ladder_sleep`` / ``bench.ladder_gil``: ``@cancellable`` tasks
  that never reach a checkpoint, blocked in ``time.sleep`` or in one C call
  that holds the GIL (``ladder.py``); ``bench.plain_sleep`` /
  ``bench.plain_gil``, the same without ``@cancellable``, for Celery's
  ``revoke(terminate=True)``.  Each records its pid and start time.
  ``CANCELLABLE_BENCH_KILL_AFTER`` sets ``cancellable_kill_after``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.contrib.abortable import AbortableTask

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cancellable import Cancelled, cancellable, checkpoint, on_cancel
from cancellable import sleep as cancellable_sleep

REDIS_URL = os.environ.get("CANCELLABLE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
#: The broker (Redis by default; ``amqp://...`` for the RabbitMQ latency run).
BROKER_URL = os.environ.get("CANCELLABLE_BENCH_BROKER_URL", REDIS_URL)
QUEUE = os.environ.get("CANCELLABLE_BENCH_QUEUE", "cancellable-bench")
CONTROL_EXCHANGE = os.environ.get("CANCELLABLE_BENCH_CONTROL", "cancellable-bench")

#: A spinning task gives up after this long if nobody cancels it
#: (``CANCELLABLE_BENCH_SPIN_LIMIT``; ``fleet.py`` sets a longer one).
SPIN_LIMIT_SECONDS = float(os.environ.get("CANCELLABLE_BENCH_SPIN_LIMIT", "30"))
#: How often ``bench.abortable_poll`` asks ``is_aborted()``.
ABORT_POLL_SECONDS = 0.1


def make_app(broker_url: str, redis_url: str, queue: str, control_exchange: str) -> Celery:
    """The benchmark app; the client side builds the same one to send and revoke."""
    app = Celery("cancellable_bench", broker=broker_url, backend=redis_url)
    app.conf.update(
        task_default_queue=queue,
        control_exchange=control_exchange,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(BROKER_URL, REDIS_URL, QUEUE, CONTROL_EXCHANGE)
if os.environ.get("CANCELLABLE_BENCH_TRACK_STARTED"):
    # ``fleet.py``: a running task's state names its worker (directed delivery).
    app.conf.task_track_started = True
if os.environ.get("CANCELLABLE_BENCH_DIRECT") == "0":
    app.conf.cancellable_direct_running = False
if os.environ.get("CANCELLABLE_BENCH_KILL_AFTER"):
    app.conf.cancellable_kill_after = float(os.environ["CANCELLABLE_BENCH_KILL_AFTER"])

_client: Any = None
_client_pid = 0


def redis_client() -> Any:
    """A Redis client for this process (made again after a fork)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        import redis

        _client = redis.Redis.from_url(REDIS_URL)
        _client_pid = os.getpid()
    return _client


def _record_cancellation(key: str) -> dict[str, float]:
    """Mark ``started`` in ``key``; return the dict the task puts its ``raised`` time in.

    An ``on_cancel`` hook stamps ``cleanup`` and writes both moments to
    ``key``, after both are taken, so the write is not measured.
    """
    client = redis_client()
    marks: dict[str, float] = {}

    def cleanup() -> None:
        marks["cleanup"] = time.time()
        client.hset(key, mapping=marks)
        # For a waiter that blocks (``fleet.py``: ``BLPOP``) rather than polls.
        client.rpush(f"{key}:done", 1)

    on_cancel(cleanup)
    client.hset(key, mapping={"started": time.time(), "pid": os.getpid()})
    return marks


@app.task(bind=True, name="bench.spin")
@cancellable
def spin(self: Any, key: str) -> str:
    """Loop with a checkpoint per iteration until cancelled; record the moments in ``key``."""
    marks = _record_cancellation(key)
    limit = time.monotonic() + SPIN_LIMIT_SECONDS
    x = 1
    try:
        while time.monotonic() < limit:
            for i in range(1000):
                checkpoint()
                x = (x * 31 + i) % 65521
    except Cancelled:
        marks["raised"] = time.time()
        raise
    return "not cancelled"


@app.task(bind=True, name="bench.nap")
@cancellable
def nap(self: Any, key: str) -> str:
    """``cancellable.sleep`` until cancelled (idle: a fleet of them leaves the CPU free)."""
    marks = _record_cancellation(key)
    try:
        cancellable_sleep(SPIN_LIMIT_SECONDS)
    except Cancelled:
        marks["raised"] = time.time()
        raise
    return "not cancelled"


@app.task(bind=True, name="bench.nap_poll")
@cancellable
def nap_poll(self: Any, key: str) -> str:
    """A checkpoint every 2 ms between ``time.sleep`` calls, until cancelled (nearly idle)."""
    marks = _record_cancellation(key)
    limit = time.monotonic() + SPIN_LIMIT_SECONDS
    try:
        while time.monotonic() < limit:
            checkpoint()
            time.sleep(0.002)
    except Cancelled:
        marks["raised"] = time.time()
        raise
    return "not cancelled"


@app.task(bind=True, name="bench.spin_async")
@cancellable
async def spin_async(self: Any, key: str) -> str:
    """Await a long ``asyncio.sleep`` until cancelled; record the moments in ``key``."""
    marks = _record_cancellation(key)
    try:
        await asyncio.sleep(SPIN_LIMIT_SECONDS)
    except asyncio.CancelledError:
        marks["raised"] = time.time()
        raise
    return "not cancelled"


@app.task(bind=True, name="bench.spin_plain")
def spin_plain(self: Any, key: str) -> str:
    """The same busy loop without ``@cancellable``, for ``revoke(terminate=True)``."""
    client = redis_client()
    client.hset(key, mapping={"started": time.time(), "pid": os.getpid()})
    limit = time.monotonic() + SPIN_LIMIT_SECONDS
    x = 1
    while time.monotonic() < limit:
        for i in range(1000):
            x = (x * 31 + i) % 65521
    return "not terminated"


@app.task(bind=True, base=AbortableTask, name="bench.abortable_poll")
def abortable_poll(self: Any, key: str) -> str:
    """Celery's ``AbortableTask`` idiom: ask ``self.is_aborted()`` every 100 ms.

    Records in ``key`` when it started and when ``is_aborted()`` returned
    True (``noticed``), with the number of polls; then it returns, so the
    task ends as SUCCESS (Celery overwrites the ABORTED state).
    """
    client = redis_client()
    client.hset(key, mapping={"started": time.time(), "pid": os.getpid()})
    limit = time.monotonic() + SPIN_LIMIT_SECONDS
    polls = 0
    while time.monotonic() < limit:
        polls += 1
        if self.is_aborted():
            client.hset(key, mapping={"noticed": time.time(), "polls": polls})
            return "aborted"
        time.sleep(ABORT_POLL_SECONDS)
    return "not aborted"


def _mark_started(key: str) -> None:
    redis_client().hset(key, mapping={"started": time.time(), "pid": os.getpid()})


@app.task(name="bench.ladder_sleep")
@cancellable
def ladder_sleep(key: str) -> str:
    """Blocked in ``time.sleep`` with no checkpoint (``ladder.py``)."""
    _mark_started(key)
    time.sleep(3600)
    return "slept"


@app.task(name="bench.ladder_gil")
@cancellable
def ladder_gil(key: str) -> int:
    """Stuck in one C call that holds the GIL (``ladder.py``)."""
    _mark_started(key)
    return sum(range(10**12))


@app.task(name="bench.plain_sleep")
def plain_sleep(key: str) -> str:
    """``bench.ladder_sleep`` without ``@cancellable``."""
    _mark_started(key)
    time.sleep(3600)
    return "slept"


@app.task(name="bench.plain_gil")
def plain_gil(key: str) -> int:
    """``bench.ladder_gil`` without ``@cancellable``."""
    _mark_started(key)
    return sum(range(10**12))


def _count(key: str, total: int) -> None:
    client = redis_client()
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.setnx(f"{key}:first", now)
    pipe.incr(f"{key}:count")
    _, count = pipe.execute()
    if count == total:
        client.set(f"{key}:last", time.time())


@app.task(name="bench.noop_plain", ignore_result=True)
def noop_plain(key: str, total: int) -> None:
    """A no-op task (it only counts itself)."""
    _count(key, total)


@app.task(name="bench.noop_cancellable", ignore_result=True)
@cancellable
def noop_cancellable(key: str, total: int) -> None:
    """The same no-op task under ``@cancellable``."""
    _count(key, total)


@app.task(bind=True, name="bench.measure_revoked")
@cancellable
def measure_revoked(self: Any, seconds_per_value: float, values: int) -> dict[str, Any]:
    """Time ``current_task.request.revoked()`` per call, with its baselines, in this task."""
    import real_workers

    return real_workers.measure_here(seconds_per_value, values)


@app.task(name="bench.bulk_count")
def bulk_count(key: str) -> None:
    """Count a run in ``key`` (``bulk.py``: a cancelled task must never get here).

    Its result is stored (unlike the no-op tasks), so a discarded task ends
    as REVOKED in the result backend, which ``bulk.py`` checks.
    """
    redis_client().incr(key)


def _index_report(state: Any, **kwargs: Any) -> dict[str, Any]:
    """What the worker's main process holds: its index, Celery's revoked set, its RSS."""
    from celery.worker import state as worker_state

    import _internals

    with open("/proc/self/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    try:
        targets = _internals.index_size()
    except _internals.PrivateNameMoved as exc:
        return {"error": str(exc)}
    return {
        "targets": targets,
        "celery_revoked": len(worker_state.revoked),
        "celery_revoked_maxlen": worker_state.revoked.maxlen,
        "rss_kb": rss_kb,
    }


def _register_control() -> None:
    # ``bulk.py`` asks the worker's main process (not a pool child, whose
    # index is the copy it was forked with) for the size of its index.
    from celery.worker.control import inspect_command

    inspect_command(name="cancellable_bench_index")(_index_report)


_register_control()
