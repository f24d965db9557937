"""The Celery app the integration-test workers run (``-A tests.integration.app``).

Configuration comes from ``CIT_*`` environment variables (see `settings`).
Tasks report what happened to Redis, under a key prefix that the test passes
as the first argument (``key``), never through shared memory with the test
process.  Every task has an explicit name so the worker and the test process
agree whatever module name this file was imported under.

``CIT_WITH_CANCELLABLE=0`` registers only the plain Celery tasks: the harness
self-tests use that to prove the harness without the library.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis

from .settings import REDIS_URL, app_from_env

app = app_from_env()

_clients: dict[int, redis.Redis] = {}


def obs() -> redis.Redis:
    """A Redis client for observations, one per process (safe after fork)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        client = _clients[pid] = redis.Redis.from_url(
            os.environ.get("CIT_OBS_URL", REDIS_URL), decode_responses=True
        )
    return client


def record_start(key: str) -> None:
    """Record that a task body started: its pid, and the run count."""
    r = obs()
    r.rpush(f"{key}:started", os.getpid())
    r.incr(f"{key}:runs")


def plain_sleep_body(key: str, seconds: float) -> str:
    record_start(key)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    obs().set(f"{key}:done", 1)
    return "slept"


# --------------------------------------------------------------------------
# Plain Celery tasks (no cancellable): the harness self-tests and blockers.


@app.task(name="cit.plain.add")
def plain_add(x: int, y: int) -> int:
    return x + y


@app.task(name="cit.plain.pid")
def plain_pid(key: str) -> int:
    obs().rpush(f"{key}:pids", os.getpid())
    return os.getpid()


@app.task(name="cit.plain.sleep")
def plain_sleep(key: str, seconds: float) -> str:
    return plain_sleep_body(key, seconds)


@app.task(name="cit.plain.sleep_late", acks_late=True)
def plain_sleep_late(key: str, seconds: float) -> str:
    """Like plain.sleep, but holds its message unacked while it runs."""
    return plain_sleep_body(key, seconds)


@app.task(name="cit.plain.hold", acks_late=True)
def plain_hold(key: str, seconds: float) -> str:
    """Run until the test sets ``<key>:release`` (at most ``seconds``), its message unacked.

    A blocker whose end the test chooses: a fixed sleep ended too early when
    the step it was to outlast took longer under load.
    """
    record_start(key)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not obs().exists(f"{key}:release"):
        time.sleep(0.05)
    return "released"


def soft_limit_body(key: str) -> str:
    from celery.exceptions import SoftTimeLimitExceeded

    record_start(key)
    try:
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            time.sleep(0.02)
    except SoftTimeLimitExceeded:
        return "soft-limit"
    return "no soft limit"


@app.task(name="cit.plain.soft_limit", soft_time_limit=0.5)
def plain_soft_limit(key: str) -> str:
    """Celery's soft time limit (SIGUSR1 in prefork) must still work."""
    return soft_limit_body(key)


@app.task(name="cit.plain.count")
def plain_count(key: str) -> None:
    """A no-op that counts its runs (batches of thousands)."""
    obs().incr(f"{key}:runs")


@app.task(name="cit.plain.count_signals")
def plain_count_signals(key: str, seconds: float) -> int:
    """Many short C-level sleeps for ``seconds``, counting the SIGURG signals the
    process receives meanwhile (the handler in place still runs); stores the count."""
    record_start(key)
    received: list[int] = []
    previous = signal.getsignal(signal.SIGURG)

    def counting(number: int, frame: Any) -> None:
        received.append(number)
        if callable(previous):
            previous(number, frame)

    signal.signal(signal.SIGURG, counting)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGURG, previous)
    obs().set(f"{key}:signals", len(received))
    obs().set(f"{key}:done", 1)
    return len(received)


# --------------------------------------------------------------------------
# @cancellable tasks.

if os.environ.get("CIT_WITH_CANCELLABLE", "1") != "0":
    from celery import current_task

    from cancellable import CancelScope, cancellable, checkpoint, on_cancel

    def hook(key: str, name: str) -> None:
        """A cleanup hook: records that it ran."""
        obs().rpush(f"{key}:hooks", name)

    def raising_hook(key: str) -> None:
        obs().rpush(f"{key}:hooks", "raising")
        raise RuntimeError("cleanup failed on purpose")

    def checkpoint_loop(key: str, seconds: float, step: float) -> None:
        r = obs()
        end = time.monotonic() + seconds
        n = 0
        try:
            while time.monotonic() < end:
                checkpoint()
                n += 1
                if n == 1:
                    r.set(f"{key}:looping", 1)
                time.sleep(step)
        except BaseException as exc:
            r.set(f"{key}:exc_at", repr(time.time()))
            r.set(f"{key}:exc", type(exc).__name__)
            raise

    @app.task(bind=True, name="cit.loop")
    @cancellable
    def loop(self: Any, key: str, seconds: float = 20.0, step: float = 0.02) -> str:
        """Checkpoints every ``step`` seconds for ``seconds``; one cleanup hook."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        checkpoint_loop(key, seconds, step)
        obs().set(f"{key}:done", 1)
        return "done"

    @app.task(bind=True, name="cit.loop_raising_hook")
    @cancellable
    def loop_raising_hook(self: Any, key: str, seconds: float = 20.0) -> str:
        """Three hooks, the middle one raises (hooks run last-registered-first)."""
        record_start(key)
        on_cancel(hook, key, "first")
        on_cancel(raising_hook, key)
        on_cancel(hook, key, "third")
        checkpoint_loop(key, seconds, 0.02)
        obs().set(f"{key}:done", 1)
        return "done"

    @app.task(bind=True, name="cit.no_checkpoint")
    @cancellable
    def no_checkpoint(self: Any, key: str, seconds: float = 3.0) -> str:
        """Never reaches a checkpoint: cannot be stopped cooperatively."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        r = obs()
        end = time.monotonic() + seconds
        r.set(f"{key}:looping", 1)
        while time.monotonic() < end:
            time.sleep(0.05)
        r.set(f"{key}:done", 1)
        return "finished"

    @app.task(bind=True, name="cit.blind_then_loop", acks_late=True)
    @cancellable
    def blind_then_loop(self: Any, key: str, blind: float = 30.0, seconds: float = 20.0) -> str:
        """acks_late; a first section of ``blind`` seconds without checkpoints."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        r = obs()
        r.set(f"{key}:blind", 1)
        end = time.monotonic() + blind
        while time.monotonic() < end:
            time.sleep(0.05)
        r.set(f"{key}:blind_over", 1)
        checkpoint_loop(key, seconds, 0.02)
        r.set(f"{key}:done", 1)
        return "done"

    @app.task(bind=True, name="cit.idiom")
    @cancellable
    def idiom(self: Any, key: str, seconds: float = 20.0) -> str:
        """The tutorial idiom: ``if current_task.request.revoked(): break``."""
        record_start(key)
        r = obs()
        r.rpush(f"{key}:revoked", repr(current_task.request.revoked()))
        end = time.monotonic() + seconds
        outcome = "timeout"
        while time.monotonic() < end:
            if current_task.request.revoked():
                outcome = "stopped"
                r.rpush(f"{key}:revoked", "True")
                break
            time.sleep(0.02)
        r.set(f"{key}:outcome", outcome)
        return outcome

    def slow_hook(key: str, seconds: float) -> None:
        time.sleep(seconds)
        obs().set(f"{key}:cleanup_done", 1)

    @app.task(bind=True, name="cit.slow_cleanup")
    @cancellable
    def slow_cleanup(self: Any, key: str, hook_seconds: float = 1.5) -> str:
        """A checkpoint loop whose cleanup hook takes ``hook_seconds``."""
        record_start(key)
        on_cancel(slow_hook, key, hook_seconds)
        checkpoint_loop(key, 30.0, 0.02)
        return "done"

    @app.task(bind=True, name="cit.retry_on_cancel", max_retries=3)
    @cancellable
    def retry_on_cancel(self: Any, key: str, seconds: float = 20.0) -> str:
        """Catches Cancelled and asks for a retry: a cancelled task must not be retried."""
        from cancellable import Cancelled

        record_start(key)
        try:
            checkpoint_loop(key, seconds, 0.02)
        except Cancelled as exc:
            raise self.retry(countdown=0.5) from exc
        return "done"

    @app.task(bind=True, name="cit.soft_limit", soft_time_limit=0.5)
    @cancellable
    def soft_limit(self: Any, key: str) -> str:
        """A ``@cancellable`` task that relies on Celery's soft time limit."""
        return soft_limit_body(key)

    @app.task(bind=True, name="cit.fail_fast", cancel_siblings_on_failure=True)
    @cancellable
    def fail_fast(self: Any, key: str, after: float = 1.0) -> str:
        """Opted in to fail-fast: raises after ``after`` seconds."""
        record_start(key)
        time.sleep(after)
        raise RuntimeError("member failed on purpose")

    # ----------------------------------------------------------------------
    # async def task bodies (docs/async.md).

    import asyncio

    @app.task(bind=True, name="cit.async.sleep")
    @cancellable
    async def async_sleep(self: Any, key: str, seconds: float = 3600.0) -> str:
        """Awaits ``asyncio.sleep(seconds)`` inside try/finally, with a cleanup hook."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        r = obs()
        try:
            r.set(f"{key}:looping", 1)
            await asyncio.sleep(seconds)
        except asyncio.CancelledError as exc:
            r.set(f"{key}:cancelled_at", repr(time.time()))
            r.set(f"{key}:exc", type(exc).__name__)
            r.set(f"{key}:message", str(exc))
            raise
        finally:
            r.set(f"{key}:finally", 1)
        r.set(f"{key}:done", 1)
        return "slept"

    @app.task(bind=True, name="cit.async.echo")
    @cancellable
    async def async_echo(self: Any, value: Any) -> Any:
        """Returns its argument after an await."""
        await asyncio.sleep(0.01)
        return value

    @app.task(bind=True, name="cit.async.deadline")
    @cancellable(timeout=0.5)
    async def async_deadline(self: Any, key: str) -> str:
        """Overruns its 0.5 s timeout while awaiting."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        try:
            await asyncio.sleep(30)
        finally:
            obs().set(f"{key}:finally", 1)
        return "overran"

    def thread_helper(key: str, seconds: float) -> str:
        """A synchronous helper with checkpoints, run with asyncio.to_thread."""
        checkpoint_loop(key, seconds, 0.02)
        return "helper done"

    @app.task(bind=True, name="cit.async.to_thread")
    @cancellable
    async def async_to_thread(self: Any, key: str, seconds: float = 20.0) -> str:
        """Awaits a sync checkpoint loop running in a thread (asyncio.to_thread)."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        try:
            return await asyncio.to_thread(thread_helper, key, seconds)
        finally:
            obs().set(f"{key}:finally", repr(time.time()))

    # ----------------------------------------------------------------------
    # The cancellation ladder (docs/grace.md): tasks that ignore checkpoints.

    import cancellable as _cancellable
    from cancellable import Cancelled

    # The terminate step's delay after the interrupt (seconds); short, so
    # the tests of the last step are quick.
    app.conf.cancellable_kill_after = float(os.environ.get("CIT_KILL_AFTER", "1.0"))
    app.conf.cancellable_kill_process_group = os.environ.get("CIT_KILL_GROUP") == "1"

    def record_exc(key: str, exc: BaseException) -> None:
        # Every Cancelled as "Cancelled" (the threads pool raises a subclass).
        r = obs()
        r.set(f"{key}:exc", "Cancelled" if isinstance(exc, Cancelled) else type(exc).__name__)
        r.set(f"{key}:exc_at", repr(time.time()))

    def sleep_body(key: str, seconds: float) -> str:
        record_start(key)
        on_cancel(hook, key, "cleanup")
        obs().set(f"{key}:looping", 1)
        try:
            time.sleep(seconds)
        except BaseException as exc:
            record_exc(key, exc)
            raise
        obs().set(f"{key}:done", 1)
        return "slept"

    @app.task(bind=True, name="cit.ladder.sleep")
    @cancellable
    def ladder_sleep(self: Any, key: str, seconds: float = 3600.0) -> str:
        """Blocks in ``time.sleep`` (no checkpoint); one cleanup hook."""
        return sleep_body(key, seconds)

    @app.task(bind=True, name="cit.ladder.sleep_graced")
    @cancellable(grace=1.0)
    def ladder_sleep_graced(self: Any, key: str, seconds: float = 3600.0) -> str:
        """Like ``cit.ladder.sleep``, with ``@cancellable(grace=1.0)``."""
        return sleep_body(key, seconds)

    @app.task(bind=True, name="cit.ladder.gil", acks_late=True, reject_on_worker_lost=True)
    @cancellable
    def ladder_gil(self: Any, key: str) -> int:
        """Stuck in one C call that holds the GIL and never runs signal handlers."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        obs().set(f"{key}:looping", 1)
        return sum(range(10**12))

    @app.task(bind=True, name="cit.ladder.busy")
    @cancellable
    def ladder_busy(self: Any, key: str, seconds: float = 60.0) -> int:
        """A pure-Python loop without checkpoints (interruptible in any thread)."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        obs().set(f"{key}:looping", 1)
        end = time.monotonic() + seconds
        n = 0
        try:
            while time.monotonic() < end:
                n += 1
        except BaseException as exc:
            record_exc(key, exc)
            raise
        obs().set(f"{key}:done", 1)
        return n

    @app.task(bind=True, name="cit.ladder.csleep")
    @cancellable
    def ladder_csleep(self: Any, key: str, seconds: float = 3600.0) -> str:
        """``cancellable.sleep(seconds)``: stops as soon as it is cancelled."""
        record_start(key)
        on_cancel(hook, key, "cleanup")
        obs().set(f"{key}:looping", 1)
        try:
            _cancellable.sleep(seconds)
        except BaseException as exc:
            record_exc(key, exc)
            raise
        obs().set(f"{key}:done", 1)
        return "slept"

    @app.task(bind=True, name="cit.ladder.short")
    @cancellable
    def ladder_short(self: Any, key: str, task_no: int, ms: float, stubborn: float = 0.0) -> int:
        """The torture test's task: blocks ``ms`` ms; records how it ended, with its pid.

        ``stubborn`` seconds: on an interrupt, block that long more,
        swallowing every further interrupt (only the terminate step, or the
        end of that time, ends it).
        """
        r = obs()
        pid = os.getpid()
        r.rpush(f"{key}:started", f"{task_no}:{pid}:{time.time()!r}")
        try:
            time.sleep(ms / 1000.0)
        except Cancelled:
            r.rpush(f"{key}:interrupted", f"{task_no}:{pid}")
            if not stubborn:
                raise
            end = time.monotonic() + stubborn
            while time.monotonic() < end:
                try:
                    time.sleep(max(0.0, end - time.monotonic()))
                except Cancelled:
                    pass
        r.rpush(f"{key}:finished", f"{task_no}:{pid}")
        return pid

    @app.task(bind=True, name="cit.ladder.gil_with_child")
    @cancellable
    def ladder_gil_with_child(self: Any, key: str) -> int:
        """Starts a ``sleep 3600`` subprocess, then holds the GIL in one C call."""
        import subprocess

        record_start(key)
        child = subprocess.Popen(["sleep", "3600"])
        obs().set(f"{key}:subprocess", child.pid)
        obs().set(f"{key}:looping", 1)
        return sum(range(10**12))

    # ----------------------------------------------------------------------
    # Shutdowns and lost connections (docs/shutdown.md): the first run is
    # long and gets stopped, the run after it (on another worker) is short.

    def rerun_body(key: str, first_seconds: float, later_seconds: float, blocking: bool) -> str:
        """Records ``start``, ``cancelled``, ``cleanup`` and ``done`` lines with pid and
        time, and the custom header ``x-cit`` each run got (``headers`` list)."""
        r = obs()
        pid = os.getpid()
        request = current_task.request
        header = (request.headers or {}).get("x-cit") or getattr(request, "x-cit", None)
        r.rpush(f"{key}:headers", repr(header))
        run = int(r.incr(f"{key}:runs"))
        r.rpush(f"{key}:started", pid)
        r.rpush(f"{key}:log", f"start {run} {pid} {time.time()!r}")

        def cleanup() -> None:
            r.rpush(f"{key}:log", f"cleanup {run} {pid} {time.time()!r}")

        on_cancel(cleanup)
        seconds = first_seconds if run == 1 else later_seconds
        r.set(f"{key}:looping", 1)
        try:
            if blocking:
                time.sleep(seconds)
            else:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    checkpoint()
                    time.sleep(0.02)
        except Cancelled as exc:
            r.rpush(f"{key}:log", f"cancelled {run} {pid} {time.time()!r}")
            r.set(f"{key}:reason", f"{exc.reason.source}|{exc.reason.message}")
            raise
        r.rpush(f"{key}:log", f"done {run} {pid} {time.time()!r}")
        return f"run {run} on {pid}"

    @app.task(bind=True, name="cit.rerun.late", acks_late=True)
    @cancellable
    def rerun_late(self: Any, key: str, first: float = 60.0, later: float = 1.0) -> str:
        """acks_late, checkpoints every 20 ms: a long first run, a short second one."""
        return rerun_body(key, first, later, blocking=False)

    @app.task(bind=True, name="cit.rerun.early")
    @cancellable
    def rerun_early(self: Any, key: str, first: float = 60.0, later: float = 1.0) -> str:
        """Like ``cit.rerun.late``, but its message is acked when it starts."""
        return rerun_body(key, first, later, blocking=False)

    @app.task(bind=True, name="cit.rerun.sleep", acks_late=True)
    @cancellable
    def rerun_sleep(self: Any, key: str, first: float = 3600.0, later: float = 1.0) -> str:
        """acks_late, stuck in ``time.sleep`` (no checkpoint) on its first run."""
        return rerun_body(key, first, later, blocking=True)

    # Interrupts and process-wide locks (issue 18 point 2, docs/reliability.md).

    import logging as _logging
    import queue as _queue

    #: A process-wide pool, as urllib3's connection pools are: a LifoQueue
    #: whose mutex is a plain (non-reentrant) lock.
    POOL_SIZE = 4
    SHARED_POOL: _queue.LifoQueue[int] = _queue.LifoQueue()
    for _item in range(POOL_SIZE):
        SHARED_POOL.put(_item)

    class _Sink(_logging.Handler):
        """A handler that formats and drops (its lock is what matters)."""

        def emit(self, record: _logging.LogRecord) -> None:
            self.format(record)

    LOCKS_HANDLER = _Sink()
    LOCKS_LOG = _logging.getLogger("cit.locks")
    LOCKS_LOG.propagate = False
    LOCKS_LOG.setLevel(_logging.INFO)
    LOCKS_LOG.addHandler(LOCKS_HANDLER)

    def use_shared_locks() -> None:
        """One round over the pool and the logging module, written as exception-safe code is."""
        item = SHARED_POOL.get()
        try:
            LOCKS_LOG.info("took %s", item)
        finally:
            SHARED_POOL.put(item)

    def lock_state() -> tuple[bool, int, int, int]:
        """The queue's mutex, the items out of the pool, the two logging locks' counts."""
        import re

        def count(lock: Any) -> int:
            found = re.search(r"count=(\d+)", repr(lock))
            return int(found.group(1)) if found else 0

        locked = SHARED_POOL.mutex.locked()
        out = -1 if locked else POOL_SIZE - SHARED_POOL.qsize()
        return locked, out, count(LOCKS_HANDLER.lock), count(_logging._lock)

    def locks_left(before: tuple[bool, int, int, int]) -> str:
        """What this task left held that it did not hold when it started (``-``: nothing).

        Read right after the exception unwound out of the loop, with no
        other task using the pool: a locked mutex is one the interrupted
        frame left held; an item out of the pool is one it took and never
        put back (the interrupt landed between ``get()`` and the ``try``);
        a logging lock still counted is one it acquired and never released
        (an `RLock`: the same thread may take it again, others hang).
        """
        locked, out, handler, module = lock_state()
        held = []
        if locked and not before[0]:
            held.append("queue")
        if out > before[1] >= 0:
            held.append("queue-item")
        if handler > before[2]:
            held.append("logging-handler")
        if module > before[3]:
            held.append("logging-module")
        return ",".join(held) or "-"

    @app.task(bind=True, name="cit.locks.churn")
    @cancellable
    def locks_churn(self: Any, key: str, n: int, seconds: float = 10.0, every: int = 400) -> str:
        """Loops over the shared pool and logger, with a checkpoint every ``every`` rounds.

        Records ``<n>:<pid>:<where>:<held>`` in ``<key>:ended`` when an
        exception ends the loop: ``where`` is ``checkpoint`` (the cooperative
        path) or ``elsewhere`` (an interrupt at an arbitrary bytecode).
        """
        r = obs()
        before = lock_state()
        r.rpush(f"{key}:looping", n)
        end = time.monotonic() + seconds
        at_checkpoint = False
        rounds = 0
        try:
            while time.monotonic() < end:
                use_shared_locks()
                rounds += 1
                if rounds % every == 0:
                    at_checkpoint = True
                    checkpoint()
                    at_checkpoint = False
        except BaseException:
            where = "checkpoint" if at_checkpoint else "elsewhere"
            r.rpush(f"{key}:ended", f"{n}:{os.getpid()}:{where}:{locks_left(before)}")
            raise
        return "done"

    @app.task(bind=True, name="cit.locks.hook_churn")
    @cancellable
    def locks_hook_churn(self: Any, key: str, n: int, budget: float, every: int = 400) -> int:
        """A cleanup hook that loops over the shared pool and logger until its budget stops it.

        The task cancels a scope of its own whose hooks have a budget of
        ``budget`` seconds; its one hook loops like `locks_churn` (a
        checkpoint every ``every`` rounds, at most 10 s) and notes how an
        exception ended it; once the hook is over the task records
        ``<n>:<pid>:<where>:<held>`` in ``<key>:ended`` (``where``:
        ``checkpoint`` or ``elsewhere``, an arbitrary bytecode).  Returns
        the pid.
        """
        ended: list[str] = []

        def hook() -> None:
            before = lock_state()
            end = time.monotonic() + 10.0
            at_checkpoint = False
            rounds = 0
            try:
                while time.monotonic() < end:
                    use_shared_locks()
                    rounds += 1
                    if rounds % every == 0:
                        at_checkpoint = True
                        checkpoint()
                        at_checkpoint = False
            except BaseException:
                where = "checkpoint" if at_checkpoint else "elsewhere"
                ended.append(f"{n}:{os.getpid()}:{where}:{locks_left(before)}")
                raise

        with CancelScope(hook_timeout=budget) as scope:
            on_cancel(hook)
            scope.cancel("run the hook")
            checkpoint()
        # After the hook: no budget can raise here any more.
        if ended:
            obs().rpush(f"{key}:ended", ended[0])
        return os.getpid()

    @app.task(name="cit.locks.probe")
    def locks_probe() -> int:
        """A later task that uses the shared pool and logger (hangs if a lock was left held)."""
        use_shared_locks()
        return os.getpid()

# --------------------------------------------------------------------------
# OpenTelemetry (``CIT_OTEL=1``): each prefork child gets the real SDK with an
# in-memory exporter and the Celery instrumentation; after each task, the
# spans it finished are copied to Redis (``cit:otel:<task id>``, span JSON),
# the tests' only window into a child's memory.

if os.environ.get("CIT_OTEL") == "1":
    from celery import signals

    def _otel_child(**kwargs: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)

        def copy_spans(task_id: str | None = None, **rest: Any) -> None:
            # Connected after the instrumentation's own task_postrun
            # receiver, which ends the task's span.
            for span in exporter.get_finished_spans():
                obs().rpush(f"cit:otel:{task_id}", span.to_json(indent=None))
            exporter.clear()

        signals.task_postrun.connect(copy_spans, weak=False)

    signals.worker_process_init.connect(_otel_child, weak=False)
