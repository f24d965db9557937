"""Blocking waits that end as soon as the calling scope is cancelled.

`sleep` and `wait` are what a retry or back-off loop needs instead of
`time.sleep` and `threading.Event.wait`: they block like them, but raise
`Cancelled` the moment the calling code's scope is (effectively) cancelled,
with no grace period and no checkpoint needed.  Outside any scope they are
the plain calls.

How a waiter is woken
---------------------

Each call blocks on a private ``_thread`` lock that it holds (a *waiter*):
``acquire(timeout=...)`` returns when someone releases it.  Three things
release it:

* the scope's cancel callback (`CancelScope.add_cancel_callback`): a
  `~CancelScope.cancel` from another thread, or the deadline timer;
* `wake_sleepers`, which `~cancellable._scope.request_slow_path` calls
  (it is registered with `~cancellable._scope.add_slow_path_waker`) whenever
  work is handed to the core from a signal handler (the Celery prefork
  wake-up signal) or the timer's OS thread under gevent: the waiter then
  runs a checkpoint, which runs that work (the cancellation of this task)
  and raises;
* for `wait`, the event's own ``set()``: the waiter is put in the event's
  list of waiters, exactly as `threading.Condition.wait` does with its own.

Releasing a lock never blocks and takes no other lock, so it is safe from a
signal handler (which may run while this very thread is inside ``acquire``)
and from any thread.  A spurious wake-up costs one checkpoint and one more
turn of the loop; the waiter re-arms itself (a successful ``acquire``
holds the lock again).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Final

from . import _config, _scope
from ._scope import CancelScope, checkpoint, current_scope

__all__ = ["sleep", "wait", "wake_sleepers"]


class _Notified:
    """Stands in a `threading.Condition`'s waiter list for a `_Waiter`.

    ``Condition.notify`` calls ``release()`` on each waiter it wakes; a bare
    lock that a cancellation released already would make that call raise in
    the thread that sets the event.  This one never raises.
    """

    __slots__ = ("waiter",)

    def __init__(self, waiter: _Waiter) -> None:
        self.waiter = waiter

    def release(self) -> None:
        self.waiter.wake()


class _Waiter:
    """A lock held by its owner; whoever releases it wakes the owner once."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()

    def wake(self, *_ignored: object) -> None:
        # Any thread, or a signal handler: never blocks.
        try:
            self.lock.release()
        except RuntimeError:
            pass  # already released: the owner wakes anyway

    def block(self, timeout: float | None) -> None:
        if timeout is None:
            self.lock.acquire()
        else:
            self.lock.acquire(timeout=max(0.0, timeout))


#: Waiters blocked right now in this process (in any thread).  A dict used
#: as an ordered set: `wake_sleepers` copies it with one C call, which a
#: signal handler may do at any moment.
_sleepers: Final[dict[_Waiter, None]] = {}


def wake_sleepers() -> None:
    """Wake every `sleep` and `wait` in progress so each runs a checkpoint.

    Safe from a signal handler: it takes no lock and does no I/O.
    `~cancellable._scope.request_slow_path` calls it after queueing work, so
    a task blocked in `sleep` runs the handed-over work (and raises if it
    cancels its scope) instead of sleeping on.  Waiters whose scope is not
    cancelled go back to sleep.
    """
    for waiter in tuple(_sleepers):
        waiter.wake()


_scope.add_slow_path_waker(wake_sleepers)


def _seconds(value: float | None, name: str) -> float | None:
    return _config.validate_seconds(value, name)


def sleep(seconds: float) -> None:
    """Sleep like `time.sleep`, but raise `Cancelled` as soon as the scope is cancelled.

    Inside a cancel scope (a ``@cancellable`` call, a Celery task, ``with
    CancelScope():``) the sleep checks first, then ends early, raising
    `Cancelled`, when the innermost scope becomes effectively cancelled: by
    `~CancelScope.cancel` from any thread, a deadline, or a Celery revoke
    (in a prefork child too: the wake-up signal ends the sleep).  Inside a
    `shield` it sleeps on.  Outside any scope it is `time.sleep`.

    Args:
        seconds: How long to sleep; 0 only checks.

    Raises:
        Cancelled: The scope was cancelled before or during the sleep.
        TypeError: ``seconds`` is not a number.
        ValueError: ``seconds`` is negative, NaN or infinite.

    .. versionadded:: 0.1.0
    """
    duration = _seconds(seconds, "seconds")
    assert duration is not None
    scope = current_scope()
    if scope is None:
        time.sleep(duration)
        return
    checkpoint()
    end = time.monotonic() + duration
    _block_until(scope, lambda waiter: _sleep_step(waiter, end))
    checkpoint()


def _sleep_step(waiter: _Waiter, end: float) -> bool:
    remaining = end - time.monotonic()
    if remaining <= 0:
        return True
    waiter.block(remaining)
    return time.monotonic() >= end


def wait(event: threading.Event, timeout: float | None = None) -> bool:
    """`threading.Event.wait` that raises `Cancelled` as soon as the scope is cancelled.

    Returns what ``event.wait(timeout)`` would: True once the event is set,
    False if ``timeout`` seconds passed first.  Inside a cancel scope it
    checks first, and raises `Cancelled` when the innermost scope becomes
    effectively cancelled while it waits (from any thread, by a deadline, or
    by a Celery revoke, as for `sleep`); an event already set returns True
    without raising.  Outside any scope it is ``event.wait(timeout)``.

    Works with `threading.Event` (and subclasses that keep its internals);
    for other event objects (gevent's, under monkey-patching) it waits in
    slices of 50 ms, so a cancellation is seen within 50 ms.

    Args:
        event: The event to wait for.
        timeout: Seconds to wait at most (None: no limit).

    Raises:
        Cancelled: The scope was cancelled before or during the wait.
        TypeError: ``timeout`` is not a number or None.
        ValueError: ``timeout`` is negative, NaN or infinite.

    .. versionadded:: 0.1.0
    """
    limit = _seconds(timeout, "timeout")
    scope = current_scope()
    if scope is None:
        return event.wait(limit)
    if event.is_set():
        return True
    checkpoint()
    end = None if limit is None else time.monotonic() + limit
    cond = getattr(event, "_cond", None)
    waiters = getattr(cond, "_waiters", None)
    if cond is None or not isinstance(waiters, collections.deque):
        step = _sliced_step(event, end)
    else:
        step = _event_step(event, cond, end)
    _block_until(scope, step)
    if event.is_set():
        return True
    checkpoint()
    return False


def _remaining(end: float | None) -> float | None:
    return None if end is None else end - time.monotonic()


def _event_step(event: threading.Event, cond: Any, end: float | None) -> Any:
    # One turn: join the event's waiters (as Condition.wait does with its own
    # lock), block, leave them.  set() releases every waiter in that list.
    def step(waiter: _Waiter) -> bool:
        notified = _Notified(waiter)
        with cond:
            if event.is_set():
                return True
            cond._waiters.append(notified)
        try:
            remaining = _remaining(end)
            if remaining is None or remaining > 0:
                waiter.block(remaining)
        finally:
            with cond:
                try:
                    cond._waiters.remove(notified)
                except ValueError:
                    pass  # set() took it out (and released it)
        if event.is_set():
            return True
        remaining = _remaining(end)
        return remaining is not None and remaining <= 0

    return step


#: Slice for event objects whose internals we cannot join (seconds).
_SLICE: Final = 0.05


def _sliced_step(event: threading.Event, end: float | None) -> Any:
    def step(waiter: _Waiter) -> bool:
        remaining = _remaining(end)
        if remaining is not None and remaining <= 0:
            return True
        return event.wait(_SLICE if remaining is None else min(_SLICE, remaining)) or (
            end is not None and time.monotonic() >= end
        )

    return step


def _block_until(scope: CancelScope, step: Any) -> None:
    # Run `step(waiter)` until it says done, with a checkpoint after every
    # wake-up: that is where a cancellation raises (and where work handed
    # over by a signal handler runs).
    waiter = _Waiter()
    remove = scope.add_cancel_callback(waiter.wake)
    _sleepers[waiter] = None
    try:
        while not step(waiter):
            checkpoint()
    finally:
        _sleepers.pop(waiter, None)
        remove()
