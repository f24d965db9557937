"""Cleanup hooks: registering them on a scope, and running them.

Registering
-----------

`on_cancel` (in ``_scope``, which knows the current scope) calls `register`,
which appends a `HookHandle` to the scope's list of hooks; `HookHandle.remove`
takes it out again; `take_for_cleanup` empties the list and returns the hooks
in the order they run, last registered first.  All three hold ``_lock``, a
lock of this module that guards every scope's list and under which nothing
blocks.  A scope's hooks run exactly once, when a `Cancelled` unwinds through
it, whether it is a thread's scope (`CancelScope.__exit__`) or the detached
scope of an ``async def`` call: both go through ``_scope.run_cleanup``, which
takes the hooks here and runs them with `run_hooks` under a shield.

Running
-------

Hooks run on the thread that owns the scope, because cleanup usually touches
thread-bound resources (a database connection, a transaction, a temp file a
thread opened).  To bound a hook's time without moving it to another thread,
the timer thread injects `HookTimeoutError` into the hook's thread when the
budget runs out (``PyThreadState_SetAsyncExc``, the same mechanism CPython
uses for `KeyboardInterrupt`).  The exception is delivered at the next
bytecode the hook executes: a hook blocked inside one long C call (a socket
read with no timeout) is interrupted only when that call returns.

The race between "hook finished" and "budget expired" is closed with a small
lock: the timer injects only while the hook is still marked running, and the
runner marks it finished under the same lock, inside the ``try`` that catches
the injected exception, so an injection can never escape the runner.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from . import _timer
from ._exceptions import HookTimeoutError
from ._log import logger
from .events import CLEANUP_FAILED, CLEANUP_TIMED_OUT

__all__ = ["Hook", "HookHandle", "register", "run_hooks", "take_for_cleanup"]

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int


class Hook(Protocol):
    """What `run_hooks` runs: ``fn(*args, **kwargs)`` (a `HookHandle` is one)."""

    @property
    def fn(self) -> Callable[..., object]: ...
    @property
    def args(self) -> tuple[Any, ...]: ...
    @property
    def kwargs(self) -> dict[str, Any]: ...


#: Guards every scope's list of hooks (`register`, `HookHandle.remove`,
#: `take_for_cleanup`).  Held only for a list operation; replaced in the child
#: after a fork, where the thread that held it may not exist.
_lock = threading.Lock()


class HookHandle:
    """A registered cleanup hook; returned by `on_cancel`.

    Attributes:
        scope: The `CancelScope` the hook is registered on.
        fn: The hook.
        args: Positional arguments it is called with.
        kwargs: Keyword arguments it is called with.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_hooks", "args", "fn", "kwargs", "scope")

    def __init__(
        self,
        scope: Any,  # a CancelScope: this module sits below _scope, which imports it
        fn: Callable[..., object],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        hooks: list[HookHandle] | None = None,
    ) -> None:
        self.scope = scope
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        #: The list of the scope this handle is registered in (None: none).
        self._hooks = hooks

    def __repr__(self) -> str:
        return f"<HookHandle {self.fn!r}>"

    def remove(self) -> None:
        """Unregister the hook.  Does nothing if it already ran or was removed."""
        with _lock:
            if self._hooks is not None and self in self._hooks:
                self._hooks.remove(self)


def register(
    hooks: list[HookHandle],
    scope: Any,
    fn: Callable[..., object],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> HookHandle:
    """Append a hook to ``hooks``, the list of ``scope``; return its handle."""
    handle = HookHandle(scope, fn, args, kwargs, hooks)
    with _lock:
        hooks.append(handle)
    return handle


def take_for_cleanup(hooks: list[HookHandle]) -> list[HookHandle]:
    """Empty ``hooks`` and return them in the order they run: last registered first."""
    with _lock:
        taken = hooks[::-1]
        hooks.clear()
    return taken


class _Budget:
    __slots__ = ("fired", "lock", "running", "thread_id")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = True
        self.fired = False
        self.thread_id = threading.get_ident()

    def expire(self) -> None:
        # Runs on the timer thread.
        with self.lock:
            if not self.running:
                return
            self.fired = True
            _set_async_exc(self.thread_id, HookTimeoutError)


#: Budgets of hooks that are running now.  Only for the fork handler: a
#: budget's lock may be held by the timer thread at the moment of a fork, and
#: the child, which has no timer thread, would then wait for it forever.
_running: set[_Budget] = set()


def _after_fork_in_child() -> None:
    # A thread that held the registration lock at the fork is gone: start
    # with a free one.
    global _lock
    _lock = threading.Lock()
    # Only the forking thread survives; if it is inside a hook, that hook's
    # budget is the one to keep (with a lock nobody holds: the timer thread
    # that might have held it is gone, and so is the timer entry, so the
    # budget no longer fires).  The other threads' hooks will never finish.
    me = threading.get_ident()
    for state in list(_running):
        if state.thread_id == me:
            state.lock = threading.Lock()
        else:
            _running.discard(state)


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: Whether the one warning about budgets under gevent/eventlet was given.
_warned_unenforced = False


def _budgets_enforceable() -> bool:
    # Under gevent or eventlet all greenlets share one OS thread, so an
    # exception injected into "the hook's thread" lands in whichever greenlet
    # runs at that moment, and the timer runs on a thread of its own that
    # must not touch the task's (patched) locks anyway.  Budgets are then
    # not enforced, and we say so once per process.
    global _warned_unenforced
    if not _timer.monkey_patched():
        return True
    if not _warned_unenforced:
        _warned_unenforced = True
        warnings.warn(
            "cancellable: cleanup-hook time budgets (hook_timeout) are not enforced "
            "under gevent or eventlet monkey-patching; hooks run to completion. "
            "Give the I/O inside hooks its own timeouts.",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def _call_with_budget(hook: Hook, budget: float | None) -> None:
    if budget is None or not _budgets_enforceable():
        hook.fn(*hook.args, **hook.kwargs)
        return
    state = _Budget()
    _running.add(state)
    handle = _timer.schedule(time.monotonic() + budget, state.expire)
    try:
        try:
            hook.fn(*hook.args, **hook.kwargs)
        finally:
            with state.lock:
                state.running = False
            handle.cancel()
            _running.discard(state)
    except HookTimeoutError:
        if state.fired:
            raise HookTimeoutError(
                f"cleanup hook {hook.fn!r} ran longer than its budget of {budget}s"
            ) from None
        raise


def run_hooks(
    hooks: Sequence[Hook], budget: float | None, log_fields: Mapping[str, Any] | None = None
) -> tuple[BaseException, ...]:
    """Run ``hooks`` in the given order; return the errors they raised.

    `KeyboardInterrupt` and `SystemExit` from a hook are re-raised, but only
    after every other hook has run.
    """
    fields = dict(log_fields or {})
    errors: list[BaseException] = []
    fatal: BaseException | None = None
    for hook in hooks:
        try:
            _call_with_budget(hook, budget)
        except (KeyboardInterrupt, SystemExit) as exc:
            fatal = fatal or exc
        except HookTimeoutError as exc:
            errors.append(exc)
            logger.warning(CLEANUP_TIMED_OUT, hook=repr(hook.fn), budget_s=budget, **fields)
        except BaseException as exc:  # noqa: BLE001 - isolate hooks from each other
            errors.append(exc)
            logger.warning(
                CLEANUP_FAILED, hook=repr(hook.fn), error=repr(exc), exc_info=exc, **fields
            )
    if fatal is not None:
        raise fatal
    return tuple(errors)
