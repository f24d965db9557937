"""The interrupt step: raising `Cancelled` in a prefork child's task, then retiring the child.

Once a cancelled task's grace is over, the worker raises `Cancelled` in
the thread that runs it, wherever that thread is, so ``finally`` blocks and
cleanup hooks still run.  This is done in prefork children only: a Python
signal handler runs on the child's main thread between two bytecodes, and
a blocking call interrupted by the signal (``time.sleep``, a socket read,
``Event.wait``, ``select``, a lock wait...) runs the handler before it
resumes.  So the wake-up signal's handler (`cancellable.celery._wakeup`)
calls `Interrupts.raise_if_asked`, which raises `Cancelled` right there,
breaking the blocking call, when the task's mailbox slot says so (step
`~cancellable.celery._mailbox.INTERRUPT`, written by the main process).

The rule for locks
------------------

An exception raised at an arbitrary bytecode can land right after a C-level
``acquire()`` and before the ``try`` that releases the lock (or between a
``queue.get()`` and the ``try`` that puts the item back): the lock stays
held for ever by a frame that is gone, and the next task of the process
that needs it hangs.  No check at the landing point can rule that out (a
lock has no owner to ask, and any frame of the stack may be between its
``acquire`` and its ``try``).  Hence:

* **A prefork child in which an interrupt landed is retired** once it has
  reported its task: `Interrupts.landed` is set when the exception is
  raised, and the child leaves billiard's work loop before it would take
  another job (`~cancellable.celery._celery_internals.retire_child_when`,
  the path of ``max_tasks_per_child``); the pool replaces it.  Nothing is
  lost: the task's REVOKED state is stored and its result reported (so the
  message is acknowledged) before the child goes.  If a lock the task left
  held stops the task itself from getting there (its own cleanup needs the
  lock), the terminate step (``cancellable_kill_after``) ends it.
* **In-process pools (threads, solo, gevent, eventlet) are never
  interrupted** at an arbitrary bytecode: the worker's own threads (its
  consumer, its poller, other tasks) share the process, and there is no
  process to retire.  There a task stops where the library controls the
  landing point: its checkpoints, `cancellable.sleep` and `cancellable.wait`
  (the cooperative step); the ladder says once per task that it cannot
  interrupt it (``cancel.not_escalated``).

When it may land (in a prefork child):

* only while the task's *body* runs (``entry.interruptible``, set and
  cleared by the task boundary under ``entry.window_lock``), and only in the
  thread that runs that task: a signal that arrives after the task ended,
  or while the child already runs the next task, finds no match and does
  nothing;
* at most once per task: the first one that lands closes the window, so
  later signals never land in the ``finally`` blocks and cleanup that
  handle it (a body that swallows it meets the terminate step instead);
* never while the core holds its lock (`cancellable._scope._lock`), never
  while the interrupted frame is this library's own code (a scope's
  ``__exit__`` before it takes the lock, the run of queued work), so it
  cannot cut a scope's bookkeeping in half; never inside a shield (cleanup
  hooks run inside one; a task's own shields are respected too).  The
  handler checks that on the spot and otherwise does nothing: the main
  process signals again at its next tick (0.1 s), so the interrupt is
  deferred, not lost.

The task boundary then ends the task as for any cancellation (REVOKED with
the reason, hooks run), adding how it ended: "interrupted after 1.0 s".
"""

from __future__ import annotations

import threading
import time
from typing import Final

from .. import _scope
from .._exceptions import Cancelled
from ._mailbox import INTERRUPT, Mailbox
from ._registry import RunningTask, RunningTasks

__all__ = ["Interrupts"]


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


class Interrupts:
    """The interrupt window of the tasks running in one process, and the way in.

    Made by the process's `~cancellable.celery._runtime.TaskRuntime` with
    its table of running tasks and its mailbox (a prefork child; None
    elsewhere).
    """

    def __init__(self, running: RunningTasks, mailbox: Mailbox | None) -> None:
        self._running = running
        self._mailbox = mailbox
        #: Whether an interrupt has landed in this process, at whatever
        #: bytecode the task was at (see "The rule for locks"): a prefork
        #: child then retires once it has reported its task.  A plain bool,
        #: set in the signal handler and read without a lock.
        self.landed = False

    def mark_landed(self) -> None:
        """Something else raised at an arbitrary bytecode here: retire as after an interrupt.

        A cleanup hook's budget (`cancellable._hooks.allow_async_raise`):
        called on the timer thread just before the raise, so it only sets
        the flag.
        """
        self.landed = True

    def open_window(self, entry: RunningTask) -> None:
        """The task's body starts: it may be interrupted from now on."""
        with entry.window_lock:
            entry.interruptible = True

    def close_window(self, entry: RunningTask) -> None:
        """The task's body is over: no interrupt may land from now on."""
        with entry.window_lock:
            entry.interruptible = False

    def raise_if_asked(self, frame: object = None) -> None:
        """Raise `Cancelled` here if the worker asked to interrupt the task of this thread.

        Called from the wake-up signal handler, so on the main thread, between
        two bytecodes of whatever it runs: it takes no lock and does no I/O
        (a look at the mailbox is a read of shared memory).  It raises only for
        the task that runs on this thread now, only if the mailbox slot of
        *that* task asks for an interrupt (or, in tests, its registry entry),
        and only at a safe moment (see the module docstring); otherwise it
        returns and the next signal tries again.  Once it raises, this
        process is marked `landed`.
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
            # Whatever this frame (or one below it) held stays held: the
            # process must not run another task (a prefork child retires).
            self.landed = True
            # The cooperative path (the mailbox check) is queued too, so the
            # scope becomes cancelled at the next checkpoint: cancellation
            # stays sticky.
            raise Cancelled(reason)
