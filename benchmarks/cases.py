"""The micro-benchmark cases: what each named statement is and how it is set up.

Each `Case` is measured timeit-style: its statement is compiled into the body
of a ``for`` loop (`make_inner`), the loop runs ``loops`` times between two
clock reads, and the result is the time per iteration.  `Case.setup` runs in
the measuring thread *before* the clock starts (for instance it enters a
`CancelScope`, so ``checkpoint.live_scope`` really measures a checkpoint
inside a live scope) and returns the teardown, which runs after the clock
stops.  `micro.py` hands these to pyperf; ``tests/test_benchmarks.py`` runs
the same setups and statements under a profiler to prove that every
statement calls the code its name promises.

Names are module globals of the statement's namespace, as they would be in a
user's module (``from cancellable import checkpoint``).

The ``peers.*`` cases time the per-call check of other libraries, in the
same pyperf run as ours: dramatiq-abort's ``abort_requested()`` with this
thread made the thread of a running actor, Temporal's
``activity.is_cancelled()`` inside its testing ``ActivityEnvironment``, and
the ``cancelscope`` package's ``checkpoint()`` and ``is_cancelled()`` in a
live scope.  They need the ``bench`` extra (``pip install -e '.[bench]'``);
a case whose packages are missing is reported as skipped (`missing`).

The ``context.body_<label>.*`` cases time a loop body of about 100 ns, 1 us,
10 us and 100 us (`body`, sizes measured on the reference machine) with and
without a ``checkpoint()`` before it, in a live scope: `per_call.py` turns
each pair into the overhead of one checkpoint per iteration.
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cancellable import CancelScope, checkpoint, current_scope, is_cancelled, on_cancel

Namespace = dict[str, Any]
Teardown = Callable[[], None]

#: Iterations of the bare ``for`` loop in ``baseline.loop_iteration``.
RANGE_ITERATIONS = 1000
#: Helper threads that loop on checkpoint() in the eight-thread cases.
OTHER_THREADS = 7
#: Size of Celery's revoked set in ``alt.limitedset_contains``.
REVOKED_IDS = 50_000
#: Deadline of ``checkpoint.deadline_armed``, from now.
DEADLINE_SECONDS = 3600.0
#: Hooks registered in ``checkpoint.ten_hooks``.
HOOKS = 10
#: Loops per value in ``--quick`` runs (no calibration) for a case of a few ns.
QUICK_LOOPS = 1 << 16
#: (label, `body` size) of the ``context.*`` cases: about 100 ns, 1 us, 10 us
#: and 100 us per call on the reference machine (CPython 3.11).
CONTEXT_BODIES = (("100ns", 0), ("1us", 15), ("10us", 180), ("100us", 1650))


def empty() -> None:
    """The floor: an empty module-level function."""


def body(size: int) -> int:
    """A deterministic pure-Python loop body: ``size`` steps of integer arithmetic."""
    x = 1
    for i in range(size):
        x = (x * 31 + i) % 65521
    return x


def _noop_hook() -> None:
    pass


@dataclass(frozen=True)
class Options:
    """What the cases need from the command line."""

    redis_url: str = "redis://127.0.0.1:6379/14"


@dataclass(frozen=True)
class Case:
    """One named statement, its setup, and how to time it."""

    name: str
    description: str
    stmt: str
    setup: Callable[[Namespace, Options], Teardown | None] | None = None
    #: "wall" (time.perf_counter) or "thread_cpu" (time.thread_time).
    clock: str = "wall"
    #: Iterations of the named operation per iteration of the timed loop.
    inner_loops: int = 1
    needs_redis: bool = False
    #: Modules the case imports (benchmark-only dependencies, the ``bench`` extra).
    requires: tuple[str, ...] = ()
    #: Namespace key of a callable that runs the timed loop for it, as
    #: ``ns[run_inside](inner, loops, clock)`` (Temporal's ``env.run``: the
    #: loop runs inside an activity); None: the loop is called directly.
    run_inside: str | None = None
    #: Loops per value in a ``--quick`` run, which skips pyperf's calibration.
    quick_loops: int = QUICK_LOOPS
    #: Why the case cannot run with this version of the library (None: it can).
    unsupported: Callable[[], str | None] | None = None

    def namespace(self) -> Namespace:
        """A fresh namespace with the names every statement may use."""
        return {
            "__name__": "bench_namespace",
            "checkpoint": checkpoint,
            "is_cancelled": is_cancelled,
            "empty": empty,
            "_repeat": itertools.repeat,
        }


_TEMPLATE = """\
def inner(_loops, _clock):
    _it = _repeat(None, _loops)
    _t0 = _clock()
    for _ in _it:
{body}
    _t1 = _clock()
    return _t1 - _t0
"""


def make_inner(case: Case, ns: Namespace) -> Callable[[int, Callable[[], float]], float]:
    """Compile ``case.stmt`` into a timed loop whose globals are ``ns``."""
    body = "\n".join("        " + line for line in case.stmt.splitlines())
    code = compile(_TEMPLATE.format(body=body), f"<bench {case.name}>", "exec")
    exec(code, ns)
    inner: Callable[[int, Callable[[], float]], float] = ns["inner"]
    return inner


def clock_for(case: Case) -> Callable[[], float]:
    """The clock a case is timed with."""
    return time.thread_time if case.clock == "thread_cpu" else time.perf_counter


def timed(
    case: Case, ns: Namespace, inner: Callable[[int, Callable[[], float]], float]
) -> Callable[[int], float]:
    """``loops -> seconds``: the timed loop of ``case`` with its clock, run where it must run.

    Call it only after the case's setup, which may put the ``run_inside``
    callable into ``ns``.
    """
    clock = clock_for(case)
    if case.run_inside is None:
        return lambda loops: inner(loops, clock)
    key = case.run_inside

    def run(loops: int) -> float:
        elapsed: float = ns[key](inner, loops, clock)
        return elapsed

    return run


def missing(case: Case) -> list[str]:
    """The modules ``case`` needs that cannot be imported here (empty: it can run)."""
    return [name for name in case.requires if importlib.util.find_spec(name) is None]


def unavailable(case: Case) -> str | None:
    """Why ``case`` cannot run here (a package is missing, ...), or None."""
    absent = missing(case)
    if absent:
        return (
            f"needs {', '.join(absent)}, not installed: "
            "pip install -e '.[bench]' (the benchmark-only dependencies)"
        )
    return case.unsupported() if case.unsupported else None


def _no_with_checkpoint() -> str | None:
    # `with checkpoint():` needs checkpoint() to return a context manager.
    if hasattr(checkpoint(), "__enter__"):
        return None
    return "checkpoint() returns no context manager in this version of cancellable"


def run_setup(case: Case, ns: Namespace, options: Options) -> Teardown:
    """Run the case's setup in this thread; return its teardown (maybe a no-op)."""
    if case.setup is None:
        return _nothing
    teardown = case.setup(ns, options)
    return teardown if teardown is not None else _nothing


def _nothing() -> None:
    pass


# --------------------------------------------------------------------------
# Setups.  Each returns the teardown that undoes it.


def _enter(scope: CancelScope, ns: Namespace) -> Teardown:
    scope.__enter__()
    ns["_scope"] = scope

    def teardown() -> None:
        scope.__exit__(None, None, None)

    return teardown


def _setup_outside(ns: Namespace, options: Options) -> None:
    if current_scope() is not None:
        raise RuntimeError("checkpoint.outside_scope must run outside any cancel scope")


def _setup_live(ns: Namespace, options: Options) -> Teardown:
    return _enter(CancelScope(), ns)


def _setup_deadline(ns: Namespace, options: Options) -> Teardown:
    return _enter(CancelScope(deadline=time.monotonic() + DEADLINE_SECONDS), ns)


def _setup_hooks(ns: Namespace, options: Options) -> Teardown:
    teardown = _enter(CancelScope(), ns)
    ns["_hooks"] = [on_cancel(_noop_hook) for _ in range(HOOKS)]
    return teardown


def _context_setup(size: int) -> Callable[[Namespace, Options], Teardown]:
    def setup(ns: Namespace, options: Options) -> Teardown:
        ns.update(_body=body, _size=size)
        return _enter(CancelScope(), ns)

    return setup


def _setup_range(ns: Namespace, options: Options) -> None:
    ns["_range_n"] = range(RANGE_ITERATIONS)


class Spinners:
    """Threads that each enter their own scope and call checkpoint() in a loop."""

    def __init__(self, count: int) -> None:
        self.stop = False
        self.counts = [0] * count
        self.scopes: list[CancelScope] = []
        self.errors: list[BaseException] = []
        self._ready = threading.Semaphore(0)
        self._go = threading.Event()
        self.threads = [
            threading.Thread(target=self._spin, args=(i,), name=f"bench-spinner-{i}", daemon=True)
            for i in range(count)
        ]

    def _spin(self, index: int) -> None:
        try:
            with CancelScope() as scope:
                self.scopes.append(scope)
                self._ready.release()
                self._go.wait()
                n = 0
                while not self.stop:
                    checkpoint()
                    n += 1
                    if not n & 0x3FF:
                        self.counts[index] = n
                self.counts[index] = n
        except BaseException as exc:  # a spinner must never be cancelled
            self.errors.append(exc)
            raise

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        for _ in self.threads:
            if not self._ready.acquire(timeout=10):
                raise RuntimeError("a spinner thread did not start")
        self._go.set()  # all in their scopes: start looping together

    def join(self) -> None:
        self.stop = True
        self._go.set()
        for thread in self.threads:
            thread.join(timeout=10)


def _setup_threads(ns: Namespace, options: Options) -> Teardown:
    spinners = Spinners(OTHER_THREADS)
    spinners.start()
    ns["_spinners"] = spinners
    exit_scope = _enter(CancelScope(), ns)

    def teardown() -> None:
        exit_scope()
        spinners.join()

    return teardown


class CancelledElsewhere:
    """A thread parked inside a scope that was cancelled, and never checks it."""

    def __init__(self) -> None:
        self.scope: CancelScope | None = None
        self._ready = threading.Event()
        self._release = threading.Event()
        self.thread = threading.Thread(target=self._park, name="bench-cancelled", daemon=True)

    def _park(self) -> None:
        with CancelScope() as scope:
            self.scope = scope
            scope.cancel("benchmark: a cancelled task that has not reached a checkpoint")
            self._ready.set()
            self._release.wait()

    def start(self) -> None:
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the cancelled helper thread did not start")

    def join(self) -> None:
        self._release.set()
        self.thread.join(timeout=10)


class CleaningUpElsewhere(CancelledElsewhere):
    """A thread whose cancelled scope is running a cleanup hook (that waits)."""

    def _park(self) -> None:
        with CancelScope() as scope:
            self.scope = scope
            on_cancel(self._hook)
            scope.cancel("benchmark: a cancelled task running its cleanup")
            checkpoint()

    def _hook(self) -> None:
        self._ready.set()
        self._release.wait()


def _setup_other_cleaning_up(ns: Namespace, options: Options) -> Teardown:
    return _setup_other_cancelled(ns, options, CleaningUpElsewhere())


def _setup_other_cancelled(
    ns: Namespace, options: Options, helper: CancelledElsewhere | None = None
) -> Teardown:
    helper = helper or CancelledElsewhere()
    helper.start()
    ns["_helper"] = helper
    exit_scope = _enter(CancelScope(), ns)

    def teardown() -> None:
        exit_scope()
        helper.join()

    return teardown


# -- the alternatives --------------------------------------------------------

_apps: dict[str, Any] = {}


def celery_app(redis_url: str) -> Any:
    """A Celery app with a Redis broker and result backend (no worker, no connection yet)."""
    app = _apps.get(redis_url)
    if app is None:
        from celery import Celery

        app = Celery("cancellable_bench", broker=redis_url, backend=redis_url)
        app.conf.result_expires = 600
        _apps[redis_url] = app
    return app


def _store_started(ns: Namespace, options: Options) -> Teardown:
    # A running task's meta in the result backend (as with task_track_started):
    # the check reads and decodes a real value, not a missing key.
    app = celery_app(options.redis_url)
    tid = f"bench-{uuid.uuid4()}"
    app.backend.store_result(tid, None, "STARTED")
    ns["_app"] = app
    ns["_backend"] = app.backend
    ns["_tid"] = tid

    def teardown() -> None:
        app.backend.forget(tid)

    return teardown


def _setup_abortable(ns: Namespace, options: Options) -> Teardown:
    from celery.contrib.abortable import AbortableAsyncResult

    ns["_AbortableAsyncResult"] = AbortableAsyncResult
    return _store_started(ns, options)


def _setup_redis_get(ns: Namespace, options: Options) -> Teardown:
    import redis

    client = redis.Redis.from_url(options.redis_url)
    key = f"cancellable-bench:{uuid.uuid4()}"
    client.set(key, b"0", ex=600)
    ns["_r"] = client
    ns["_key"] = key

    def teardown() -> None:
        client.delete(key)
        client.close()

    return teardown


def _setup_limitedset(ns: Namespace, options: Options) -> None:
    from celery.worker import state

    revoked = state.revoked
    for _ in range(REVOKED_IDS - len(revoked)):
        revoked.add(str(uuid.uuid4()))
    if len(revoked) < REVOKED_IDS:
        raise RuntimeError(f"celery's revoked set holds at most {len(revoked)} ids")
    ns["_revoked"] = revoked
    ns["_tid"] = str(uuid.uuid4())  # a running task that was not revoked: a miss


def _setup_event(ns: Namespace, options: Options) -> None:
    ns["_ev"] = threading.Event()


# -- the peers ---------------------------------------------------------------

_DRAMATIQ = ("dramatiq", "dramatiq_abort")


def _setup_dramatiq_actor(ns: Namespace, options: Options) -> Teardown:
    """This thread as the thread of a running dramatiq actor, with dramatiq-abort installed.

    The broker is dramatiq's `RedisBroker` with its default middleware and
    dramatiq-abort's `Abortable` (Redis event backend) added last, as its
    README shows, and it is the global broker (``abort_requested()`` finds
    the middleware there).  `Abortable.before_worker_boot` starts the abort
    watcher thread, and the broker's ``before_process_message`` hooks run
    for a message of a real actor in this thread: what dramatiq's
    ``WorkerThread.process_message`` does just before it calls the actor.
    The teardown runs the ``after_process_message`` hooks, as the worker
    does after the actor returns.
    """
    import dramatiq
    from dramatiq.broker import MessageProxy
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq_abort import Abortable, abort_requested
    from dramatiq_abort.backends import RedisBackend

    broker = RedisBroker(url=options.redis_url)
    abortable = Abortable(backend=RedisBackend.from_url(options.redis_url))
    broker.add_middleware(abortable)
    dramatiq.set_broker(broker)

    def bench_actor() -> None:
        """The actor whose message this thread runs (never sent)."""

    queue = f"cancellable-bench-peers-{uuid.uuid4().hex[:10]}"
    actor: Any = dramatiq.actor(broker=broker, queue_name=queue)(bench_actor)
    message = MessageProxy(actor.message())
    abortable.before_worker_boot(broker, None)  # its worker argument is not used
    broker.emit_before("process_message", message)
    ns.update(
        abort_requested=abort_requested,
        _abortable=abortable,
        _message=message,
        _broker=broker,
    )

    def teardown() -> None:
        broker.emit_after("process_message", message, result=None)
        broker.close()

    return teardown


def _setup_temporal(ns: Namespace, options: Options) -> None:
    # The timed loop runs inside ``env.run`` (`Case.run_inside`): the
    # activity context (a ContextVar) is set for exactly that call.
    from temporalio import activity
    from temporalio.testing import ActivityEnvironment

    env = ActivityEnvironment()
    ns.update(activity=activity, _env=env, _run_inside=env.run)


def _setup_cancelscope(ns: Namespace, options: Options) -> Teardown:
    import cancelscope

    scope = cancelscope.CancelScope()
    scope.__enter__()
    ns.update(
        cs_checkpoint=cancelscope.checkpoint,
        cs_is_cancelled=cancelscope.is_cancelled,
        _cs_scope=scope,
    )

    def teardown() -> None:
        scope.__exit__(None, None, None)

    return teardown


# --------------------------------------------------------------------------

CASES: tuple[Case, ...] = (
    Case(
        "baseline.timeit_loop",
        "one iteration of the harness loop around every statement (`pass`)",
        "pass",
    ),
    Case("baseline.empty_call", "call of an empty module-level function", "empty()"),
    Case(
        "baseline.loop_iteration",
        f"one iteration of a bare `for i in range({RANGE_ITERATIONS}): pass` loop",
        "for _i in _range_n:\n    pass",
        setup=_setup_range,
        inner_loops=RANGE_ITERATIONS,
        quick_loops=64,
    ),
    Case(
        "checkpoint.outside_scope",
        "checkpoint() with no cancel scope entered",
        "checkpoint()",
        setup=_setup_outside,
    ),
    Case(
        "checkpoint.live_scope",
        "checkpoint() inside an entered, not cancelled CancelScope",
        "checkpoint()",
        setup=_setup_live,
    ),
    Case(
        "checkpoint.deadline_armed",
        "checkpoint() inside a scope whose deadline is 1 hour away",
        "checkpoint()",
        setup=_setup_deadline,
    ),
    Case(
        "checkpoint.ten_hooks",
        f"checkpoint() inside a scope with {HOOKS} on_cancel hooks registered",
        "checkpoint()",
        setup=_setup_hooks,
    ),
    Case(
        "checkpoint.eight_threads",
        f"checkpoint() in a live scope while {OTHER_THREADS} other threads, each in its own "
        "scope, loop on checkpoint(); CPU time of the measuring thread",
        "checkpoint()",
        setup=_setup_threads,
        clock="thread_cpu",
    ),
    Case(
        "checkpoint.eight_threads_wall",
        "the same as checkpoint.eight_threads, in wall-clock time: includes the time the "
        f"measuring thread waits for the GIL while the {OTHER_THREADS} others run",
        "checkpoint()",
        setup=_setup_threads,
    ),
    Case(
        "checkpoint.other_thread_cancelled",
        "checkpoint() in a live scope while another thread's scope is cancelled and has not "
        "reached a checkpoint (the slow path: look up this thread's scope, find it live)",
        "checkpoint()",
        setup=_setup_other_cancelled,
    ),
    Case(
        "checkpoint.other_thread_cleaning_up",
        "checkpoint() in a live scope while another thread's cancelled scope runs its cleanup "
        "hooks (those scopes are set aside: the one-flag fast path)",
        "checkpoint()",
        setup=_setup_other_cleaning_up,
    ),
    Case(
        "checkpoint.with_block",
        "`with checkpoint(): pass` inside an entered, not cancelled CancelScope "
        "(checks on entry and on exit)",
        "with checkpoint():\n    pass",
        setup=_setup_live,
        unsupported=_no_with_checkpoint,
    ),
    Case(
        "is_cancelled.live_scope",
        "is_cancelled() inside an entered, not cancelled CancelScope",
        "is_cancelled()",
        setup=_setup_live,
    ),
    Case(
        "alt.abortable_is_aborted",
        "AbortableAsyncResult(tid, backend=..., app=...).is_aborted(), Redis result backend",
        "_AbortableAsyncResult(_tid, backend=_backend, app=_app).is_aborted()",
        setup=_setup_abortable,
        needs_redis=True,
        quick_loops=32,
    ),
    Case(
        "alt.asyncresult_state",
        "app.AsyncResult(tid).state, Redis result backend",
        "_app.AsyncResult(_tid).state",
        setup=_store_started,
        needs_redis=True,
        quick_loops=32,
    ),
    Case(
        "alt.redis_get",
        "redis-py GET of a short key on loopback",
        "_r.get(_key)",
        setup=_setup_redis_get,
        needs_redis=True,
        quick_loops=32,
    ),
    Case(
        "alt.limitedset_contains",
        f"`tid in celery.worker.state.revoked` (a miss), the set filled with {REVOKED_IDS:,} ids",
        "_tid in _revoked",
        setup=_setup_limitedset,
    ),
    Case(
        "alt.event_is_set",
        "threading.Event().is_set()",
        "_ev.is_set()",
        setup=_setup_event,
    ),
    Case(
        "peers.dramatiq_abort_requested",
        "dramatiq-abort: `abort_requested()` in a running actor (finds the Abortable "
        "middleware on the global broker, then this thread's abort request)",
        "abort_requested()",
        setup=_setup_dramatiq_actor,
        needs_redis=True,
        requires=_DRAMATIQ,
    ),
    Case(
        "peers.dramatiq_abort_requested_middleware",
        "dramatiq-abort: `abort_requested(middleware=abortable)` in a running actor "
        "(the middleware passed in: no search of the broker's middleware list)",
        "abort_requested(middleware=_abortable)",
        setup=_setup_dramatiq_actor,
        needs_redis=True,
        requires=_DRAMATIQ,
    ),
    Case(
        "peers.temporal_is_cancelled",
        "Temporal: `activity.is_cancelled()` in a sync activity run by the testing "
        "`ActivityEnvironment`",
        "activity.is_cancelled()",
        setup=_setup_temporal,
        requires=("temporalio",),
        run_inside="_run_inside",
    ),
    Case(
        "peers.cancelscope_checkpoint",
        "cancelscope 0.1: `checkpoint()` inside an entered, not cancelled `CancelScope`",
        "cs_checkpoint()",
        setup=_setup_cancelscope,
        requires=("cancelscope",),
    ),
    Case(
        "peers.cancelscope_is_cancelled",
        "cancelscope 0.1: `is_cancelled()` inside an entered, not cancelled `CancelScope`",
        "cs_is_cancelled()",
        setup=_setup_cancelscope,
        requires=("cancelscope",),
    ),
)

CASES += tuple(
    Case(
        f"context.body_{label}.{kind}",
        f"a loop body of about {label} (`body({size})`)"
        + (" after checkpoint()" if kind == "checkpoint" else "")
        + ", inside a live scope",
        stmt,
        setup=_context_setup(size),
        quick_loops=max(16, 2_000_000 // (100 + 60 * size)),  # about 2 ms
    )
    for label, size in CONTEXT_BODIES
    for kind, stmt in (("plain", "_body(_size)"), ("checkpoint", "checkpoint()\n_body(_size)"))
)

CASES_BY_NAME = {case.name: case for case in CASES}

#: Baselines every ratio needs; always measured when any per-call case is.
BASELINES = ("baseline.timeit_loop", "baseline.empty_call", "baseline.loop_iteration")

__all__ = [
    "BASELINES",
    "CASES",
    "CASES_BY_NAME",
    "CONTEXT_BODIES",
    "Case",
    "Options",
    "celery_app",
    "clock_for",
    "empty",
    "make_inner",
    "missing",
    "run_setup",
    "timed",
    "unavailable",
]
