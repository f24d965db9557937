"""The real-worker harness: delivery latency, throughput, in-task costs, peers and bulk.

Everything here runs against real workers (`_workers`), on Redis DB 14 of
``redis_url``.  One ``celery -A bench_app worker --pool=prefork -c 2`` with
a Redis broker serves every part in every mode; its Celery revoked set is
capped at `bulk.REVOKES_MAX` ids (so the bulk part shows the library's index
at work) and its ``cancellable_kill_after`` is `ladder.KILL_AFTER`.  The
full run adds a worker per other pool and broker, and the dramatiq worker.

Parts (result names):

* ``latency.*``: each sample starts ``bench.spin`` (a ``@cancellable`` busy
  loop with a checkpoint per iteration), lets it run 100 ms, calls the
  standard ``AsyncResult.revoke()`` and measures, from just before that
  call, until the checkpoint raised (``revoke_to_checkpoint``), until the
  ``on_cancel`` hook ran (``revoke_to_cleanup``) and until the REVOKED state
  was published (``revoke_to_revoked_state``: the client subscribed to the
  task's result channel before revoking).  ``latency.async.*`` is the same
  for an ``async def`` body awaiting ``asyncio.sleep`` (``bench.spin_async``).
  The full run adds ``latency.<pool>_<broker>.*`` (threads pool, RabbitMQ).
  Celery's own ways beside it: ``latency.terminate.*``,
  ``revoke(terminate=True)`` of the same loop without ``@cancellable`` (until
  the pool child is dead, until the pool has its children again, until
  REVOKED), and ``latency.abortable_100ms.*``, an ``AbortableTask`` polling
  ``is_aborted()`` every 100 ms, aborted at a random phase (until it noticed,
  until its final state was published).  All clocks are ``time.time()`` on
  the same machine; milliseconds.
* ``throughput.*``: rounds of N no-op tasks, plain and ``@cancellable``, in
  alternation on a queue the worker starts consuming once it is full: tasks
  per second, and per adjacent pair the ratio and the per-task difference;
  ``throughput.eager_apply_*``, the same two tasks through ``Task.apply()``
  in this process (Celery's tracer, no broker): the decorator's own cost.
* ``celery.*``: ``current_task.request.revoked()``, ``self.request.revoked()``
  and ``checkpoint()`` timed inside a running task, with the harness loop,
  the empty call and a bare loop iteration timed in the same task for the
  ratios (`measure_here`).
* ``peers.latency.*``: dramatiq-abort's ``abort(message_id)`` of a busy
  dramatiq actor, 100 ms and 1.2 s after it started, sampled in turns with
  our revoke of ``bench.spin``, so both see the same load.
* ``bulk.*`` (`bulk.py`) and, in the full run, ``ladder.*`` (`ladder.py`).

`RAW` keeps the latency samples of the last run (for the CDF plot and the
maxima).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bulk
import ladder
from _common import DEFAULT_REDIS_URL, log, measured, percentile, ratios, selected, skipped
from _workers import (
    DramatiqWorker,
    Subprocess,
    Worker,
    WorkerError,
    flush_benchmark_db,
    live_children,
    process_gone,
    wait_for,
)

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
STEPS = ("revoke_to_checkpoint", "revoke_to_cleanup", "revoke_to_revoked_state")
#: Variant -> (pool, broker URL or None for Redis, task).  "" and "async" run
#: on the shared worker in every mode; the others on workers of their own,
#: in the full run only.
VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "": ("prefork", None, "bench.spin"),
    "async": ("prefork", None, "bench.spin_async"),
    "prefork_rabbitmq": ("prefork", AMQP_URL, "bench.spin"),
    "threads_redis": ("threads", None, "bench.spin"),
    "async_threads_redis": ("threads", None, "bench.spin_async"),
    "threads_rabbitmq": ("threads", AMQP_URL, "bench.spin"),
}
TERMINATE = tuple(
    f"latency.terminate.{s}"
    for s in ("to_process_death", "to_pool_full", "revoke_to_revoked_state")
)
ABORTABLE = tuple(f"latency.abortable_100ms.{s}" for s in ("to_noticed", "to_final_state"))
THROUGHPUT = tuple(
    f"throughput.{s}"
    for s in (
        "plain_tasks_per_s",
        "cancellable_tasks_per_s",
        "per_task_overhead_us",
        "cancellable_to_plain_ratio",
    )
)
EAGER = tuple(f"throughput.eager_apply_{s}_us" for s in ("plain", "cancellable", "overhead"))
IN_TASK = {
    "celery.request_revoked": "current_task.request.revoked()",
    "celery.bound_request_revoked": "_task.request.revoked()",
    "celery.checkpoint_in_task": "checkpoint()",
}
PEERS = (
    "peers.latency.cancellable.revoke_to_checkpoint",
    "peers.latency.dramatiq_abort.abort_to_raise",
    "peers.latency.dramatiq_abort_settled.abort_to_raise",
)


def variant_names(variant: str) -> list[str]:
    """The result names of one latency variant."""
    prefix = f"latency.{variant}." if variant else "latency."
    return [prefix + step for step in STEPS]


LATENCY = (*(n for v in VARIANTS for n in variant_names(v)), *TERMINATE, *ABORTABLE)


def names(mode: str) -> tuple[str, ...]:
    """Every result name of a run in ``mode`` (the bulk sizes depend on it)."""
    return (*LATENCY, *THROUGHPUT, *EAGER, *IN_TASK, *PEERS, *bulk.names(mode), *ladder.NAMES)


#: Samples and sizes per mode.  latency: main variants, other variants (0:
#: not run), terminate, abortable; throughput: tasks per round, pairs of
#: rounds, eager rounds, calls per eager round; in_task: seconds per value,
#: values; peers: rounds, a settled sample every this many rounds.
SETTINGS: dict[str, dict[str, tuple[Any, ...]]] = {
    "full": {
        "latency": (200, 200, 200, 200),
        "throughput": (5000, 6, 60, 300),
        "in_task": (0.05, 40),
        "peers": (200, 4),
    },
    "quick": {
        "latency": (8, 0, 1, 3),
        "throughput": (200, 1, 8, 100),
        "in_task": (0.01, 5),
        "peers": (2, 2),
    },
    "smoke": {
        "latency": (2, 0, 1, 1),
        "throughput": (50, 1, 2, 10),
        "in_task": (0.001, 1),
        "peers": (1, 1),
    },
}
#: How long a task runs before it is cancelled; dramatiq-abort's settled case
#: waits past its watcher's 1 s cycle.
RUNNING_BEFORE_REVOKE = 0.1
RUNNING_BEFORE_ABORT_SETTLED = 1.2
#: Longest wait for any one step.
STEP_TIMEOUT = 15.0
#: Raw latency samples of the last `run`, in ms, by result name.
RAW: dict[str, list[float]] = {}


# --------------------------------------------------------------------------
# Latency samples.


@contextlib.contextmanager
def _running(
    worker: Worker, client: Any, task: str, delay: float
) -> Iterator[tuple[str, Any, Any]]:
    """``task`` started on ``worker`` and run for ``delay`` s: its hash key, result, subscription.

    The task marks ``started`` (and its moments) in the hash; the client is
    subscribed to the task's result channel before it is sent.
    """
    task_id, key = str(uuid.uuid4()), f"cancellable-bench:sample:{uuid.uuid4().hex}"
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    try:
        result = worker.app.send_task(task, args=(key,), task_id=task_id)
        wait_for(lambda: client.hget(key, "started"), STEP_TIMEOUT, "the task to start", worker)
        time.sleep(delay)
        yield key, result, pubsub
        result.forget()
    finally:
        pubsub.close()
        client.delete(key)


def _marks(worker: Subprocess, client: Any, key: str, field: bytes) -> dict[bytes, bytes]:
    """The task's hash once it holds ``field``."""
    return wait_for(
        lambda: (lambda m: m if field in m else None)(client.hgetall(key)),
        STEP_TIMEOUT,
        f"the task to record {field.decode()}",
        worker,
    )


def _wait_for_status(pubsub: Any, worker: Subprocess, status: str) -> tuple[float, dict[str, Any]]:
    # The Redis result backend publishes each stored state on the task's channel.
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            meta = json.loads(message["data"])
            if meta.get("status") == status:
                return time.time(), meta
        elif time.monotonic() > deadline:
            raise WorkerError(f"no {status} state was published")
        worker.check_alive()


def revoke_sample(worker: Worker, client: Any, task: str = "bench.spin") -> dict[str, float]:
    """Run, revoke and observe one ``task``; ms from the revoke to each of `STEPS`."""
    with _running(worker, client, task, RUNNING_BEFORE_REVOKE) as (key, result, pubsub):
        revoked_at = time.time()
        result.revoke()
        state_at, _meta = _wait_for_status(pubsub, worker, "REVOKED")
        marks = _marks(worker, client, key, b"cleanup")
    moments = (float(marks[b"raised"]), float(marks[b"cleanup"]), state_at)
    return {step: (t - revoked_at) * 1000 for step, t in zip(STEPS, moments, strict=True)}


def terminate_sample(worker: Worker, client: Any) -> dict[str, float]:
    """``revoke(terminate=True)`` of a plain busy task; ms to death, full pool, REVOKED."""
    wait_pool_full(worker)
    with _running(worker, client, "bench.spin_plain", RUNNING_BEFORE_REVOKE) as (
        key,
        result,
        pubsub,
    ):
        child = int(client.hget(key, "pid"))
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
            message = pubsub.get_message(timeout=0)
            published = message and message["type"] == "message" and json.loads(message["data"])
            if published and published.get("status") == "REVOKED":
                marks.setdefault("state", time.time())
            if time.monotonic() > deadline:
                raise WorkerError(f"terminate of {result.id}: only saw {sorted(marks)}")
            worker.check_alive()
            time.sleep(0.0005)
    moments = (marks["death"], marks["pool"], marks["state"])
    return {name: (t - revoked_at) * 1000 for name, t in zip(TERMINATE, moments, strict=True)}


def abortable_sample(worker: Worker, client: Any, phase: float) -> dict[str, float]:
    """``AbortableAsyncResult.abort()`` of a task polling every 100 ms, ``phase`` s into one."""
    from celery.contrib.abortable import AbortableAsyncResult

    with _running(worker, client, "bench.abortable_poll", RUNNING_BEFORE_REVOKE + phase) as (
        key,
        result,
        pubsub,
    ):
        AbortableAsyncResult(result.id, app=worker.app).abort()
        aborted_at = time.time()
        final_at, meta = _wait_for_status(pubsub, worker, "SUCCESS")
        marks = _marks(worker, client, key, b"noticed")
        if meta.get("result") != "aborted":
            raise WorkerError(f"task {result.id} returned {meta.get('result')!r}, not 'aborted'")
    moments = (float(marks[b"noticed"]), final_at)
    return {name: (t - aborted_at) * 1000 for name, t in zip(ABORTABLE, moments, strict=True)}


def dramatiq_sample(worker: DramatiqWorker, client: Any, running: float, timeout: float) -> float:
    """Abort ``peers_spin`` ``running`` s after it started; ms until `Abort` was raised in it."""
    key = f"cancellable-bench:peers:{uuid.uuid4().hex}"
    try:
        message_id = worker.send(key)
        wait_for(lambda: client.hget(key, "started"), timeout, "the actor to start", worker)
        time.sleep(running)
        aborted_at = time.time()
        worker.abort(message_id)
        marks = wait_for(
            lambda: (lambda m: m if b"raised" in m or b"finished" in m else None)(
                client.hgetall(key)
            ),
            STEP_TIMEOUT,
            "Abort to reach the actor",
            worker,
        )
        if b"raised" not in marks:
            raise WorkerError(f"message {message_id} finished without being aborted")
        return (float(marks[b"raised"]) - aborted_at) * 1000
    finally:
        client.delete(key)


def wait_pool_full(worker: Worker) -> set[int]:
    """The worker's pool children once it has all of them."""
    return wait_for(
        lambda: (lambda k: k if len(k) >= worker.concurrency else None)(live_children(worker.pid)),
        STEP_TIMEOUT,
        "a full pool",
        worker,
    )


def _collect(names: list[str], samples: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Records (and `RAW` entries) of the wanted ``names`` from samples keyed by name."""
    records = []
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        RAW[name] = values
        log(
            f"{name}: p50 {statistics.median(values):.2f} p90 {percentile(values, 90):.2f} "
            f"p99 {percentile(values, 99):.2f} max {max(values):.2f} ms over {len(values)}"
        )
        if name in names:
            records.append(measured(name, values, "ms", runs=len(values)))
    return records


def latency(worker: Worker, client: Any, mode: str, names: list[str]) -> list[dict[str, Any]]:
    """The selected ``latency.*`` records."""
    main, others, terminate, abortable = SETTINGS[mode]["latency"]
    records: list[dict[str, Any]] = []
    for variant, (pool, broker, task) in VARIANTS.items():
        wanted = [n for n in variant_names(variant) if n in names]
        if not wanted:
            continue
        prefix = variant_names(variant)[0].rsplit(".", 1)[0] + "."
        if pool == "prefork" and broker is None:
            samples = [revoke_sample(worker, client, task) for _ in range(main)]
        elif not others:
            records += [skipped(n, f"only in the full run, not in {mode} mode") for n in wanted]
            continue
        else:
            with Worker(worker.redis_url, pool=pool, broker_url=broker) as other:
                log(f"latency: {variant} worker {other.nodename} is up")
                samples = [revoke_sample(other, client, task) for _ in range(others)]
        records += _collect(wanted, [{prefix + s: v for s, v in x.items()} for x in samples])
    if any(n in names for n in TERMINATE):
        samples = [terminate_sample(worker, client) for _ in range(terminate)]
        wait_pool_full(worker)
        records += _collect(names, samples)
    if any(n in names for n in ABORTABLE):
        from bench_app import ABORT_POLL_SECONDS

        rng = random.Random(20261124)
        phases = [rng.uniform(0.0, ABORT_POLL_SECONDS) for _ in range(abortable)]
        records += _collect(names, [abortable_sample(worker, client, p) for p in phases])
    return records


def peers(worker: Worker, client: Any, mode: str, names: list[str]) -> list[dict[str, Any]]:
    """``peers.latency.*``: dramatiq-abort beside our revoke, sampled in turns."""
    absent = [m for m in ("dramatiq", "dramatiq_abort") if importlib.util.find_spec(m) is None]
    if absent:
        why = f"needs {', '.join(absent)}: pip install -e '.[bench]'"
        return [skipped(name, why) for name in names]
    rounds, settled_every = SETTINGS[mode]["peers"]
    ours, theirs, settled = PEERS
    samples: dict[str, list[float]] = {name: [] for name in PEERS}
    with DramatiqWorker(worker.redis_url) as dramatiq_worker:
        # The first message also waits for the worker to boot.
        dramatiq_sample(dramatiq_worker, client, RUNNING_BEFORE_REVOKE, 60.0)
        log(f"peers: dramatiq worker on {dramatiq_worker.queue} is up")
        for number in range(rounds):
            samples[ours].append(revoke_sample(worker, client)["revoke_to_checkpoint"])
            samples[theirs].append(
                dramatiq_sample(dramatiq_worker, client, RUNNING_BEFORE_REVOKE, STEP_TIMEOUT)
            )
            if number % settled_every == settled_every - 1:
                samples[settled].append(
                    dramatiq_sample(
                        dramatiq_worker, client, RUNNING_BEFORE_ABORT_SETTLED, STEP_TIMEOUT
                    )
                )
    records = []
    for name in PEERS:
        records += _collect(names, [{name: v} for v in samples[name]])
    return records


# --------------------------------------------------------------------------
# Throughput.


def throughput_round(worker: Worker, client: Any, task: str, tasks: int) -> float:
    """Run ``tasks`` no-op ``task``s from a full queue; tasks per second, as the tasks stamp it."""
    token = uuid.uuid4().hex[:10]
    key, queue = f"cancellable-bench:throughput:{token}", f"{worker.queue}-round-{token}"
    app = worker.app
    with app.producer_or_acquire() as producer:
        for _ in range(tasks):
            app.send_task(task, args=(key, tasks), queue=queue, producer=producer)
    app.control.add_consumer(queue, destination=[worker.nodename], reply=True, timeout=5)
    try:
        wait_for(lambda: client.get(f"{key}:last"), 300, f"{tasks} tasks of {task}", worker)
        first, last = float(client.get(f"{key}:first")), float(client.get(f"{key}:last"))
    finally:
        app.control.cancel_consumer(queue, destination=[worker.nodename], reply=True, timeout=5)
        client.delete(f"{key}:first", f"{key}:last", f"{key}:count", queue)
    return (tasks - 1) / (last - first)  # N tasks between the first start and the last end


def throughput(worker: Worker, client: Any, mode: str, names: list[str]) -> list[dict[str, Any]]:
    """The selected ``throughput.*`` records: real worker rounds, and eager applies."""
    tasks, pairs, eager_rounds, calls = SETTINGS[mode]["throughput"]
    records = []
    if any(n in names for n in THROUGHPUT):
        plain, ours = "bench.noop_plain", "bench.noop_cancellable"
        throughput_round(worker, client, plain, min(tasks, 100))  # warm up the pool
        rates: dict[str, list[float]] = {plain: [], ours: []}
        for k in range(pairs):
            for task in (plain, ours) if k % 2 == 0 else (ours, plain):
                rates[task].append(throughput_round(worker, client, task, tasks))
            log(f"throughput pair {k + 1}/{pairs}: {rates[plain][-1]:.0f}, {rates[ours][-1]:.0f}/s")
        overhead = [(1 / c - 1 / p) * 1e6 for p, c in zip(rates[plain], rates[ours], strict=True)]
        ratio = [c / p for p, c in zip(rates[plain], rates[ours], strict=True)]
        values = (rates[plain], rates[ours], overhead, ratio)
        for name, unit, vals in zip(
            THROUGHPUT, ("tasks/s", "tasks/s", "us", "x"), values, strict=True
        ):
            records.append(measured(name, vals, unit, runs=pairs, tails=False))
    if any(n in names for n in EAGER):
        values = eager_apply(eager_rounds, calls)
        diffs = [c - p for p, c in zip(values[0], values[1], strict=True)]
        for name, vals in zip(EAGER, (*values, diffs), strict=True):
            records.append(measured(name, vals, "us", runs=eager_rounds))
    return [r for r in records if r["name"] in names]


def eager_apply(rounds: int, calls: int) -> tuple[list[float], list[float]]:
    """µs per ``Task.apply()`` of a plain and of a ``@cancellable`` no-op task, per round."""
    from celery import Celery

    from cancellable import cancellable

    app = Celery("cancellable_bench_eager", broker="memory://", backend="disabled://")

    def noop() -> None:
        """A task that does nothing."""

    tasks = {
        "plain": app.task(name="eager.plain", ignore_result=True)(noop),
        "ours": app.task(name="eager.cancellable", ignore_result=True)(cancellable(noop)),
    }
    values: dict[str, list[float]] = {"plain": [], "ours": []}
    for task in tasks.values():  # warm up
        for _ in range(max(10, calls // 10)):
            task.apply()
    for k in range(rounds):
        for variant in ("plain", "ours") if k % 2 == 0 else ("ours", "plain"):
            apply = tasks[variant].apply
            t0 = time.perf_counter()
            for _ in range(calls):
                apply()
            values[variant].append((time.perf_counter() - t0) / calls * 1e6)
    return values["plain"], values["ours"]


# --------------------------------------------------------------------------
# Inside a task.


def measure_here(seconds_per_value: float, values: int) -> dict[str, Any]:
    """Run inside ``bench.measure_revoked``: ns per call of each statement, interleaved rounds."""
    from celery import current_task

    import cases
    from cancellable import current_scope

    if current_task.request.revoked() is not False or current_scope() is None:
        return {"error": "the task does not run in a live cancel scope"}
    statements = {
        **{name.split(".", 1)[1]: stmt for name, stmt in IN_TASK.items()},
        "harness": "pass",
        "empty": "empty()",
        "loop": "for _i in _range_n:\n    pass",
    }
    timers = {}
    for role, stmt in statements.items():
        case = cases.Case(f"in_task.{role}", role, stmt)
        ns = case.namespace()
        ns.update(current_task=current_task, _task=current_task._get_current_object())
        ns["_range_n"] = range(cases.RANGE_ITERATIONS)
        inner = cases.make_inner(case, ns)
        loops = 1
        while inner(loops, time.perf_counter) < seconds_per_value and loops < 1 << 30:
            loops *= 2
        per = loops * (cases.RANGE_ITERATIONS if role == "loop" else 1)
        timers[role] = (inner, loops, per)
    results: dict[str, list[float]] = {role: [] for role in timers}
    roles = list(timers)
    for value in range(values):
        for role in roles[value % len(roles) :] + roles[: value % len(roles)]:
            inner, loops, per = timers[role]
            results[role].append(inner(loops, time.perf_counter) / per * 1e9)
    return {"values": results, "pid": os.getpid()}


def in_task(worker: Worker, mode: str, names: list[str]) -> list[dict[str, Any]]:
    """The selected ``celery.*`` records, with ratios to baselines of the same task."""
    result = worker.app.send_task("bench.measure_revoked", args=SETTINGS[mode]["in_task"])
    payload = result.get(timeout=600)
    result.forget()
    if "error" in payload:
        return [skipped(name, payload["error"]) for name in names]
    values = payload["values"]
    base = [statistics.median(values[role]) for role in ("harness", "empty", "loop")]
    records = []
    for name in names:
        record = measured(
            name, values[name.split(".", 1)[1]], "ns", runs=SETTINGS[mode]["in_task"][1]
        )
        record.update(ratios(record["median"], *base))
        records.append(record)
    return records


# --------------------------------------------------------------------------
# The harness.


def run(
    mode: str = "full", only: str | None = None, redis_url: str = DEFAULT_REDIS_URL
) -> list[dict[str, Any]]:
    """Every selected result over real workers; a part that fails is reported as skipped."""
    import redis

    RAW.clear()
    every = names(mode)
    wanted_names = [name for name in every if selected(name, only)]
    if not wanted_names:
        return []
    parts: list[
        tuple[tuple[str, ...], Callable[[Worker, Any, list[str]], list[dict[str, Any]]]]
    ] = [
        (LATENCY, lambda w, c, n: latency(w, c, mode, n)),
        ((*THROUGHPUT, *EAGER), lambda w, c, n: throughput(w, c, mode, n)),
        (tuple(IN_TASK), lambda w, c, n: in_task(w, mode, n)),
        (PEERS, lambda w, c, n: peers(w, c, mode, n)),
        (bulk.names(mode), lambda w, c, n: bulk.run(w, c, mode, n)),
        (ladder.NAMES, lambda w, c, n: ladder.run(w, c, mode, n)),
    ]
    env = {
        "CELERY_WORKER_REVOKES_MAX": str(bulk.REVOKES_MAX),
        "CANCELLABLE_BENCH_KILL_AFTER": str(ladder.KILL_AFTER),
    }
    records: list[dict[str, Any]] = []
    client = redis.Redis.from_url(redis_url)
    try:
        with Worker(redis_url, env=env) as worker:
            log(f"real workers: {worker.nodename} is up")
            for part_names, part in parts:
                wanted = [n for n in part_names if n in wanted_names]
                if not wanted:
                    continue
                began = time.monotonic()
                try:
                    records += part(worker, client, wanted)
                except Exception as exc:
                    log(f"error: {wanted[0].split('.')[0]}: {exc!r}")
                    done = {r["name"] for r in records}
                    records += [skipped(n, f"failed: {exc!r}") for n in wanted if n not in done]
                    worker.check_alive()  # a dead worker ends the run
                log(
                    f"real workers: {wanted[0].split('.')[0]} took {time.monotonic() - began:.1f} s"
                )
    except Exception as exc:
        log(f"error: the real-worker harness stopped: {exc!r}")
        done = {r["name"] for r in records}
        records += [skipped(n, f"failed: {exc!r}") for n in wanted_names if n not in done]
    finally:
        client.close()
        with contextlib.suppress(Exception):
            flush_benchmark_db(redis_url)
    order = {name: k for k, name in enumerate(every)}
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


def plot_cdf(raw: dict[str, list[float]], path: Path) -> None:
    """The CDF of the delivery latencies in ``raw`` (`CDF_CURVES`), as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for name, label in CDF_CURVES.items():
        if not raw.get(name):
            continue
        # cancellable solid (prefork) or dashed (threads); Celery's own ways dotted.
        style = "-" if "prefork" in label else "--" if "threads" in name else ":"
        values = sorted(raw[name])
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", linestyle=style, label=f"{label} (n={len(values)})")
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
