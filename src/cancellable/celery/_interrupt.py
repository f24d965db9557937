"""The interrupt step: raising `Cancelled` in a task's own thread.

Once a cancelled task's grace is over, the worker raises `Cancelled` in
the thread that runs it, wherever that thread is, so ``finally`` blocks and
cleanup hooks still run.  Two ways in, depending on the thread:

The main thread of its process (prefork children, the solo pool)
    A Python signal handler runs on the main thread between two bytecodes,
    and a blocking call interrupted by the signal (``time.sleep``, a socket
    read, ``Event.wait``, ``select``...) runs the handler before it resumes.
    So the wake-up signal's handler (`cancellable.celery._wakeup`) calls
    `Interrupts.raise_if_asked`, which raises `Cancelled` right there, breaking the
    blocking call.  In a prefork child the main process asks through the
    task's mailbox slot (step `~cancellable.celery._mailbox.INTERRUPT`); in
    the solo pool the worker's poller thread sets ``interrupt_reason`` on the
    task's registry entry and signals its own process.

Any other thread (the threads pool)
    ``PyThreadState_SetAsyncExc`` makes the thread raise at its next
    bytecode boundary (`Interrupts.interrupt_thread`).  It cannot break a blocking call
    or a C call: it lands when the call returns.

When it may land (both ways):

* only while the task's *body* runs (``entry.interruptible``, set and
  cleared by the task boundary under ``entry.window_lock``), and only in the
  thread that runs that task: a signal or request that arrives after the
  task ended, or while the thread already runs the next task, finds no
  match and does nothing;
* at most once per task: the first one that lands closes the window, so
  later signals never land in the ``finally`` blocks and cleanup that
  handle it (a body that swallows it meets the terminate step instead);
* never while the core holds its lock (`cancellable._scope._lock`), and, on
  the signal path, never while the interrupted frame is this library's own
  code (a scope's ``__exit__`` before it takes the lock, the run of queued
  work), so it cannot cut a scope's bookkeeping in half; never inside a
  shield (cleanup hooks run inside one; a task's own shields are respected
  too).  An asynchronous exception cannot be aimed that finely: holding
  the core's lock keeps it out of everything done under the lock, and the
  few bytecodes outside it remain a (small) window in the threads pool.  The
  signal handler checks that on the spot and otherwise does nothing: the
  main process signals again at its next tick (0.1 s), so the interrupt is
  deferred, not lost.  For another thread, the caller takes the core lock
  itself (without waiting) and holds it until the exception has landed, or
  for at most `LAND_WAIT` seconds, after which it withdraws the pending
  exception (``PyThreadState_SetAsyncExc(thread, NULL)``) and retries
  later.

The task boundary then ends the task as for any cancellation (REVOKED with
the reason, hooks run), adding how it ended: "interrupted after 1.0 s".
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Final

from .. import _scope
from .._exceptions import Cancelled, CancelReason
from ._mailbox import INTERRUPT, Mailbox
from ._registry import RunningTask, RunningTasks
from ._wakeup import Wakeup

__all__ = ["LAND_WAIT", "Interrupts", "thread_interrupt_available"]

#: Seconds `Interrupts.interrupt_thread` waits for an asynchronous exception to land.
LAND_WAIT: Final = 0.01


def _ending(delivered_at: float | None) -> str:
    if delivered_at is None:
        return "interrupted"
    return f"interrupted after {max(0.0, time.time() - delivered_at):.1f} s"


#: Modules of this library whose frames may be on the stack when an interrupt
#: lands: they only call the task's code (the decorator, the task boundary,
#: the async runner) or wait (`cancellable.sleep`), and an exception there
#: unwinds the way a `Cancelled` from a checkpoint does.  Every other module
#: of the library does bookkeeping that must not be cut in half.
_CALLS_OUT: Final = frozenset(
    {
        "cancellable._decorator",
        "cancellable._async",
        "cancellable._sleep",
        "cancellable.celery._task",
    }
)


def _in_library_code(frame: object) -> bool:
    """Whether the stack at ``frame`` (where a signal arrived) is inside our bookkeeping.

    True if ``frame`` or any frame that called it belongs to this library,
    other than the modules of `_CALLS_OUT`: a scope's ``__exit__`` before
    it takes the lock, the run of work queued by a signal handler (and the
    standard library code it calls: a mailbox read decodes JSON).  The
    interrupt then waits for the next signal.
    """
    while frame is not None:
        name = getattr(frame, "f_globals", {}).get("__name__", "")
        ours = isinstance(name, str) and (name == "cancellable" or name.startswith("cancellable."))
        if ours and name not in _CALLS_OUT:
            return True
        frame = getattr(frame, "f_back", None)
    return False


def _safe_here(entry: RunningTask, frame: object = None) -> bool:
    # On the task's own thread (a signal handler on the main thread).
    if not entry.interruptible or entry.thread != threading.get_ident():
        return False
    if frame is not None and _in_library_code(frame):
        return False
    if entry.window_lock.locked():
        return False  # the boundary is opening or closing the window
    if _scope.lock_held_here():
        return False
    # No shield entered inside the task's scope (cleanup hooks run in one).
    # This thread's own stack, read on this thread with the core's lock not
    # held by it, so nobody is changing it under us.
    return not _shielded_inside(entry.scope)


def _shielded_inside(scope: _scope.CancelScope) -> bool:
    """Whether a shield was entered above ``scope`` on its thread's stack."""
    return _scope.shield_inside(scope)


class _Interrupted(Cancelled):
    """What `Interrupts.interrupt_thread` raises in a pool thread (a `Cancelled`).

    CPython raises an asynchronous exception by calling its class with no
    arguments, in the target thread, where it lands: so the constructor is
    where we learn that it landed, and where it finds its reason.  Each
    `Interrupts` has its own subclass, whose ``_owner`` is that `Interrupts`.
    """

    _owner: Interrupts

    def __init__(self, reason: CancelReason | None = None) -> None:
        owner = type(self).__dict__.get("_owner")
        entry = None if owner is None else owner._landing.pop(threading.get_ident(), None)
        if reason is None and entry is not None:
            reason = entry.interrupt_reason or entry.scope.cancel_reason
        super().__init__(reason)
        if owner is not None and entry is not None:
            entry.interruptible = False  # once per task, as in raise_if_asked
            entry.ended_by = _ending(entry.delivered_at)
            owner._landed.set()


def thread_interrupt_available() -> bool:
    """Whether this interpreter can raise in another thread (CPython)."""
    return hasattr(ctypes, "pythonapi") and hasattr(ctypes.pythonapi, "PyThreadState_SetAsyncExc")


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> int:
    # exc None withdraws a pending exception: the C function wants NULL,
    # which an empty py_object passes (a bare None would pass Py_None).
    if not thread_interrupt_available():
        return 0
    function = ctypes.pythonapi.PyThreadState_SetAsyncExc
    function.argtypes = (ctypes.c_ulong, ctypes.py_object)
    function.restype = ctypes.c_int
    arg = ctypes.py_object() if exc is None else ctypes.py_object(exc)
    return int(function(thread, arg))


class Interrupts:
    """The interrupt window of the tasks running in one process, and the two ways in.

    Made by the process's `~cancellable.celery._runtime.TaskRuntime` with
    its table of running tasks, its mailbox (a prefork child; None
    elsewhere) and its wake-up signal.
    """

    def __init__(self, running: RunningTasks, mailbox: Mailbox | None, wakeup: Wakeup) -> None:
        self._running = running
        self._mailbox = mailbox
        self._wakeup = wakeup
        #: Thread id -> the entry whose interrupt was set for it and has not landed.
        self._landing: dict[int, RunningTask] = {}
        self._landed = threading.Event()
        #: The exception class CPython instantiates in the target thread.
        self._exception: type[_Interrupted] = type(
            "_Interrupted", (_Interrupted,), {"_owner": self, "__module__": __name__}
        )

    def open_window(self, entry: RunningTask) -> None:
        """The task's body starts: it may be interrupted from now on."""
        with entry.window_lock:
            entry.interruptible = True

    def close_window(self, entry: RunningTask) -> None:
        """The task's body is over: no interrupt may land from now on.

        Also withdraws an asynchronous exception that was set but has not
        landed yet (it could only land in the boundary code that follows).
        """
        with entry.window_lock:
            entry.interruptible = False
            if self._landing.get(entry.thread) is entry:
                _set_async_exc(entry.thread, None)
                self._landing.pop(entry.thread, None)

    def raise_if_asked(self, frame: object = None) -> None:
        """Raise `Cancelled` here if the worker asked to interrupt the task of this thread.

        Called from the wake-up signal handler, so on the main thread, between
        two bytecodes of whatever it runs: it takes no lock and does no I/O
        (a look at the mailbox is a read of shared memory).  It raises only for
        the task that runs on this thread now, only if the mailbox slot or the
        registry entry of *that* task asks for an interrupt, and only at a safe
        moment (see the module docstring); otherwise it returns and the next
        signal tries again.
        """
        me = threading.get_ident()
        for entry in self._running.entries():
            if entry.thread != me:
                continue
            reason = entry.interrupt_reason
            delivered_at = entry.delivered_at
            if reason is None:
                box = self._mailbox
                if box is None:
                    continue
                found = box.find({entry.task_id}).get(entry.task_id)
                if found is None or box.step(found.slot) != INTERRUPT:
                    continue
                reason, delivered_at = found.reason, found.delivered_at
            if not _safe_here(entry, frame):
                continue
            # Once per task: later signals must not land in the code that
            # handles this one (its ``finally`` blocks, its cleanup, the task
            # boundary).  If the body swallows it, the terminate step follows.
            entry.interruptible = False
            entry.ended_by = _ending(delivered_at)
            # The cooperative path (the mailbox check) is queued too, so the
            # scope becomes cancelled at the next checkpoint: cancellation
            # stays sticky.
            raise Cancelled(reason)

    def interrupt_thread(self, entry: RunningTask) -> bool:
        """Raise `Cancelled` in the (non-main) thread running ``entry``; True if it landed.

        Called by the worker's poller thread.  Lands only inside the task's
        body and outside the core's lock (held here while we wait).
        """
        with entry.window_lock:
            if not entry.interruptible or self._running.get(entry.task_id) is not entry:
                return False
            if not _scope.acquire_lock_if_free():
                return False  # a thread is inside the core: try at the next tick
            try:
                if _shielded_inside(entry.scope):
                    return False
                self._landed.clear()
                self._landing[entry.thread] = entry
                if _set_async_exc(entry.thread, self._exception) != 1:
                    self._landing.pop(entry.thread, None)
                    return False
                if self._landed.wait(LAND_WAIT):
                    return True
                # Not landed (a blocking or C call): withdraw it, so it cannot
                # land later, somewhere unsafe.
                _set_async_exc(entry.thread, None)
                self._landing.pop(entry.thread, None)
                return self._landed.is_set()
            finally:
                _scope.release_lock()

    def interrupt_in_process(self, entry: RunningTask, reason: CancelReason) -> bool:
        """Interrupt a task running in this process (threads and solo pools).

        On the main thread (solo) it asks through the registry entry and sends
        this process the wake-up signal; on another thread it raises an
        asynchronous exception.  Returns whether an attempt was made.
        """
        entry.interrupt_reason = reason
        if entry.thread == threading.main_thread().ident:
            if not self._wakeup.installed_here():
                return False
            return self._wakeup.wake(os.getpid())
        return self.interrupt_thread(entry)
