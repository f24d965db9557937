"""Delivery latency over real workers: revoke -> raise -> cleanup -> REVOKED, and Celery's own ways.

Each sample starts ``bench.spin`` (a ``@cancellable`` busy loop with a
checkpoint per iteration) on a real ``celery worker -c 2``, waits until it
has been running for a moment, then calls the standard
``AsyncResult.revoke()`` and measures, from just before that call:

* ``latency.revoke_to_checkpoint``: until the task's checkpoint raised
  `Cancelled` (``time.time()`` taken in the task's ``except`` block);
* ``latency.revoke_to_cleanup``: until its ``on_cancel`` hook ran;
* ``latency.revoke_to_revoked_state``: until the REVOKED state was published
  by the result backend (the client is subscribed to the task's result
  channel before it revokes, and stamps the message on arrival).

The unnamed variant is ``--pool=prefork`` with a Redis broker; the full run
also measures ``--pool=threads`` (``latency.threads_redis.*``) and RabbitMQ
as the broker (``latency.prefork_rabbitmq.*``, ``latency.threads_rabbitmq.*``),
each on its own worker.

``latency.async.*`` is the same measurement for an ``async def`` body
(``bench.spin_async``, awaiting ``asyncio.sleep``) on the same prefork +
Redis worker as the unnamed variant, in every mode; "checkpoint" there is
the moment the ``asyncio.CancelledError`` reached the coroutine.  The full
run adds ``latency.async_threads_redis.*`` on a threads-pool worker.

Celery's own ways, on the prefork + Redis worker, for comparison:

* ``latency.terminate.*``: ``revoke(terminate=True)`` of the same loop
  without ``@cancellable`` (``bench.spin_plain``).  From just before the
  call: until the pool child that ran the task is dead (its ``/proc/<pid>``
  entry is gone or a zombie: ``to_process_death``), until the worker's main
  process has ``concurrency`` live children again, none of them the dead one
  (``to_pool_full``), and until REVOKED is published
  (``revoke_to_revoked_state``).  The client polls ``/proc`` every 0.5 ms.
* ``latency.abortable_100ms.*``: ``celery.contrib.abortable.AbortableTask``
  polling ``self.is_aborted()`` every 100 ms (``bench.abortable_poll``);
  the client calls ``AbortableAsyncResult(id).abort()`` at a random phase of
  the polling period and measures, from ``abort()`` returning, until the task
  saw ``is_aborted()`` return True (``to_noticed``) and until its final
  state (SUCCESS: the task returns once it notices) was published
  (``to_final_state``).

The raw samples of the last `run` are kept in `RAW` (name -> values), for
the CDF plot (`plot_cdf`).  All clocks are ``time.time()`` on the same
machine.  Times in milliseconds.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, log, measured, percentile, selected, skipped

STEPS = ("revoke_to_checkpoint", "revoke_to_cleanup", "revoke_to_revoked_state")

#: Variant -> (pool, broker: None for Redis, else a URL, task).  The unnamed
#: variant (prefork, Redis broker) has the plain names ``latency.<step>``; the
#: others are ``latency.<variant>.<step>``.  Prefork + Redis variants share the
#: main worker and run in every mode; the others start a worker of their own
#: and run in the full run only.
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "": ("prefork", None, "bench.spin"),
    "async": ("prefork", None, "bench.spin_async"),
    "prefork_rabbitmq": ("prefork", AMQP_URL, "bench.spin"),
    "threads_redis": ("threads", None, "bench.spin"),
    "async_threads_redis": ("threads", None, "bench.spin_async"),
    "threads_rabbitmq": ("threads", AMQP_URL, "bench.spin"),
}
#: Celery's own ``revoke(terminate=True)`` on the same loop without
#: ``@cancellable`` (prefork, Redis).
TERMINATE_STEPS = ("to_process_death", "to_pool_full", "revoke_to_revoked_state")
TERMINATE_NAMES = tuple(f"latency.terminate.{step}" for step in TERMINATE_STEPS)
#: Celery's ``AbortableTask``, polled every 100 ms (prefork, Redis).
ABORTABLE_STEPS = ("to_noticed", "to_final_state")
ABORTABLE_NAMES = tuple(f"latency.abortable_100ms.{step}" for step in ABORTABLE_STEPS)
#: Kept for compatibility: the REVOKED-state name of the terminate comparison.
TERMINATE_NAME = "latency.terminate.revoke_to_revoked_state"


def variant_names(variant: str) -> list[str]:
    """The result names of one variant."""
    prefix = f"latency.{variant}." if variant else "latency."
    return [prefix + step for step in STEPS]


NAMES = (
    *(n for variant in VARIANTS for n in variant_names(variant)),
    *TERMINATE_NAMES,
    *ABORTABLE_NAMES,
)

#: Samples per mode: the main variant, each other variant (0: not run),
#: terminate, abortable.
SAMPLES = {
    "full": {"main": 200, "others": 200, "terminate": 200, "abortable": 200},
    "quick": {"main": 8, "others": 0, "terminate": 3, "abortable": 3},
    "smoke": {"main": 2, "others": 0, "terminate": 1, "abortable": 1},
}
#: How long the task runs before it is revoked (the worker's main process
#: learns the child's pid when the child accepts the task).
RUNNING_BEFORE_REVOKE = 0.1
#: Longest wait for any one step.
STEP_TIMEOUT = 15.0
#: Poll interval of the client for /proc and the result channel.
POLL = 0.0005

#: Raw samples of the last `run`, in ms, by result name.
RAW: dict[str, list[float]] = {}


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


def one_sample(worker: Any, client: Any, task: str = "bench.spin") -> dict[str, float]:
    """Run, revoke and observe one ``task`` (``bench.spin``); latencies in ms, keyed by step."""
    key = f"cancellable-bench:latency:{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    try:
        result = worker.app.send_task(task, args=(key,), task_id=task_id)
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


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has died (no ``/proc`` entry, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state follows the command name in parentheses, which may hold spaces.
    return stat[stat.rindex(")") + 2 :][:1] in ("Z", "X", "x")


def live_children(pid: int) -> set[int]:
    """Pids of the live (not zombie) child processes of ``pid``, from ``/proc``."""
    kids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return kids
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except FileNotFoundError:
            continue
        kids.update(int(p) for p in text.split())
    return {kid for kid in kids if not process_gone(kid)}


def _wait_pool_full(worker: Any) -> set[int]:
    want = worker.concurrency
    return _wait_for(
        lambda: (lambda k: k if len(k) >= want else None)(live_children(worker.pid)),
        STEP_TIMEOUT,
        "a full pool",
        worker,
    )


def one_terminate_sample(worker: Any, client: Any) -> dict[str, float]:
    """``revoke(terminate=True)`` of a plain busy task; ms to death, full pool, REVOKED."""
    key = f"cancellable-bench:terminate:{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    try:
        _wait_pool_full(worker)
        result = worker.app.send_task("bench.spin_plain", args=(key,), task_id=task_id)
        _wait_for(lambda: client.hget(key, "started"), STEP_TIMEOUT, "the task to start", worker)
        child = int(client.hget(key, "pid"))
        if child not in live_children(worker.pid):
            raise LatencyError(f"pid {child} of task {task_id} is not a pool child")
        time.sleep(RUNNING_BEFORE_REVOKE)
        revoked_at = time.time()
        result.revoke(terminate=True)
        marks: dict[str, float] = {}
        deadline = time.monotonic() + STEP_TIMEOUT
        while len(marks) < 3:
            if "death" not in marks and process_gone(child):
                marks["death"] = time.time()
            if "death" in marks and "pool" not in marks:
                kids = live_children(worker.pid)
                if child not in kids and len(kids) >= worker.concurrency:
                    marks["pool"] = time.time()
            if "state" not in marks:
                status = _next_status(pubsub)
                if status == "REVOKED":
                    marks["state"] = time.time()
            if time.monotonic() > deadline:
                raise LatencyError(f"terminate of {task_id}: only saw {sorted(marks)}")
            worker.check_alive()
            time.sleep(POLL)
        result.forget()
        return {
            "to_process_death": (marks["death"] - revoked_at) * 1000.0,
            "to_pool_full": (marks["pool"] - revoked_at) * 1000.0,
            "revoke_to_revoked_state": (marks["state"] - revoked_at) * 1000.0,
        }
    finally:
        pubsub.close()
        client.delete(key)


def one_abortable_sample(worker: Any, client: Any, phase: float = 0.0) -> dict[str, float]:
    """``AbortableAsyncResult.abort()`` of a task polling every 100 ms; ms to noticed, to final.

    ``phase`` (seconds, 0 to 0.1) is added to the wait before aborting, so
    that aborts fall at random points of the polling period.
    """
    from celery.contrib.abortable import AbortableAsyncResult

    key = f"cancellable-bench:abortable:{uuid.uuid4().hex}"
    task_id = str(uuid.uuid4())
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    try:
        worker.app.send_task("bench.abortable_poll", args=(key,), task_id=task_id)
        _wait_for(lambda: client.hget(key, "started"), STEP_TIMEOUT, "the task to start", worker)
        time.sleep(RUNNING_BEFORE_REVOKE + phase)
        result = AbortableAsyncResult(task_id, app=worker.app)
        result.abort()
        aborted_at = time.time()
        final_at, meta = _wait_for_status(pubsub, task_id, worker, lambda s: s == "SUCCESS")
        marks = _wait_for(
            lambda: (lambda m: m if b"noticed" in m else None)(client.hgetall(key)),
            STEP_TIMEOUT,
            "the task to notice the abort",
            worker,
        )
        if meta.get("result") != "aborted":
            raise LatencyError(f"task {task_id} returned {meta.get('result')!r}, not 'aborted'")
        result.forget()
        return {
            "to_noticed": (float(marks[b"noticed"]) - aborted_at) * 1000.0,
            "to_final_state": (final_at - aborted_at) * 1000.0,
        }
    finally:
        pubsub.close()
        client.delete(key)


def _next_status(pubsub: Any) -> str | None:
    message = pubsub.get_message(timeout=0)
    if message is not None and message["type"] == "message":
        return json.loads(message["data"]).get("status")
    return None


def _wait_for_status(
    pubsub: Any, task_id: str, worker: Any, accept: Callable[[str], bool]
) -> tuple[float, dict[str, Any]]:
    # The Redis result backend publishes each stored state on the task's
    # channel; stamp the first accepted one when it arrives.
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            meta = json.loads(message["data"])
            if accept(meta.get("status")):
                return time.time(), meta
        elif time.monotonic() > deadline:
            raise LatencyError(f"no final state published for {task_id}")
        worker.check_alive()


def _wait_for_revoked(pubsub: Any, task_id: str, worker: Any) -> float:
    return _wait_for_status(pubsub, task_id, worker, lambda s: s == "REVOKED")[0]


def _records(
    names: list[str], all_names: list[str], samples: dict[str, list[float]], count: int
) -> list[dict[str, Any]]:
    """Records (and `RAW` entries) for the wanted names; log each distribution."""
    records = []
    for name, step in zip(all_names, samples, strict=True):
        values = samples[step]
        RAW[name] = list(values)
        log(
            f"{name}: p50 {statistics.median(values):.2f} p90 {percentile(values, 90):.2f} "
            f"p99 {percentile(values, 99):.2f} max {max(values):.2f} ms over {count}"
        )
        if name in names:
            records.append(measured(name, values, "ms", runs=count))
    return records


def _sample_variant(
    worker: Any, client: Any, variant: str, count: int, names: list[str]
) -> list[dict[str, Any]]:
    task = VARIANTS[variant][2]
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(count):
        for step, value in one_sample(worker, client, task).items():
            samples[step].append(value)
    return _records(names, variant_names(variant), samples, count)


def _sample_terminate(worker: Any, client: Any, count: int, names: list[str]) -> list[Any]:
    samples: dict[str, list[float]] = {step: [] for step in TERMINATE_STEPS}
    for _ in range(count):
        for step, value in one_terminate_sample(worker, client).items():
            samples[step].append(value)
    _wait_pool_full(worker)
    return _records(names, list(TERMINATE_NAMES), samples, count)


def _sample_abortable(worker: Any, client: Any, count: int, names: list[str]) -> list[Any]:
    from bench_app import ABORT_POLL_SECONDS

    rng = random.Random(20261124)
    samples: dict[str, list[float]] = {step: [] for step in ABORTABLE_STEPS}
    for _ in range(count):
        phase = rng.uniform(0.0, ABORT_POLL_SECONDS)
        for step, value in one_abortable_sample(worker, client, phase).items():
            samples[step].append(value)
    return _records(names, list(ABORTABLE_NAMES), samples, count)


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    worker: Any = None,
) -> list[dict[str, Any]]:
    """Result records for the selected latency names.

    ``worker`` (prefork, Redis broker) runs the main variant and Celery's
    own ways; the other variants start their own workers.
    """
    RAW.clear()
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    if worker is None:
        from _workers import session

        with session(redis_url) as own:
            return run(mode, only, redis_url, own)
    import redis

    from _workers import Worker

    counts = SAMPLES[mode]
    client = redis.Redis.from_url(redis_url)
    records: list[dict[str, Any]] = []
    try:
        for variant, (pool, broker, _task) in VARIANTS.items():
            wanted = [n for n in variant_names(variant) if n in names]
            if not wanted:
                continue
            if pool == "prefork" and broker is None:
                records += _sample_variant(worker, client, variant, counts["main"], wanted)
            elif not counts["others"]:
                why = f"only in the full run (the {mode} run starts one prefork worker)"
                records += [skipped(name, why) for name in wanted]
            else:
                with Worker(redis_url, pool=pool, broker_url=broker) as other:
                    log(f"latency: {variant} worker {other.nodename} is up")
                    records += _sample_variant(other, client, variant, counts["others"], wanted)
        wanted = [n for n in TERMINATE_NAMES if n in names]
        if wanted:
            records += _sample_terminate(worker, client, counts["terminate"], wanted)
        wanted = [n for n in ABORTABLE_NAMES if n in names]
        if wanted:
            records += _sample_abortable(worker, client, counts["abortable"], wanted)
    finally:
        client.close()
    order = {name: k for k, name in enumerate(NAMES)}
    return sorted(records, key=lambda r: order[r["name"]])


#: The curves of the CDF plot: result name -> legend label.
CDF_CURVES = {
    "latency.revoke_to_checkpoint": "prefork, Redis: revoke \u2192 checkpoint raises",
    "latency.async.revoke_to_checkpoint": "prefork, Redis, async def: \u2192 CancelledError",
    "latency.prefork_rabbitmq.revoke_to_checkpoint": "prefork, RabbitMQ: \u2192 checkpoint",
    "latency.threads_redis.revoke_to_checkpoint": "threads, Redis: \u2192 checkpoint",
    "latency.async_threads_redis.revoke_to_checkpoint": "threads, Redis, async def: \u2192 raised",
    "latency.threads_rabbitmq.revoke_to_checkpoint": "threads, RabbitMQ: \u2192 checkpoint",
    "latency.terminate.to_process_death": "revoke(terminate=True) \u2192 child dead",
    "latency.terminate.to_pool_full": "revoke(terminate=True) \u2192 pool full again",
    "latency.abortable_100ms.to_noticed": "AbortableTask, 100 ms poll: abort() \u2192 noticed",
}


def plot_cdf(raw: dict[str, list[float]], path: Path) -> list[str]:
    """Write the CDF of the delivery latencies in ``raw`` to ``path`` (PNG).

    One empirical CDF per name of `CDF_CURVES` that has samples, on a log
    time axis.  Returns the names plotted; raises ValueError if none has.
    """
    curves = [name for name in CDF_CURVES if raw.get(name)]
    if not curves:
        raise ValueError("no latency samples to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for name in curves:
        # cancellable solid (prefork) or dashed (threads); Celery's own ways dotted.
        style = "-" if "prefork" in CDF_CURVES[name] else "--" if "threads" in name else ":"
        values = sorted(raw[name])
        n = len(values)
        ys = [(i + 1) / n for i in range(n)]
        ax.step(
            values,
            ys,
            where="post",
            linestyle=style,
            linewidth=1.8 if style == ":" else 1.5,
            label=f"{CDF_CURVES[name]} (n={n})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("latency from revoke() / abort() (ms, log scale)")
    ax.set_ylabel("fraction of cancellations")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    ax.set_title("Delivery latency: cancellable vs Celery's own ways")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return curves
