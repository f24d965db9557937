"""One timer thread per process, for deadlines and cleanup-hook budgets.

Deadlines must not cost anything at a checkpoint, so no checkpoint ever reads
the clock.  Instead, every armed deadline is an entry in this module's heap,
and a single daemon thread sleeps until the earliest one and then calls its
callback (which cancels the scope, and so raises the process-wide pending
flag that checkpoints test).

The timer is always a real OS thread.  Under gevent or eventlet
monkey-patching, ``threading.Thread`` would start a greenlet instead, and a
greenlet runs only when the running code yields to the hub: a deadline
around a loop that calls `checkpoint` but never does I/O would never fire.
So when the threading module is patched, the thread is started, and its
locks are made, with the *original* ``_thread`` functions.  Its callbacks
must then not run on it: they would take the task side's locks, which are
gevent's or eventlet's and cannot be waited on from another OS thread.
Instead each callback is handed over, lock-free, to the function registered
with `set_handoff` (``_scope.request_slow_path``), and runs at the task's
next checkpoint.

Invariants:

* The timer is created lazily, on the first `schedule`, which also decides
  between the two modes above, and it is dropped after `os.fork` (threads do
  not survive a fork; the child gets a fresh, empty timer on its first
  `schedule`, so a parent's deadlines never fire in a child).
* ``_mutex`` guards the heap and ``_wake_pending``; nothing blocks while
  holding it.  ``_wakeup`` is locked exactly while ``_wake_pending`` is
  False: `_Timer._wake` releases it (under ``_mutex``) to cut the timer
  thread's sleep short, and only the timer thread acquires it again.
* Callbacks run on the timer thread (or, when handed over, on a task's
  thread), one at a time, outside ``_mutex``; they must be quick and must not
  block.  An exception in a callback is reported through
  `sys.unraisablehook` and does not kill the thread.
* A cancelled entry stays in the heap (cancelling is O(1)) and is skipped
  when it comes up.
"""

from __future__ import annotations

import _thread
import heapq
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["TimerHandle", "monkey_patched", "report_unraisable", "schedule", "set_handoff"]


class TimerHandle:
    """A scheduled callback; `cancel` stops it from firing (if not yet fired)."""

    __slots__ = ("_callback", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self._callback: Callable[[], object] | None = callback

    def cancel(self) -> None:
        """Forget the callback.  Safe to call from any thread, any number of times."""
        self._callback = None

    @property
    def active(self) -> bool:
        """True until the callback has fired or the handle was cancelled."""
        return self._callback is not None


def _original_thread_functions() -> (
    tuple[Callable[..., object], Callable[[], _thread.LockType]] | None
):
    """``(start_new_thread, allocate_lock)`` as they were before monkey-patching.

    None if neither gevent nor eventlet has patched threading.  Neither
    library is imported here: if it is not in `sys.modules`, it cannot have
    patched anything.
    """
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        start, allocate = gevent_monkey.get_original(
            "_thread", ["start_new_thread", "allocate_lock"]
        )
        return start, allocate
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("thread"):
        original = eventlet_patcher.original("_thread")
        return original.start_new_thread, original.allocate_lock
    return None


def monkey_patched() -> bool:
    """Whether gevent or eventlet has monkey-patched threading in this process."""
    return _original_thread_functions() is not None


#: Where callbacks go when the timer runs beside monkey-patched threads; set
#: by ``_scope`` (this module imports nothing of the package).
_handoff: Callable[[Callable[[], object]], None] | None = None


def set_handoff(handoff: Callable[[Callable[[], object]], None]) -> None:
    """Register the lock-free function that takes callbacks off the timer thread.

    Used only while threading is monkey-patched (see the module docstring).
    """
    global _handoff
    _handoff = handoff


class _Timer:
    def __init__(self) -> None:
        original = _original_thread_functions()
        #: Hand callbacks over instead of running them (monkey-patched mode).
        self.hand_over = original is not None
        allocate_lock = _thread.allocate_lock if original is None else original[1]
        self._start_new_thread = original[0] if original is not None else None
        self._mutex = allocate_lock()
        self._wakeup = allocate_lock()
        self._wakeup.acquire()
        self._wake_pending = False
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._counter = itertools.count()
        self.started = False

    def schedule(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        handle = TimerHandle(when, callback)
        with self._mutex:
            heapq.heappush(self._heap, (when, next(self._counter), handle))
            if not self.started:
                self._start()
                self.started = True
            # Wake the thread only if this entry is now the earliest one.
            if self._heap[0][2] is handle:
                self._wake()
        return handle

    def _start(self) -> None:
        # Caller holds _mutex; the new thread's first step waits for it.
        if self._start_new_thread is not None:
            self._start_new_thread(self._run, ())
        else:
            threading.Thread(target=self._run, name="cancellable-timer", daemon=True).start()

    def _wake(self) -> None:
        # Caller holds _mutex.
        if not self._wake_pending:
            self._wake_pending = True
            self._wakeup.release()

    def _sleep(self, delay: float | None) -> None:
        # Until `delay` seconds have passed (forever: None) or _wake was called.
        if delay is None:
            woken = self._wakeup.acquire()
        else:
            woken = self._wakeup.acquire(True, min(delay, _thread.TIMEOUT_MAX))
        with self._mutex:
            if self._wake_pending:
                if not woken:
                    # _wake released it after our wait timed out: take it
                    # back (at once) so that it is locked again below.
                    self._wakeup.acquire()
                self._wake_pending = False

    def _next_due(self) -> tuple[TimerHandle | None, float | None]:
        # (entry to fire now, or None; else how long to sleep, None: forever).
        with self._mutex:
            while self._heap and not self._heap[0][2].active:
                heapq.heappop(self._heap)
            if not self._heap:
                return None, None
            delay = self._heap[0][0] - time.monotonic()
            if delay <= 0:
                return heapq.heappop(self._heap)[2], None
            return None, delay

    def _run(self) -> None:
        while True:
            handle, delay = self._next_due()
            if handle is None:
                self._sleep(delay)
                continue
            callback = handle._callback
            handle._callback = None
            if callback is None:
                continue
            if self.hand_over and _handoff is not None:
                _handoff(callback)
                continue
            try:
                callback()
            except BaseException as exc:  # noqa: BLE001 - the timer must survive
                report_unraisable(exc, callback, "Exception in cancellable timer callback")


class _Unraisable:
    """The argument shape `sys.unraisablehook` expects."""

    def __init__(self, exc: BaseException, obj: object, message: str) -> None:
        self.exc_type: type[BaseException] = type(exc)
        self.exc_value: BaseException | None = exc
        self.exc_traceback: TracebackType | None = exc.__traceback__
        self.err_msg: str | None = message
        self.object: object = obj


def report_unraisable(exc: BaseException, obj: object, message: str) -> None:
    """Report an exception nobody can catch, the way CPython reports them."""
    sys.unraisablehook(_Unraisable(exc, obj, message))


#: The process's timer, created by the first `schedule`.
_timer: _Timer | None = None
#: Makes sure two first `schedule` calls create one timer, not two.
_create_lock = _thread.allocate_lock()


def _get_timer() -> _Timer:
    global _timer
    timer = _timer
    if timer is None:
        with _create_lock:
            timer = _timer
            if timer is None:
                timer = _timer = _Timer()
    return timer


def _reset_after_fork() -> None:
    # The timer thread did not survive the fork, and a lock it or another
    # thread held would stay held in the child: start from nothing.
    global _timer, _create_lock
    _timer = None
    _create_lock = _thread.allocate_lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_after_fork)


def schedule(when: float, callback: Callable[[], object]) -> TimerHandle:
    """Call ``callback()`` on the timer thread at ``time.monotonic() >= when``.

    Under gevent or eventlet monkey-patching the callback is handed to
    `set_handoff`'s function at that time instead (see the module docstring).
    """
    return _get_timer().schedule(when, callback)
