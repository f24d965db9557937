"""``@cancellable`` on ``async def``: a cancel scope that cancels an asyncio task.

Two ways a decorated coroutine function runs:

Awaited (any event loop, no integration claims the call)
    `call_async` opens a *detached* scope (`_scope.enter_detached`):
    entered, but on no thread's stack, because it lives across awaits while
    other coroutines run on the same thread and would see, or exit, it.  The
    scope is found through the context variable ``_scope._bound`` instead,
    which every asyncio task has its own copy of.  When the scope becomes
    cancelled (`CancelScope.cancel` from any thread, its deadline), the
    asyncio task that awaits the call is cancelled at its current ``await``
    with the reason as the cancel message.

Run to completion (a Celery task body: the integration's runner calls it)
    `run_async_in_scope` enters the task's scope on the worker thread, as
    for a synchronous body, and runs the coroutine with a fresh
    `asyncio.run`.  The event loop lives entirely inside the scope, so
    synchronous helpers the coroutine calls see the task's scope as usual.

In both, `_run_bound` maps the scope's cancellation onto the asyncio task
(`CancelScope.add_cancel_callback` -> ``loop.call_soon_threadsafe(task.cancel,
message)``) and, when the `asyncio.CancelledError` that this caused comes
back out of the coroutine, turns it into `Cancelled` with the reason, the
same exception a synchronous call raises.  A `CancelledError` that someone
else caused (`asyncio.timeout`, an anyio scope, ``task.cancel()``) passes
through untouched.

Invariants:

* The canceller calls ``task.cancel`` at most once per call, on the loop's
  thread, and only while the coroutine runs (``active``): a cancellation that
  arrives after the call ended does nothing.
* Every ``task.cancel`` the canceller made is matched by one
  ``task.uncancel`` (Python 3.11+) when the call ends, so the task's
  ``cancelling()`` count is what it was before: `asyncio.timeout` and
  task groups around the call keep working.
* Signal handlers in a prefork child only queue work for the next checkpoint
  (`_scope.request_slow_path`); a coroutine waiting in ``await`` never calls
  one, so while a Celery task's loop runs, `_Waker` has the loop run that
  work as soon as it is queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from . import _scope, _timer
from ._exceptions import Cancelled, CancelReason
from ._log import logger, reason_fields
from .events import CANCEL_SWALLOWED

__all__ = ["call_async", "run_async_in_scope", "warn_if_swallowed"]

R = TypeVar("R")


class CallOptions(Protocol):
    """What this module needs of ``_decorator.CallOptions`` (which imports us)."""

    def new_scope(self) -> _scope.CancelScope: ...
    @property
    def on_cancel(self) -> Callable[[], object] | None: ...


class _Canceller:
    """Cancels one asyncio task when a scope becomes cancelled, from any thread."""

    __slots__ = ("active", "loop", "reason", "scope", "task")

    def __init__(
        self,
        scope: _scope.CancelScope,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
    ) -> None:
        self.scope = scope
        self.loop = loop
        self.task = task
        self.active = True
        #: The reason the task was cancelled with (None: not cancelled by us).
        self.reason: CancelReason | None = None

    def __call__(self, reason: CancelReason) -> None:
        # A scope's cancel callback: any thread, outside the scope's lock.
        try:
            self.loop.call_soon_threadsafe(self._deliver, reason)
        except RuntimeError:
            pass  # the loop is closed: the call is over

    def _deliver(self, reason: CancelReason) -> None:
        # On the loop's thread, between two steps of the task.
        if self.active and self.reason is None:
            self.reason = reason
            # The await is this call's checkpoint: observed now (the
            # latencies of a Celery task count from here).
            _scope.observe(self.scope, reason)
            self.task.cancel(reason.describe())

    def uncancel(self) -> int:
        """Undo our ``task.cancel`` (3.11+); return the task's remaining cancel count."""
        uncancel = getattr(self.task, "uncancel", None)
        if uncancel is None:  # Python 3.10: no cancel counting
            return 0
        remaining: int = uncancel()
        return remaining


class _Waker:
    """Runs deferred slow-path work on the loop as soon as it is queued.

    A coroutine waiting in ``await`` reaches no checkpoint, so work that a
    signal handler (a prefork wake-up) or the timer's OS thread (under gevent)
    queued with `_scope.request_slow_path` would wait for the next one.
    `_scope.add_slow_path_waker` calls us right after it is queued, and we
    hand it to the loop with ``call_soon_threadsafe``: signal-safe (asyncio's
    own signal handling does the same) and it wakes a loop blocked in its
    selector.
    """

    __slots__ = ("loop", "remove")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.remove = _scope.add_slow_path_waker(self._wake)
        if _scope.deferred_work_waiting():  # queued before we were listening
            loop.call_soon(self._run)

    def _wake(self) -> None:
        # Any thread, or a signal handler on the loop's thread.
        self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        _scope.run_deferred()

    def stop(self) -> None:
        self.remove()


def warn_if_swallowed(scope: _scope.CancelScope, wrapped: object, *, delivered: bool) -> None:
    """Log `CANCEL_SWALLOWED` if a cancelled call returned as if nothing happened.

    ``delivered``: a `Cancelled` or `asyncio.CancelledError` was raised into
    the body (a checkpoint raised, or the asyncio task was cancelled).
    """
    reason = scope.cancel_reason
    if reason is None or not (delivered or _scope.observed_at(scope) is not None):
        return
    logger.warning(
        CANCEL_SWALLOWED,
        function=getattr(wrapped, "__qualname__", repr(wrapped)),
        **_scope.log_fields(scope),
        **reason_fields(reason),
    )


async def _run_bound(
    scope: _scope.CancelScope,
    coro: Coroutine[Any, Any, R],
    wrapped: object,
    *,
    wake: bool,
) -> R:
    """Await ``coro``; cancel the current task when ``scope`` becomes cancelled."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - a coroutine awaited outside any task
        raise RuntimeError("@cancellable async calls must run inside an asyncio task")
    canceller = _Canceller(scope, loop, task)
    remove = scope.add_cancel_callback(canceller)
    waker = _Waker(loop) if wake else None
    try:
        result = await coro
    except asyncio.CancelledError as exc:
        canceller.active = False
        reason = canceller.reason
        if reason is None or canceller.uncancel() > 0:
            # Not ours, or someone else cancelled the task too: theirs wins,
            # the asyncio way.
            raise
        raise Cancelled(reason) from exc
    except BaseException:
        canceller.active = False
        if canceller.reason is not None:
            canceller.uncancel()
        raise
    finally:
        canceller.active = False
        remove()
        if waker is not None:
            waker.stop()
    if canceller.reason is not None:
        canceller.uncancel()
    warn_if_swallowed(scope, wrapped, delivered=canceller.reason is not None)
    return result


def run_async_in_scope(
    wrapped: Callable[..., Coroutine[Any, Any, R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: CallOptions,
    scope: _scope.CancelScope,
) -> R:
    """Run the coroutine function ``wrapped`` to completion inside ``scope`` (sync).

    A fresh `asyncio.run` per call: the loop is private to the call, so
    nothing leaks between tasks, no loop is shared between a threads pool's
    threads, and none survives into a forked child.  Refuses to run on a
    thread whose event loop is running (`asyncio.run` raises RuntimeError).
    """
    with scope:
        if options.on_cancel is not None:
            _scope.on_cancel(options.on_cancel)
        # Threads started with asyncio.to_thread copy the context: their
        # checkpoints then answer for this scope too.
        token = _scope.bind(scope, scope)
        try:
            # Signals (prefork wake-ups) and the timer's hand-over under
            # gevent queue their work for a checkpoint: have the loop run it.
            result = asyncio.run(_run_bound(scope, wrapped(*args, **kwargs), wrapped, wake=True))
        finally:
            _scope.unbind(token)
    # The scope never swallows its Cancelled (see CallOptions.new_scope).
    return result


async def call_async(
    wrapped: Callable[..., Coroutine[Any, Any, R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: CallOptions,
) -> R:
    """Await ``wrapped(*args, **kwargs)`` in a new detached scope (see the module docstring)."""
    scope = options.new_scope()
    base = _scope.thread_innermost()
    # The enclosing scope: an enclosing async call's, or the thread's (a
    # Celery task's, around the loop).  Its cancellation makes this scope
    # effectively cancelled, so checkpoints in here see it too.
    _scope.enter_detached(scope, _scope.current_scope())
    token = _scope.bind(scope, base)
    try:
        if options.on_cancel is not None:
            _scope.on_cancel(options.on_cancel)
        # Under gevent or eventlet the timer hands deadlines over to the
        # next checkpoint, which a waiting coroutine never reaches.
        return await _run_bound(
            scope, wrapped(*args, **kwargs), wrapped, wake=_timer.monkey_patched()
        )
    except (Cancelled, asyncio.CancelledError) as exc:
        # What CancelScope.__exit__ does for a Cancelled passing through, for
        # a detached scope: its hooks run, whether this scope or an enclosing
        # one (or asyncio) caused it.
        _scope.run_cleanup(scope, exc)
        raise
    finally:
        _scope.unbind(token)
        _scope.exit_detached(scope)
