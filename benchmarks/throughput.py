"""Task throughput through a real prefork worker, plain vs ``@cancellable``.

Each round fills a fresh queue with N no-op tasks (``bench.noop_plain`` or
``bench.noop_cancellable``, identical but for ``@cancellable``), then tells
the running ``celery worker --pool=prefork -c 2`` to consume that queue
(``add_consumer``), so publishing is not part of the measurement.  Each task
counts itself in Redis (one pipelined round trip, the same in both
variants); the round's time runs from the first task's start to the last
task's end, both stamped by the tasks.

Rounds alternate between the two variants (plain, cancellable, cancellable,
plain, ...), and ``throughput.per_task_overhead_us`` is the median over
adjacent pairs of ``1/cancellable - 1/plain`` per task;
``throughput.cancellable_to_plain_ratio`` is the median over the same pairs
of ``cancellable / plain`` tasks per second (1.0: no cost; the target is
>= 0.95).  On a shared 2-core
machine, rounds of the *same* variant differ by 10-20 %, so this figure has
a resolution of a few hundred microseconds per task at best.

The ``throughput.eager_apply_*`` results resolve the decorator's own cost:
``Task.apply()`` (Celery's tracer, run in this process, no broker, no pool)
of the same two no-op tasks, alternated in rounds, in microseconds per task;
``throughput.eager_apply_overhead_us`` is the median paired difference.
The integration claims eagerly applied tasks too (a scope per run, the
revoke checks at start), so this is the per-task work ``@cancellable`` adds.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, log, measured, selected

WORKER_NAMES = (
    "throughput.plain_tasks_per_s",
    "throughput.cancellable_tasks_per_s",
    "throughput.per_task_overhead_us",
    "throughput.cancellable_to_plain_ratio",
)
EAGER_NAMES = (
    "throughput.eager_apply_plain_us",
    "throughput.eager_apply_cancellable_us",
    "throughput.eager_apply_overhead_us",
)
NAMES = WORKER_NAMES + EAGER_NAMES

#: (tasks per round, rounds per variant) per mode.
SETTINGS = {"full": (5000, 6), "quick": (500, 1), "smoke": (50, 1)}
#: (rounds, calls per round) of the eager comparison, per mode.
EAGER_SETTINGS = {"full": (60, 300), "quick": (8, 100), "smoke": (2, 10)}
#: Longest wait for one round.
ROUND_TIMEOUT = 300.0

TASKS = {"plain": "bench.noop_plain", "cancellable": "bench.noop_cancellable"}


class ThroughputError(RuntimeError):
    """A round did not finish in time."""


def one_round(worker: Any, client: Any, variant: str, tasks: int) -> float:
    """Run ``tasks`` no-op tasks of ``variant``; return tasks per second."""
    token = uuid.uuid4().hex[:10]
    key = f"cancellable-bench:throughput:{token}"
    queue = f"{worker.queue}-round-{token}"
    app = worker.app
    name = TASKS[variant]
    with app.producer_or_acquire() as producer:
        for _ in range(tasks):
            app.send_task(name, args=(key, tasks), queue=queue, producer=producer)
    app.control.add_consumer(queue, destination=[worker.nodename], reply=True, timeout=5)
    try:
        deadline = time.monotonic() + ROUND_TIMEOUT
        while client.get(f"{key}:last") is None:
            worker.check_alive()
            if time.monotonic() > deadline:
                done = client.get(f"{key}:count")
                raise ThroughputError(f"round {variant}: only {done} of {tasks} tasks ran")
            time.sleep(0.01)
        first = float(client.get(f"{key}:first"))
        last = float(client.get(f"{key}:last"))
    finally:
        app.control.cancel_consumer(queue, destination=[worker.nodename], reply=True, timeout=5)
        client.delete(f"{key}:first", f"{key}:last", f"{key}:count", queue)
    # N tasks ran between the first start and the last end: N - 1 intervals.
    return (tasks - 1) / (last - first)


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    worker: Any = None,
) -> list[dict[str, Any]]:
    """Result records for the selected throughput names."""
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    records: dict[str, dict[str, Any]] = {}
    if any(name in WORKER_NAMES for name in names):
        if worker is None:
            from _workers import session

            with session(redis_url) as own:
                return run(mode, only, redis_url, own)
        records.update(worker_records(mode, worker))
    if any(name in EAGER_NAMES for name in names):
        records.update(eager_records(mode))
    return [records[name] for name in names]


def worker_records(mode: str, worker: Any) -> dict[str, dict[str, Any]]:
    """The three worker throughput records, from alternating rounds."""
    import redis

    tasks, rounds = SETTINGS[mode]
    client = redis.Redis.from_url(worker.redis_url)
    rates: dict[str, list[float]] = {"plain": [], "cancellable": []}
    overhead_us: list[float] = []
    ratios: list[float] = []
    try:
        one_round(worker, client, "plain", min(tasks, 100))  # warm up the pool
        for k in range(rounds):
            order = ("plain", "cancellable") if k % 2 == 0 else ("cancellable", "plain")
            pair = {variant: one_round(worker, client, variant, tasks) for variant in order}
            for variant, rate in pair.items():
                rates[variant].append(rate)
            overhead_us.append((1 / pair["cancellable"] - 1 / pair["plain"]) * 1e6)
            ratios.append(pair["cancellable"] / pair["plain"])
            log(
                f"throughput round {k + 1}/{rounds}: plain {pair['plain']:.0f}/s, "
                f"cancellable {pair['cancellable']:.0f}/s"
            )
    finally:
        client.close()
    log(
        f"throughput: per-task overhead median {statistics.median(overhead_us):.1f} us, "
        f"cancellable/plain {statistics.median(ratios):.3f} over {rounds} pairs of "
        f"{tasks} tasks"
    )
    return _worker_records(rates, overhead_us, ratios, rounds)


def eager_overhead(rounds: int, calls: int) -> dict[str, list[float]]:
    """µs per ``Task.apply()`` of a plain and a ``@cancellable`` no-op task, per round."""
    from celery import Celery

    from cancellable import cancellable

    app = Celery("cancellable_bench_eager", broker="memory://", backend="disabled://")

    @app.task(name="eager.plain", ignore_result=True)
    def plain() -> None:
        pass

    @app.task(name="eager.cancellable", ignore_result=True)
    @cancellable
    def with_scope() -> None:
        pass

    tasks = {"plain": plain, "cancellable": with_scope}
    for task in tasks.values():  # warm up
        for _ in range(max(10, calls // 10)):
            task.apply()
    values: dict[str, list[float]] = {"plain": [], "cancellable": []}
    for k in range(rounds):
        order = ("plain", "cancellable") if k % 2 == 0 else ("cancellable", "plain")
        for variant in order:
            apply = tasks[variant].apply
            t0 = time.perf_counter()
            for _ in range(calls):
                apply()
            values[variant].append((time.perf_counter() - t0) / calls * 1e6)
    return values


def eager_records(mode: str) -> dict[str, dict[str, Any]]:
    """The three ``throughput.eager_apply_*`` records."""
    rounds, calls = EAGER_SETTINGS[mode]
    values = eager_overhead(rounds, calls)
    diffs = [c - p for c, p in zip(values["cancellable"], values["plain"], strict=True)]
    log(
        f"throughput: eager apply plain {statistics.median(values['plain']):.1f} us, "
        f"cancellable {statistics.median(values['cancellable']):.1f} us"
    )
    return {
        "throughput.eager_apply_plain_us": measured(
            "throughput.eager_apply_plain_us", values["plain"], "us", runs=rounds
        ),
        "throughput.eager_apply_cancellable_us": measured(
            "throughput.eager_apply_cancellable_us", values["cancellable"], "us", runs=rounds
        ),
        "throughput.eager_apply_overhead_us": measured(
            "throughput.eager_apply_overhead_us", diffs, "us", runs=rounds
        ),
    }


def _worker_records(
    rates: dict[str, list[float]], overhead_us: list[float], ratios: list[float], rounds: int
) -> dict[str, dict[str, Any]]:
    return {
        "throughput.cancellable_to_plain_ratio": measured(
            "throughput.cancellable_to_plain_ratio", ratios, "x", runs=rounds, tails=False
        ),
        "throughput.plain_tasks_per_s": measured(
            "throughput.plain_tasks_per_s", rates["plain"], "tasks/s", runs=rounds, tails=False
        ),
        "throughput.cancellable_tasks_per_s": measured(
            "throughput.cancellable_tasks_per_s",
            rates["cancellable"],
            "tasks/s",
            runs=rounds,
            tails=False,
        ),
        "throughput.per_task_overhead_us": measured(
            "throughput.per_task_overhead_us", overhead_us, "us", runs=rounds, tails=False
        ),
    }
