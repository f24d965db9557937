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
thread opened).  Each hook with a budget runs inside a scope of its own, the
*budget scope* (a shielded `CancelScope` that ``_scope``, which sits above
this module, makes for `run_hooks`), entered under the cleanup shield; the timer thread calls
`_Budget.expire` when the budget runs out, which cancels that scope: the
hook's next checkpoint, `cancellable.sleep` or `cancellable.wait` raises
`Cancelled`, the budget scope absorbs it, and the runner records
`HookTimeoutError`.  That is all a budget does in most processes, and a
``cleanup.overran`` warning says so when it expires.

The rule for locks
------------------

Raising at an arbitrary bytecode (``PyThreadState_SetAsyncExc``, the way
CPython delivers `KeyboardInterrupt`) would stop a hook in pure Python too,
but it can land right after a C-level ``acquire()`` and before the ``try``
that releases it: the lock stays held for ever and the next task of the
process that needs it hangs.  It is the same hazard as the Celery
integration's interrupt step, and the same rule applies: the exception is
injected only in a process that an integration will retire once its task
has been reported (`allow_async_raise`: a Celery prefork child), and the
integration is told (``on_raised``) before each such raise.  In every other
process (in-process pools, plain Python, gevent and eventlet, where all
greenlets share one OS thread) a budget never raises at an arbitrary
bytecode.  An injected exception is delivered at the next bytecode the hook
executes: a hook blocked inside one long C call is interrupted only when
that call returns.

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
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Protocol

from . import _timer
from ._exceptions import CancelReason, HookTimeoutError
from ._log import logger
from .events import CLEANUP_FAILED, CLEANUP_OVERRAN, CLEANUP_TIMED_OUT

__all__ = [
    "BudgetScope",
    "Hook",
    "HookHandle",
    "allow_async_raise",
    "async_raise_allowed",
    "register",
    "run_hooks",
    "take_for_cleanup",
]

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int


class BudgetScope(Protocol):
    """The scope a hook with a budget runs in: a shielded `CancelScope` (made by ``_scope``)."""

    def __enter__(self) -> object: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
    def cancel(self, reason: CancelReason) -> None: ...
    @property
    def cancelled_caught(self) -> bool: ...


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


#: Seconds a hook whose budget is spent gets to stop at a checkpoint before
#: it is raised into, where that is allowed (`allow_async_raise`).
INTERRUPT_AFTER: Final = 0.1


class _Budget:
    """The time budget of one hook run (see "Running" in the module docstring)."""

    __slots__ = (
        "budget",
        "fields",
        "fired",
        "handle",
        "hook",
        "lock",
        "raise_anywhere",
        "running",
        "scope",
        "thread_id",
    )

    def __init__(
        self,
        scope: Any = None,
        hook: Hook | None = None,
        budget: float = 0.0,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.running = True
        #: Whether `HookTimeoutError` was injected into the hook's thread.
        self.fired = False
        self.thread_id = threading.get_ident()
        #: The hook's budget scope (a `CancelScope` entered around the hook).
        self.scope = scope
        self.hook = hook
        self.budget = budget
        self.fields = fields or {}
        #: Whether this process lets a budget raise at an arbitrary bytecode
        #: (`allow_async_raise`); decided when the hook starts.
        self.raise_anywhere = False
        #: The timer entry of the next step (`expire`, then `interrupt`).
        self.handle: _timer.TimerHandle | None = None

    def expire(self) -> None:
        # The budget is spent.  Runs on the timer thread (or, under gevent
        # or eventlet, at a checkpoint: see _timer).
        with self.lock:
            if not self.running:
                return
        # Wake the hook's cancellable.sleep / wait, make its next checkpoint
        # raise (nothing if it has just finished: the scope has exited).
        if self.scope is not None:
            self.scope.cancel(
                CancelReason(
                    source="deadline", message=f"cleanup hook budget of {self.budget}s spent"
                )
            )
        if self.raise_anywhere:
            # The hook gets a moment to stop at a checkpoint before it is
            # raised into (and its process has to be retired).
            self.handle = _timer.schedule(time.monotonic() + INTERRUPT_AFTER, self.interrupt)
        elif self.hook is not None:
            logger.warning(
                CLEANUP_OVERRAN,
                hook=repr(self.hook.fn),
                budget_s=self.budget,
                why="a cleanup hook is interrupted only at its checkpoints, cancellable.sleep "
                "and cancellable.wait in this process",
                **self.fields,
            )

    def interrupt(self) -> None:
        # `INTERRUPT_AFTER` after the budget, on the timer thread, in a
        # process that allows it: raise in the hook's thread wherever it is.
        with self.lock:
            on_raised = _permission.on_raised
            if not self.running or on_raised is None:
                return
            self.fired = True
            # Before the raise: the process must be retired even if the
            # exception lands in a gap that leaves a lock held.
            on_raised()
            _set_async_exc(self.thread_id, HookTimeoutError)


class _Permission:
    """Whether budgets may raise at an arbitrary bytecode here (see `allow_async_raise`)."""

    __slots__ = ("on_raised",)

    def __init__(self) -> None:
        self.on_raised: Callable[[], object] | None = None


_permission = _Permission()


def allow_async_raise(on_raised: Callable[[], object]) -> Callable[[], None]:
    """Let hook budgets raise at an arbitrary bytecode in this process, and say when one does.

    For an integration, in a process it retires once the task it runs has
    been reported (a Celery prefork child: the one place where a lock an
    exception left held cannot make a later task hang).  From then on a hook
    that overruns its budget gets `HookTimeoutError` injected into its
    thread, wherever it is, and ``on_raised()`` is called just before each
    such raise: on the timer thread, under a lock, so it must only set a
    flag (no lock, no I/O).  Without this permission (every other process,
    and any process forked from this one) a budget is enforced only where
    the library controls the landing point: the hook's checkpoints,
    `cancellable.sleep` and `cancellable.wait`.

    Returns:
        A function that takes the permission back.
    """
    _permission.on_raised = on_raised

    def revoke() -> None:
        if _permission.on_raised is on_raised:
            _permission.on_raised = None

    return revoke


def async_raise_allowed() -> bool:
    """Whether hook budgets may raise at an arbitrary bytecode here (`allow_async_raise`)."""
    return _permission.on_raised is not None and not _timer.monkey_patched()


#: Budgets of hooks that are running now.  Only for the fork handler: a
#: budget's lock may be held by the timer thread at the moment of a fork, and
#: the child, which has no timer thread, would then wait for it forever.
_running: set[_Budget] = set()


def _after_fork_in_child() -> None:
    # A thread that held the registration lock at the fork is gone: start
    # with a free one.
    global _lock
    _lock = threading.Lock()
    # The permission to raise anywhere was given for the process that gave
    # it (it is the one that will be retired), not for its children.
    _permission.on_raised = None
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


def _call_with_budget(
    hook: Hook,
    budget: float | None,
    fields: Mapping[str, Any],
    budget_scope: Callable[[], BudgetScope],
) -> None:
    if budget is None:
        hook.fn(*hook.args, **hook.kwargs)
        return
    scope = budget_scope()
    with scope:
        state = _Budget(scope, hook, budget, fields)
        state.raise_anywhere = async_raise_allowed()
        _running.add(state)
        state.handle = _timer.schedule(time.monotonic() + budget, state.expire)
        try:
            try:
                hook.fn(*hook.args, **hook.kwargs)
            finally:
                with state.lock:
                    state.running = False
                if state.handle is not None:
                    state.handle.cancel()
                _running.discard(state)
        except HookTimeoutError:
            if state.fired:
                raise _timed_out(hook, budget) from None
            raise
    if scope.cancelled_caught:
        # The hook stopped at a checkpoint, cancellable.sleep or wait once
        # its budget was spent.
        raise _timed_out(hook, budget)


def _timed_out(hook: Hook, budget: float) -> HookTimeoutError:
    return HookTimeoutError(f"cleanup hook {hook.fn!r} ran longer than its budget of {budget}s")


def run_hooks(
    hooks: Sequence[Hook],
    budget: float | None,
    log_fields: Mapping[str, Any] | None,
    budget_scope: Callable[[], BudgetScope],
) -> tuple[BaseException, ...]:
    """Run ``hooks`` in the given order; return the errors they raised.

    Each hook runs within ``budget`` seconds (None: no limit), inside a new
    ``budget_scope()`` that the budget cancels (``_scope`` passes a factory
    of shielded `CancelScope` objects: this module sits below it).

    `KeyboardInterrupt` and `SystemExit` from a hook are re-raised, but only
    after every other hook has run.
    """
    fields = dict(log_fields or {})
    errors: list[BaseException] = []
    fatal: BaseException | None = None
    for hook in hooks:
        try:
            _call_with_budget(hook, budget, fields, budget_scope)
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
