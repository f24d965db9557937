"""One timer thread per process, for deadlines and cleanup-hook budgets.

Deadlines must not cost anything at a checkpoint, so no checkpoint ever reads
the clock.  Instead, every armed deadline is an entry in this module's heap,
and a single daemon thread sleeps until the earliest one and then calls its
callback (which cancels the scope, and so raises the process-wide pending
flag that checkpoints test).

Invariants:

* The thread is started lazily, on the first `schedule`, and restarted after
  `os.fork` (threads do not survive a fork; the child gets a fresh, empty
  timer so a parent's deadlines never fire in a child).
* Callbacks run on the timer thread, one at a time, outside ``_cond``; they
  must be quick and must not block.  An exception in a callback is reported
  through `sys.unraisablehook` and does not kill the thread.
* A cancelled entry stays in the heap (cancelling is O(1)) and is skipped
  when it comes up.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["TimerHandle", "report_unraisable", "schedule"]


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


class _Timer:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        handle = TimerHandle(when, callback)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._counter), handle))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cancellable-timer", daemon=True
                )
                self._thread.start()
            # Wake the thread only if this entry is now the earliest one.
            if self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and not self._heap[0][2].active:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        handle = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(delay)
            callback = handle._callback
            handle._callback = None
            if callback is not None:
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


_timer = _Timer()


def _reset_after_fork() -> None:
    global _timer
    _timer = _Timer()


os.register_at_fork(after_in_child=_reset_after_fork)


def schedule(when: float, callback: Callable[[], object]) -> TimerHandle:
    """Call ``callback()`` on the timer thread at ``time.monotonic() >= when``."""
    return _timer.schedule(when, callback)
