"""Cancel scopes and the checkpoint hot path.

How it fits together
--------------------

Each thread has a stack of entered `CancelScope` objects (innermost last).
A scope is *effectively cancelled* when it was cancelled itself, or when its
parent (the scope below it on the same thread's stack) is effectively
cancelled and it is not a shield.  Like trio, we compute that answer when
something changes (`cancel`, `shield`, entering a scope), not when someone
asks: `_recalculate` pushes it up the stack and stores, in each scope's
``_effective_reason`` slot, the reason a checkpoint there would raise with
(None: not effectively cancelled).

The hot path
------------

`checkpoint` must cost about as much as an empty function call.  It has one
body, and while nothing is pending that body tests exactly one module global,
``_pending``, and returns the shared context manager that makes ``with
checkpoint():`` check again on exit (`_CheckpointContext`).  It keeps no
local variable: on CPython 3.11+ one costs every call a tenth of an empty
call (see ``docs/design.md``).  ``_pending`` is False unless something in
this process could make a checkpoint raise:

* some entered scope (on any thread) has been cancelled, or
* work was handed to us from a signal handler (``_deferred``), or
* a test probe is installed (``_probes``, see `cancellable.testing`).

When it is True, the checkpoint answers the common case in place: "nothing
for this thread".  That is what every *other* thread sees between one
thread's scope being cancelled and that thread reaching its cleanup, so it
must stay cheap: one read of ``_shared_work`` (deferred work or probes,
which concern every thread), one read of this thread's innermost scope from
``_local`` and one slot read of that scope's ``_effective_reason`` (and,
only while some ``async def`` call is bound, the context variable `_bound`
and the bound scope's answer, through `_resolve`).  Only if one of them
says so do we call `_slow_checkpoint`, which does the work and raises.  A
cancellation on one thread therefore makes other threads' checkpoints a
little slower but never makes them raise: a thread only ever
looks at its own innermost scope.  The cleanup itself, which may take
seconds, does not slow the others: while hooks run under their shield the
cancelled scopes below it are set aside from the count (invariant 2), and
the flag drops if nothing else is pending.

There used to be a second, "idle" body on CPython 3.10-3.12, switched in by
assigning ``__code__``; it saved about 2 ns per call on 3.11-3.12 and cost
`inspect.getsource`, debuggers, profilers and audit hooks their
straightforward view of the function.  Simple beats clever: see
``docs/design.md``.

Coroutines
----------

The scope of an ``async def`` call (``_async``) is *detached*: entered, but
on no thread's stack, since it lives across awaits while other coroutines
use the same thread.  Checkpoints find it through the context variable
`_bound` (see `_Binding` and `_resolve`), read only while the flag is up
and ``_bindings_live`` says some such call runs.  `CancelScope.add_cancel_callback`
lets it cancel its asyncio task: `_recalculate` collects the callbacks of
scopes that just became effectively cancelled and its caller runs them with
`_fire` after releasing ``_lock``.

Other modules
-------------

The rest of the core and the integrations use scopes through the public API
and the small functions at the end of this module (`cancel_with`,
`set_log_fields`, `observe`, `shield_inside`, `run_deferred`,
`acquire_lock_if_free`, ...), never through a scope's private attributes.
Cleanup hooks run in one place, `run_cleanup`, for a thread's scope and for
a coroutine's alike; ``_hooks`` keeps the registry and the runner, and
``_timeouts`` the deadline constructors.

Invariants (all mutations happen under ``_lock``, except where noted):

1. ``_pending`` is True whenever ``_cancelled_live > 0`` or
   ``_shared_work`` is True; ``_shared_work`` is True whenever ``_deferred``
   or ``_probes`` is non-empty.  Either may be True spuriously for a moment;
   neither is ever False while its condition holds, once the writer has
   finished `_update_pending`.
2. ``_cancelled_live`` counts scopes that are entered, not yet exited, and
   have ``cancel_called``.  Each scope adds itself at most once (``_counted``).
   One exception: while a thread runs cleanup hooks (under the shield
   `run_cleanup` enters), the counted scopes below that shield
   are set aside, since none of them can make a checkpoint raise until the
   shield exits; they count again before it does.
3. A scope's ``_stack`` is the stack of the thread that entered it, and
   ``_stack[_depth] is scope`` while it is entered; a detached scope has
   ``_stack`` None and learns of its parent's cancellation by callback.
4. For every thread that has used this module, ``_local.innermost is
   (_local.stack[-1] if _local.stack else None)`` outside `CancelScope.__enter__`
   and `CancelScope._close`, the only writers.  Both run on the owning thread
   (a ``threading.local`` can only be written by its own thread), which is why
   another thread's cancel reaches a checkpoint through the innermost scope's
   ``_effective_reason`` slot and not through ``_local``.
5. Signal handlers never take ``_lock``: a handler runs on the main thread
   between two bytecodes, possibly while that thread holds the lock.  They use
   `request_slow_path`, which only appends to a deque and raises the flags.
   `_update_pending` re-reads ``_deferred`` after writing the flags so a
   handler that ran in between is not lost.
6. Hooks and logging run outside ``_lock``.
7. No lock is ever held across ``os.fork()``: `_before_fork` takes ``_lock``
   and releases it after the fork in the parent; the child gets a new lock
   and bookkeeping recomputed from the one thread it has (`_after_fork_in_child`).
"""

from __future__ import annotations

import collections
import contextvars
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Final

from . import _config, _timer
from ._config import DEFAULT, _Default
from ._exceptions import Cancelled, CancelReason
from ._hooks import HookHandle, register, run_hooks, take_for_cleanup
from ._log import logger, reason_fields
from .events import CANCEL_OBSERVED, CANCEL_REQUESTED, SCOPE_CANCELLED

__all__ = [
    "CancelScope",
    "acquire_lock_if_free",
    "add_probe",
    "add_slow_path_waker",
    "bind",
    "cancel_with",
    "checkpoint",
    "current_scope",
    "deferred_work_waiting",
    "enter_detached",
    "exit_detached",
    "is_cancelled",
    "is_entered",
    "lock_held_here",
    "log_fields",
    "observe",
    "observed_at",
    "on_cancel",
    "propagate_own_cancellation",
    "release_lock",
    "remove_probe",
    "request_slow_path",
    "run_cleanup",
    "run_deferred",
    "set_log_fields",
    "shield_inside",
    "thread_innermost",
    "unbind",
]

# --------------------------------------------------------------------------
# Process-wide state.  See the invariants in the module docstring.

#: Whether checkpoints must look further: the one flag the hot path reads
#: while nothing is pending.  Module global on purpose: LOAD_GLOBAL of a
#: module attribute is the cheapest read CPython has from inside a function.
_pending: bool = False
#: Whether deferred work or probes wait: things every thread's next
#: checkpoint must do, whatever its own scopes say.
_shared_work: bool = False

#: Guards the bookkeeping below and every scope's state.  Not Final: the
#: child of a fork gets a new one (invariant 7).
_lock = threading.RLock()
#: Per thread: ``stack``, the entered scopes (innermost last), and
#: ``innermost``, the last of them or None (invariant 4).  Both are set
#: together, by `_init_thread`, the first time a thread needs them.
_local: Final = threading.local()
_cancelled_live: int = 0
_deferred: collections.deque[Callable[[], object]] = collections.deque()
_probes: list[Callable[[], object]] = []


def _update_pending() -> None:
    # Caller holds _lock.  The only writer of the flags besides
    # request_slow_path, which only ever raises them (invariant 5).
    global _pending, _shared_work
    _shared_work = bool(_deferred or _probes)
    _pending = _shared_work or _cancelled_live > 0
    if _deferred:
        # A signal handler may have appended between the read above and the
        # writes (invariant 5): raise the flags again so its wake-up is not
        # overwritten.
        _shared_work = _pending = True


def request_slow_path(callback: Callable[[], object]) -> None:
    """Run ``callback()`` at the next checkpoint or `is_cancelled` call.

    Safe to call from a signal handler and from threads that must not take
    this module's lock (the timer's OS thread under gevent or eventlet): it
    takes no lock and does no I/O.  The callback runs on whichever thread
    checks first, outside the lock; it usually cancels a scope.
    """
    global _pending, _shared_work
    # Append first, raise the flags second: a checkpoint that sees the flags
    # up finds the callback (invariant 1).
    _deferred.append(callback)
    _shared_work = True
    _pending = True
    # Code that waits without checking (an event loop in ``await``) gets a
    # nudge.  A copy, since the list may change on another thread meanwhile.
    for waker in tuple(_wakers):
        try:
            waker()
        except Exception:  # noqa: BLE001 - a closed loop: its call is over
            pass


#: Signal-safe callables that `request_slow_path` calls after queueing work,
#: so that code waiting without reaching a checkpoint can come and run it.
#: Appended and removed without the lock (list operations are atomic), since
#: it is read from signal handlers.
_wakers: list[Callable[[], object]] = []


def add_slow_path_waker(waker: Callable[[], object]) -> Callable[[], None]:
    """Call ``waker()`` whenever `request_slow_path` queues work; return a remover.

    ``waker`` may run inside a signal handler or on a foreign OS thread: it
    must take no lock and only schedule the work (for an asyncio loop,
    ``loop.call_soon_threadsafe``, which asyncio's own signal support uses).
    """
    _wakers.append(waker)

    def remove() -> None:
        try:
            _wakers.remove(waker)
        except ValueError:
            pass

    return remove


# Under gevent/eventlet the timer runs on an OS thread of its own, which must
# not take our (patched) lock: it hands deadlines to us through this door.
_timer.set_handoff(request_slow_path)


def _run_deferred() -> None:
    while True:
        try:
            callback = _deferred.popleft()
        except IndexError:
            break
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - never break the task that checks
            _timer.report_unraisable(exc, callback, "Exception in cancellable deferred callback")
    with _lock:
        _update_pending()


def _init_thread() -> list[CancelScope]:
    # First use of this module on the calling thread: give it an empty stack
    # and no innermost scope (invariant 4).  Afterwards both attributes exist
    # for this thread, so the reads below never raise again.  (A subclass of
    # threading.local with an __init__ would save the callers their
    # try/except, but every read of its attributes costs 90 to 135
    # instructions more, a third of an empty call, on the checkpoint's
    # pending path: benchmarks/lookups.py.)
    stack: list[CancelScope] = []
    _local.stack = stack
    _local.innermost = None
    return stack


def _get_stack() -> list[CancelScope]:
    try:
        stack: list[CancelScope] = _local.stack
    except AttributeError:
        stack = _init_thread()
    return stack


class _Binding:
    """A scope bound to an asyncio task's context, and the thread scope below it.

    ``@cancellable`` on an ``async def`` cannot push its scope on the
    thread's stack: the scope lives across awaits, while other coroutines
    run on the same thread (each would see, and exit, the others' scopes).
    It sets `_bound` instead, a context variable, which each asyncio task
    has its own copy of (and which `asyncio.to_thread` copies into the
    worker thread).  The bound scope is the current one while the thread's
    innermost scope is ``base`` (the one that was innermost when the call
    began, usually None or a Celery task's scope) or None (another thread
    that inherited the context); a synchronous scope entered later, inside
    the coroutine's synchronous stretch, takes precedence.
    """

    __slots__ = ("base", "scope")

    def __init__(self, scope: CancelScope, base: CancelScope | None) -> None:
        self.scope = scope
        self.base = base


#: The scope of the ``async def`` call this code runs in (see `_Binding`).
_bound: Final[contextvars.ContextVar[_Binding | None]] = contextvars.ContextVar(
    "cancellable_bound_scope", default=None
)


#: How many bindings are set now (in any context): while none is, the
#: checkpoint's medium path skips the context-variable read.  Written under
#: ``_lock`` by `bind` and `unbind`.
_bindings_live: int = 0


def bind(scope: CancelScope, base: CancelScope | None) -> contextvars.Token[_Binding | None]:
    """Make ``scope`` the current scope of this context (see `_Binding`)."""
    global _bindings_live
    with _lock:
        _bindings_live += 1
    return _bound.set(_Binding(scope, base))


def unbind(token: contextvars.Token[_Binding | None]) -> None:
    """Undo `bind` (in the same context)."""
    global _bindings_live
    _bound.reset(token)
    with _lock:
        _bindings_live -= 1


def _resolve(innermost: CancelScope | None) -> CancelScope | None:
    # The scope a checkpoint answers for, given the thread's innermost one.
    binding = _bound.get()
    if binding is not None and (innermost is None or innermost is binding.base):
        return binding.scope
    return innermost


def current_scope() -> CancelScope | None:
    """The innermost `CancelScope` of the calling code, or None.

    That is the calling thread's innermost entered scope; inside an
    ``async def`` decorated with ``@cancellable``, the call's scope (unless
    a scope was entered synchronously since), also in threads started with
    `asyncio.to_thread` from it.  See :doc:`/async`.

    .. versionadded:: 0.1.0
    """
    try:
        scope: CancelScope | None = _local.innermost
    except AttributeError:
        _init_thread()
        scope = None
    return _resolve(scope)


# --------------------------------------------------------------------------
# The hot path.


class _NoScope:
    """What the hot path reads instead of None: "no scope here, nothing to raise"."""

    __slots__ = ()
    _effective_reason: Final = None


_NO_SCOPE: Final = _NoScope()


class _CheckpointContext:
    """What `checkpoint` returns, so that ``with checkpoint():`` checks again on exit.

    One shared instance: nothing is created per call.  Entering does nothing
    (the call that returned it checked already); leaving the block without
    an exception checks again, so a step cancelled while it ran is not
    reported as done.  An exception leaving the block is never replaced.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The flag test first, as in checkpoint(): a block that ends while
        # nothing is pending costs no second call.
        if exc_type is None and _pending:
            checkpoint()


_CHECKPOINT: Final = _CheckpointContext()


def checkpoint() -> AbstractContextManager[None, None]:
    """Raise `Cancelled` if the calling thread's innermost scope is cancelled.

    Call it in loops and between steps of long work.  It never blocks and
    never does I/O: while nothing in the process is cancelled it costs about
    what calling an empty function costs.  Outside any scope it never raises.

    Used as a context manager, ``with checkpoint(): ...`` checks when the
    block starts and again when it ends without an exception.

    Returns:
        A context manager (the same object on every call) whose exit checks
        again; ignore it when you call ``checkpoint()`` on its own.

    Raises:
        Cancelled: The innermost scope is effectively cancelled (it or an
            unshielded enclosing scope was cancelled, or a deadline passed).

    .. versionadded:: 0.1.0
    """
    # Hot path: while nothing is pending, one global load, a branch, a second
    # global load and the return.  Keep it that way: anything that does work
    # belongs in _slow_checkpoint.
    #
    # This function has no local variable on purpose.  On CPython 3.11+ the
    # frame sets up each local on every call, branch taken or not: one local
    # here cost 30-40 instructions, a tenth of an empty call.  Returning the
    # shared context manager (for ``with checkpoint():``) costs about as much
    # again, and is what the user asked for.  See "No local variables" in
    # docs/design.md.
    if _pending:
        # Most often another thread's scope is cancelled.  Say "nothing for
        # this thread" here, in cheap reads (invariants 1 and 4), rather than
        # in _slow_checkpoint: a second call would cost as much as all of
        # them.  Reading a stale value is fine: it is the answer a moment
        # earlier.  ``or _NO_SCOPE`` stands in for "outside any scope"
        # without a local (CancelScope defines neither __bool__ nor __len__,
        # so a scope is always true here).  Inside a @cancellable coroutine
        # (or a thread it started) the answer is the bound scope's, which
        # _resolve finds; that context-variable read happens only while such
        # a call runs somewhere in the process.
        try:
            if not (
                _shared_work
                or (_local.innermost or _NO_SCOPE)._effective_reason is not None
                or (
                    _bindings_live
                    and _bound.get() is not None
                    and (_resolve(_local.innermost) or _NO_SCOPE)._effective_reason is not None
                )
            ):
                return _CHECKPOINT
        except AttributeError:
            if "innermost" in _local.__dict__:
                # Not the first-use miss below: the read succeeded, so this
                # came from a signal handler that ran during the test.  (One
                # that raises just before a thread's very first read is
                # taken for the miss and lost: a window of one bytecode,
                # once per thread.)
                raise
            # This thread's first checkpoint: it has entered no scope, so
            # only deferred work, probes or a bound coroutine can concern it.
            _init_thread()
            if not (
                _shared_work
                or (_bindings_live and (_resolve(None) or _NO_SCOPE)._effective_reason is not None)
            ):
                return _CHECKPOINT
        _slow_checkpoint()
    return _CHECKPOINT


def _slow_checkpoint() -> None:
    if _deferred:
        _run_deferred()
    if _probes:
        for probe in tuple(_probes):
            probe()
    scope = current_scope()
    if scope is not None:
        # Read the reason once and raise with what was read: another thread
        # may un-cancel the scope (by setting .shield) between two reads.
        reason = scope._effective_reason
        if reason is not None:
            raise scope._observe(reason)


def is_cancelled() -> bool:
    """Whether the calling thread's innermost scope is effectively cancelled.

    The non-raising twin of `checkpoint`, with the same cost: use it where
    you want to wind down by hand (``while not is_cancelled(): ...``).
    Returns False outside any scope.

    .. versionadded:: 0.1.0
    """
    # The same shape as checkpoint(), and for the same reason no local
    # variable; probes count checkpoints only.
    if _pending:
        return _slow_is_cancelled()
    return False


def _slow_is_cancelled() -> bool:
    if _deferred:
        _run_deferred()
    scope = current_scope()
    return scope is not None and scope._effective_reason is not None


# --------------------------------------------------------------------------
# Fork safety (invariant 7).


def _before_fork() -> None:
    # Wait for any other thread to leave its critical section, so the child
    # never inherits _lock held by a thread it does not have.
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    # The child has one thread: the one that forked.  Other threads' scopes
    # were copied with the memory but will never run, exit or check again,
    # so only this thread's stack counts: a cancelled scope of another thread
    # must not keep every checkpoint of the child on the slow path.  The
    # parent's _lock is held by this thread (_before_fork); rather than
    # release a lock object that other copied state may refer to, start over.
    global _lock, _cancelled_live
    _lock = threading.RLock()
    _cancelled_live = sum(1 for scope in _get_stack() if scope._counted)
    _update_pending()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


# --------------------------------------------------------------------------
# Scopes.

_NEW: Final = 0
_ENTERED: Final = 1
_EXITED: Final = 2
#: Closed because an enclosing scope on the same thread was exited first
#: (misnesting).  Its own later exit is silent: the enclosing scope's exit
#: already raised the RuntimeError that explains what went wrong.
_ABANDONED: Final = 3

_MISNESTING_ADVICE: Final = (
    "Cancel scopes must be exited in the reverse order they were entered, on "
    "the thread that entered them. This usually means a `with` block was "
    "bypassed (a generator holding a scope was abandoned, or __enter__/"
    "__exit__ were called by hand) or a scope was shared between threads."
)


class CancelScope:
    """A region of code that can be cancelled as a unit.

    Use it as a context manager.  Inside, `checkpoint` raises `Cancelled`
    once the scope is cancelled: by `cancel`, by its `deadline` passing, or
    by an enclosing scope being cancelled (unless this scope is a `shield`).
    On exit the scope absorbs the `Cancelled` it caused, so code after the
    ``with`` block runs; a `Cancelled` caused by an enclosing scope passes
    through to that scope.

    Cancellation is *sticky*: once cancelled, every checkpoint in the scope
    raises until the scope exits.  The first reason given wins.

    Scopes nest per thread and belong to the thread that entered them; `cancel`
    may be called from any thread.  A scope can be entered only once.

    Args:
        deadline: Absolute time, on the `time.monotonic` clock, at which the
            scope cancels itself.  ``math.inf`` (the default) means never.
        shield: If True, cancellation of enclosing scopes is not seen inside
            this one (its own `cancel` and deadline still work).
        hook_timeout: Seconds each cleanup hook registered on this scope may
            run (None: no limit); `DEFAULT`, the default, takes the
            process-wide setting (`configure`).

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_cancel_reason",
        "_catch",
        "_counted",
        "_deadline",
        "_deadline_handle",
        "_depth",
        "_effective_reason",
        "_hooks",
        "_log_fields",
        "_observed_at",
        "_parent",
        "_shield",
        "_stack",
        "_state",
        "_thread",
        "_unlink",
        "cancelled_caught",
        "cleanup_errors",
        "hook_timeout",
    )

    def __init__(
        self,
        *,
        deadline: float = math.inf,
        shield: bool = False,
        hook_timeout: float | _Default | None = DEFAULT,
    ) -> None:
        self._deadline = _validate_deadline(deadline)
        if not isinstance(shield, bool):
            raise TypeError(f"shield must be a bool, got {type(shield).__name__}")
        self._shield = shield
        if hook_timeout is DEFAULT:
            self.hook_timeout = _config.get_hook_timeout()
        else:
            self.hook_timeout = _config.validate_seconds(hook_timeout, "hook_timeout")
        self._cancel_reason: CancelReason | None = None
        #: `add_cancel_callback` functions not called yet (None: none ever).
        self._callbacks: list[Callable[[CancelReason], object]] | None = None
        self._catch = True
        self._counted = False
        self._deadline_handle: _timer.TimerHandle | None = None
        self._depth = -1
        self._effective_reason: CancelReason | None = None
        self._hooks: list[HookHandle] = []
        #: Fields added to this scope's log events; an integration sets them
        #: (a Celery task's id and name), and nested scopes inherit them.
        self._log_fields: dict[str, Any] = _NO_FIELDS
        self._observed_at: float | None = None
        self._parent: CancelScope | None = None
        self._stack: list[CancelScope] | None = None
        self._state = _NEW
        self._thread = 0
        #: Detached scopes: unregisters the cancel callback on the parent.
        self._unlink: Callable[[], None] | None = None
        #: True if this scope absorbed a `Cancelled` when it exited.
        self.cancelled_caught = False
        #: Exceptions raised by cleanup hooks when this scope unwound.
        self.cleanup_errors: tuple[BaseException, ...] = ()

    def __repr__(self) -> str:
        state = ("new", "entered", "exited", "abandoned")[self._state]
        extra = ""
        if self._cancel_reason is not None:
            extra += f", cancelled ({self._cancel_reason.describe()})"
        if self._shield:
            extra += ", shield"
        if self._deadline != math.inf:
            extra += f", deadline in {self._deadline - time.monotonic():.3f}s"
        return f"<CancelScope {state}{extra} at {id(self):#x}>"

    # -- public state -------------------------------------------------------

    @property
    def cancel_called(self) -> bool:
        """True once `cancel` was called or the deadline passed."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> CancelReason | None:
        """The first reason this scope was cancelled with, or None."""
        return self._cancel_reason

    @property
    def deadline(self) -> float:
        """Absolute `time.monotonic` time at which the scope cancels itself.

        Assignable at any time, also while the scope is entered; ``math.inf``
        disarms it.
        """
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        value = _validate_deadline(value)
        with _lock:
            self._deadline = value
            expired = self._state == _ENTERED and self._arm_deadline()
        if expired:
            # Outside the lock: cancelling logs (invariant 5).
            self._cancel_for_deadline()

    @property
    def shield(self) -> bool:
        """Whether cancellation of enclosing scopes is hidden in this scope.

        Assignable while entered; a shielded scope's own `cancel` still works.
        """
        return self._shield

    @shield.setter
    def shield(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"shield must be a bool, got {type(value).__name__}")
        with _lock:
            self._shield = value
            fired = _recalculate(self) if self._state == _ENTERED else []
        _fire(fired)

    # -- cancelling ----------------------------------------------------------

    def cancel(self, reason: CancelReason | str | None = None) -> None:
        """Cancel this scope.  Idempotent; the first reason wins.

        Safe from any thread (not from a signal handler: see
        `request_slow_path`).  The code inside the scope sees it at its next
        checkpoint.  Cancelling a scope that has exited does nothing.

        Args:
            reason: A `CancelReason`, a message `str` (source ``"manual"``),
                or None.

        Raises:
            TypeError: ``reason`` is of another type.
        """
        self._cancel(CancelReason.coerce(reason))

    def _cancel(self, reason: CancelReason, *, at_deadline: bool = False) -> bool:
        # Returns whether this call cancelled the scope.  ``at_deadline``: the
        # timer fired (or an arming found the deadline passed).  It fired for
        # the deadline it was armed with, which may since have moved (trio's
        # ``_registered_deadline`` rule): compare with the current one, under
        # the lock that every deadline change takes.
        global _cancelled_live
        with _lock:
            if self._cancel_reason is not None or self._state >= _EXITED:
                return False
            if at_deadline and self._deadline > time.monotonic():
                return False
            self._cancel_reason = reason
            if self._deadline_handle is not None:
                self._deadline_handle.cancel()
                self._deadline_handle = None
            fired: _Fired = []
            if self._state == _ENTERED:
                self._counted = True
                _cancelled_live += 1
                fired = _recalculate(self)
                _update_pending()
        logger.info(
            CANCEL_REQUESTED,
            scope=hex(id(self)),
            **self._log_fields,
            **reason_fields(reason),
        )
        _fire(fired)
        return True

    def add_cancel_callback(self, fn: Callable[[CancelReason], object], /) -> Callable[[], None]:
        """Call ``fn(reason)`` once, when this scope becomes effectively cancelled.

        "Effectively cancelled" is what makes a checkpoint in the scope
        raise: its own `cancel`, its deadline, or the cancellation of an
        unshielded enclosing scope reaching it.  ``fn`` runs at most once,
        outside the scope's lock, on the thread that caused the cancellation
        (a thread calling `cancel`, the timer thread for a deadline), so it
        must be quick, must not block and must be thread-safe; an exception
        from it is reported through `sys.unraisablehook`.  If the scope is
        entered and effectively cancelled already, ``fn`` runs at once, on
        the calling thread.  A scope that is not entered yet calls it when
        it is entered.

        This is how an integration maps a cancellation onto another
        framework's (``@cancellable`` on an ``async def`` cancels the
        asyncio task with it).  Safe from any thread, not from a signal
        handler.

        Returns:
            A function that unregisters ``fn`` (does nothing once it ran).

        .. versionadded:: 0.1.0
        """
        if not callable(fn):
            raise TypeError(f"add_cancel_callback() needs a callable, got {type(fn).__name__}")
        with _lock:
            reason = self._effective_reason if self._state == _ENTERED else None
            if reason is None:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
        if reason is not None:
            _fire([(fn, reason)])

        def remove() -> None:
            with _lock:
                if self._callbacks is not None and fn in self._callbacks:
                    self._callbacks.remove(fn)

        return remove

    # -- entering and exiting ------------------------------------------------

    def __enter__(self) -> CancelScope:
        with _lock:
            self._check_new()
            stack = _get_stack()
            self._inherit(stack[-1] if stack else None)
            self._stack = stack
            self._depth = len(stack)
            stack.append(self)
            _local.innermost = self
            fired, expired = self._mark_entered()
        _fire(fired)
        if expired:
            # Outside the lock: cancelling logs (invariant 5).
            self._cancel_for_deadline()
        return self

    def _enter_detached(self, parent: CancelScope | None) -> None:
        # Enter the scope without putting it on any thread's stack: the
        # scope of an ``async def`` call (see ``_async``), which lives across
        # awaits while other coroutines run on the same thread.  Checkpoints
        # find it through `_bound`, not through ``_local``.  It is counted in
        # _cancelled_live like any other scope once cancelled.  Not being on
        # the parent's stack, it hears of the parent's cancellation through
        # a cancel callback (_parent_cancelled), which makes it effectively
        # cancelled with the parent's reason.
        with _lock:
            self._check_new()
            self._inherit(parent)
            fired, expired = self._mark_entered()
        _fire(fired)
        if parent is not None:
            self._unlink = parent.add_cancel_callback(self._parent_cancelled)
        if expired:
            self._cancel_for_deadline()

    def _check_new(self) -> None:
        # Caller holds _lock.
        if self._state != _NEW:
            raise RuntimeError(
                "Each CancelScope may only be used for a single 'with' block; "
                "create a new scope for each block."
            )

    def _inherit(self, parent: CancelScope | None) -> None:
        # Caller holds _lock.  Link to the enclosing scope, and take its log
        # fields unless an integration gave this scope its own.
        self._parent = parent
        if parent is not None and not self._log_fields:
            self._log_fields = parent._log_fields

    def _mark_entered(self) -> tuple[_Fired, bool]:
        # Caller holds _lock; parent (and stack, if any) are set.  Returns the
        # cancel callbacks to fire and whether the deadline already passed,
        # both for the caller to act on after releasing the lock.
        global _cancelled_live
        self._thread = threading.get_ident()
        self._state = _ENTERED
        if self._cancel_reason is not None:
            self._counted = True
            _cancelled_live += 1
        fired = _recalculate(self)
        _update_pending()
        return fired, self._arm_deadline()

    def _parent_cancelled(self, reason: CancelReason) -> None:
        # A detached scope's parent became effectively cancelled.
        with _lock:
            fired = _recalculate(self) if self._state == _ENTERED else []
        _fire(fired)

    def _exit_detached(self) -> None:
        # The end of a scope entered with _enter_detached (any thread).
        global _cancelled_live
        unlink, self._unlink = self._unlink, None
        if unlink is not None:
            unlink()
        with _lock:
            if self._state != _ENTERED:
                return
            self._state = _EXITED
            if self._deadline_handle is not None:
                self._deadline_handle.cancel()
                self._deadline_handle = None
            if self._counted:
                self._counted = False
                _cancelled_live -= 1
            self._callbacks = None
            _update_pending()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._state == _ABANDONED:
            self._state = _EXITED
            return False
        if self._state != _ENTERED:
            raise RuntimeError(
                "This CancelScope was never entered, or was already exited. " + _MISNESTING_ADVICE
            )
        if self._thread != threading.get_ident():
            # Leave the scope alone: it is on another thread's stack, and that
            # thread is still running inside it (and may read its stack now).
            raise RuntimeError(
                "Cancel scope exited on a thread that did not enter it. " + _MISNESTING_ADVICE
            ) from exc
        if self._stack is not None and self._stack[-1] is not self:
            self._abandon()
            raise RuntimeError("Cancel scope exited out of order. " + _MISNESTING_ADVICE) from exc

        started = time.perf_counter()
        hooks_run = 0
        try:
            if isinstance(exc, Cancelled) and self._hooks:
                hooks_run = run_cleanup(self, exc)
        finally:
            # Even when a hook re-raised KeyboardInterrupt or SystemExit, the
            # scope must leave its thread's stack and the live count.
            with _lock:
                # Do we absorb this Cancelled?  Only if we caused it: we are
                # cancelled ourselves and the parent's cancellation (if any) is
                # not visible to us.  Otherwise it belongs to an enclosing scope.
                parent = self._parent
                parent_visible = (
                    parent is not None and parent._effective_reason is not None and not self._shield
                )
                caught = (
                    self._catch
                    and isinstance(exc, Cancelled)
                    and self._cancel_reason is not None
                    and not parent_visible
                )
                self._close()
        cleanup_ms = (time.perf_counter() - started) * 1000.0

        if self._cancel_reason is not None or isinstance(exc, Cancelled):
            reason = self._cancel_reason or (exc.reason if isinstance(exc, Cancelled) else None)
            logger.info(
                SCOPE_CANCELLED,
                scope=hex(id(self)),
                **self._log_fields,
                caught=caught,
                hooks_run=hooks_run,
                hook_errors=len(self.cleanup_errors),
                cleanup_ms=round(cleanup_ms, 3),
                **(reason_fields(reason) if reason is not None else {}),
            )
        if caught:
            self.cancelled_caught = True
            return True
        return False

    def _close(self) -> None:
        # Caller holds _lock.  Pop self from its stack and forget it.
        global _cancelled_live
        stack = self._stack
        assert stack is not None
        stack.pop()
        # Runs on the owning thread (__exit__ checked), so _local is the
        # right thread's (invariant 4).
        _local.innermost = stack[-1] if stack else None
        self._state = _EXITED
        self._callbacks = None
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        if self._counted:
            self._counted = False
            _cancelled_live -= 1
        _update_pending()

    def _abandon(self) -> None:
        # Misnesting: exit this scope and everything entered after it on its
        # thread, so the process-wide bookkeeping stays correct, then let the
        # caller raise.
        with _lock:
            stack = self._stack
            if stack is None or self not in stack:
                return
            while stack:
                top = stack[-1]
                top._close()
                if top is self:
                    break
                top._state = _ABANDONED

    def _arm_deadline(self) -> bool:
        # Caller holds _lock and the scope is entered.  Returns True if the
        # deadline has already passed: the caller then calls
        # _cancel_for_deadline() after releasing the lock.
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        if self._cancel_reason is not None or self._deadline == math.inf:
            return False
        if self._deadline <= time.monotonic():
            return True
        self._deadline_handle = _timer.schedule(self._deadline, self._cancel_for_deadline)
        return False

    def _cancel_for_deadline(self) -> None:
        self._cancel(CancelReason(source="deadline", message="deadline expired"), at_deadline=True)

    # -- the slow path -------------------------------------------------------

    def _observe(self, reason: CancelReason) -> Cancelled:
        # Build the exception a checkpoint raises; log the first observation.
        if self._observed_at is None:
            self._observed_at = time.time()
            logger.info(
                CANCEL_OBSERVED,
                scope=hex(id(self)),
                **self._log_fields,
                observed_ms=round((time.time() - reason.requested_at) * 1000.0, 3),
                **reason_fields(reason),
            )
        return Cancelled(reason)


def run_cleanup(scope: CancelScope, exc: BaseException) -> int:
    """Run ``scope``'s cleanup hooks for ``exc`` unwinding through it; return how many ran.

    The one place hooks run: `CancelScope.__exit__` calls it for a
    `Cancelled` leaving a thread's scope, ``_async`` for the detached scope
    of an ``async def`` call.  Hooks run last registered first, each
    isolated and within ``scope.hook_timeout`` (`run_hooks`), inside a
    shield on the calling thread.  Their errors go to
    ``scope.cleanup_errors`` and, if ``exc`` is a `Cancelled`, to its
    ``hook_errors`` and notes.
    """
    hooks = take_for_cleanup(scope._hooks)
    if not hooks:
        return 0
    with CancelScope(shield=True) as shield:
        set_aside = _set_aside_below(shield)
        try:
            errors = run_hooks(hooks, scope.hook_timeout, scope._log_fields, _budget_scope)
        finally:
            _restore_set_aside(set_aside)
    if errors:
        scope.cleanup_errors = errors
        if isinstance(exc, Cancelled):
            exc.hook_errors = exc.hook_errors + errors
            add_note = getattr(exc, "add_note", None)  # Python 3.11+
            if add_note is not None:
                for error in errors:
                    add_note(f"cleanup hook failed: {error!r}")
    return len(hooks)


def _budget_scope() -> CancelScope:
    # The scope one hook with a budget runs in (see _hooks): a shield, like
    # the cleanup scope around it, so only the budget cancels it.
    return CancelScope(shield=True)


def _set_aside_below(shield: CancelScope) -> list[CancelScope]:
    # Cleanup may take seconds.  While it runs, the calling thread's
    # innermost scope is `shield`, so no cancelled scope below it can make a
    # checkpoint of this thread raise, and no other thread ever looks at
    # them.  Take them out of _cancelled_live for that time (invariant 2),
    # so that other threads' checkpoints go back to the one-flag fast path
    # instead of paying for "nothing for this thread" until we are done.
    global _cancelled_live
    stack = shield._stack
    assert stack is not None
    set_aside: list[CancelScope] = []
    with _lock:
        for scope in stack[: shield._depth]:
            if scope._counted:
                scope._counted = False
                _cancelled_live -= 1
                set_aside.append(scope)
        if set_aside:
            _update_pending()
    return set_aside


def _restore_set_aside(set_aside: list[CancelScope]) -> None:
    # Undo _set_aside_below once the shield is about to exit: the scopes
    # below it count again (they are still entered; only _close, later,
    # takes them out for good).
    global _cancelled_live
    if not set_aside:
        return
    with _lock:
        for scope in set_aside:
            if scope._state == _ENTERED and not scope._counted:
                scope._counted = True
                _cancelled_live += 1
        _update_pending()


#: Callbacks to call (outside the lock) and the reason to call them with.
_Fired = list[tuple[Callable[[CancelReason], object], CancelReason]]


def _recalculate(scope: CancelScope) -> _Fired:
    # Caller holds _lock.  Recompute "effectively cancelled" for `scope` and
    # every scope entered after it on the same thread (its descendants: a
    # thread's stack is a chain, so the descendants are the scopes above it).
    # Returns the cancel callbacks of scopes that just became effectively
    # cancelled; the caller calls them with `_fire` once it released the lock.
    stack = scope._stack
    scopes = [scope] if stack is None else stack[scope._depth :]
    fired: _Fired = []
    for current in scopes:
        parent = current._parent
        if parent is not None and parent._effective_reason is not None and not current._shield:
            # The outermost visible cancelled scope is the one that will catch
            # the Cancelled, so its reason is the one raised.
            current._effective_reason = parent._effective_reason
        else:
            current._effective_reason = current._cancel_reason
        reason = current._effective_reason
        if reason is not None and current._callbacks:
            fired.extend((fn, reason) for fn in current._callbacks)
            current._callbacks.clear()
    return fired


def _fire(fired: _Fired) -> None:
    # Outside _lock (invariant 6).  A failing callback must not stop the
    # others, nor the cancel() that triggered it.
    for fn, reason in fired:
        try:
            fn(reason)
        except Exception as exc:  # noqa: BLE001 - reported, never raised into cancel()
            _timer.report_unraisable(exc, fn, "Exception in cancellable cancel callback")


def _validate_deadline(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"deadline must be a number (time.monotonic() time), got {value!r:.60}")
    if math.isnan(value):
        raise ValueError("deadline must not be NaN")
    return float(value)


#: The `CancelScope._log_fields` of a scope nobody gave fields to (never mutated).
_NO_FIELDS: Final[dict[str, Any]] = {}


# --------------------------------------------------------------------------
# What the rest of the core and the integrations need of scopes beyond the
# public API, by name, instead of reaching into private attributes.  None of
# it is on the hot path.


def thread_innermost() -> CancelScope | None:
    """The calling thread's innermost entered scope, ignoring a bound coroutine's."""
    try:
        scope: CancelScope | None = _local.innermost
    except AttributeError:
        scope = None
    return scope


def enter_detached(scope: CancelScope, parent: CancelScope | None) -> None:
    """Enter ``scope`` on no thread's stack, below ``parent`` (an ``async def`` call's scope)."""
    scope._enter_detached(parent)


def exit_detached(scope: CancelScope) -> None:
    """Exit a scope entered with `enter_detached` (any thread)."""
    scope._exit_detached()


def propagate_own_cancellation(scope: CancelScope) -> None:
    """Make ``scope`` (not entered yet) let its own `Cancelled` propagate on exit.

    A ``@cancellable`` call's scope: a cancelled call must not return None
    as if it had finished.
    """
    scope._catch = False


def set_log_fields(scope: CancelScope, fields: dict[str, Any]) -> None:
    """Add ``fields`` (a Celery task's id and name) to every event about ``scope``.

    Call it before entering the scope; scopes entered inside inherit them.
    """
    scope._log_fields = fields


def log_fields(scope: CancelScope) -> dict[str, Any]:
    """The fields `set_log_fields` gave ``scope`` (or an enclosing scope it inherited)."""
    return scope._log_fields


def cancel_with(scope: CancelScope, reason: CancelReason) -> bool:
    """`CancelScope.cancel` with a `CancelReason`; True if this call cancelled the scope.

    False if it was cancelled already (the first reason wins) or has exited.
    """
    return scope._cancel(reason)


def observe(scope: CancelScope, reason: CancelReason) -> Cancelled:
    """The `Cancelled` to raise where code in ``scope`` sees ``reason``.

    The first observation is logged (``cancel.observed``) and its time kept
    (`observed_at`); an integration calls this where the scope's
    cancellation is seen without a checkpoint (an ``await`` cancelled).
    """
    return scope._observe(reason)


def observed_at(scope: CancelScope) -> float | None:
    """When (`time.time`) code in ``scope`` first saw its cancellation, or None."""
    return scope._observed_at


def is_entered(scope: CancelScope) -> bool:
    """Whether ``scope`` is entered and not exited yet."""
    return scope._state == _ENTERED


def shield_inside(scope: CancelScope) -> bool:
    """Whether a shield is entered inside ``scope`` on its thread (cleanup hooks run in one).

    Reliable when called on ``scope``'s own thread, or with the core's lock
    held (`acquire_lock_if_free`): only then does nobody change that stack.
    """
    stack = scope._stack or []
    return any(inner._shield for inner in stack[scope._depth + 1 :])


def deferred_work_waiting() -> bool:
    """Whether work queued with `request_slow_path` waits for a checkpoint."""
    return bool(_deferred)


def run_deferred() -> None:
    """Run the work queued with `request_slow_path` now, on this thread (if any waits)."""
    if _deferred:
        _run_deferred()


def add_probe(probe: Callable[[], object]) -> None:
    """Call ``probe()`` at every checkpoint in the process, before it looks at its scope.

    Keeps the pending flag up while installed (`cancellable.testing` counts
    checkpoints with it); `remove_probe` takes it out.
    """
    with _lock:
        _probes.append(probe)
        _update_pending()


def remove_probe(probe: Callable[[], object]) -> None:
    """Undo `add_probe`."""
    with _lock:
        _probes.remove(probe)
        _update_pending()


def lock_held_here() -> bool:
    """Whether the calling thread holds the core's lock (it is inside the core)."""
    return bool(_lock._is_owned())  # type: ignore[attr-defined]  # RLock has it


def acquire_lock_if_free() -> bool:
    """Take the core's lock if no thread holds it; True if taken (then `release_lock`).

    While it is held no thread is inside the core's bookkeeping, so an
    asynchronous exception raised into another thread cannot land there.
    """
    return _lock.acquire(blocking=False)


def release_lock() -> None:
    """Release the lock taken with `acquire_lock_if_free`."""
    _lock.release()


# --------------------------------------------------------------------------
# Cleanup hooks (the registry and the runner are ``_hooks``).


def on_cancel(fn: Callable[..., object], /, *args: Any, **kwargs: Any) -> HookHandle:
    """Register ``fn(*args, **kwargs)`` to run if the current scope is cancelled.

    Hooks run when the innermost scope unwinds because of cancellation (a
    `Cancelled` passes through its exit), last registered first, each
    isolated: one that raises does not stop the others, and its error is
    logged and attached to the `Cancelled` (``hook_errors``).  Each runs
    inside a shield and within the scope's ``hook_timeout``.  A hook
    registered after the scope was cancelled still runs when it unwinds.  If
    the scope exits normally, its hooks are dropped.

    Returns:
        A `HookHandle`; call ``handle.remove()`` when the resource is gone.

    Raises:
        TypeError: ``fn`` is not callable.
        RuntimeError: Called outside any cancel scope.

    .. versionadded:: 0.1.0
    """
    if not callable(fn):
        raise TypeError(f"on_cancel() needs a callable, got {type(fn).__name__}: {fn!r:.60}")
    scope = current_scope()
    if scope is None:
        raise RuntimeError(
            "on_cancel() was called outside any cancel scope, so nothing could ever "
            "run the hook. Call it inside a @cancellable function or a "
            "`with CancelScope():` block."
        )
    return register(scope._hooks, scope, fn, args, kwargs)
