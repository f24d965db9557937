"""Getting a cancellation to the task it names, wherever this worker holds it.

The main process of a Celery worker learns of cancellations (a revoke
broadcast, or its ledger poll) and must get each one to the task:

Same process (threads, gevent, eventlet and solo pools)
    The task's scope is in this process's table of running tasks
    (`cancellable.celery._registry`): `Delivery.deliver` cancels it
    directly (`CancelScope.cancel` is thread-safe).  A task that has not
    started yet finds the cancellation in the index when it starts.

Prefork child
    The child has no broker connection.  For every cancelled task that the
    worker *holds* (reserved or running: ``worker_state.requests``), the main
    process keeps a *forward*: a mailbox slot with the reason
    (`cancellable.celery._mailbox`) and, once the child running the task is
    known, wake-up signals (`cancellable.celery._wakeup`) until the child
    acknowledges the slot.  The forward lives until the task leaves the
    worker; `Delivery.tick`, called every 0.1 s by the worker's poller
    thread, does the waiting, re-signalling and freeing.  In the child,
    `check_mailbox` and `mailbox_reason` read the slots.

Invariants:

* A forward exists only for a task this worker holds, so the number of
  slots in use is bounded by what the worker can hold, never by how many ids
  a revoke names.
* A forward is kept until its task has ended: nothing the poller or a later
  revoke does can drop a cancellation of a task that still runs.
* Only ``@cancellable`` tasks get a forward.  A plain task has no
  checkpoint that would read a slot nor acknowledge it, and Celery's own
  revoke leaves a running plain task alone: its child is never signalled
  (`cancellable_options` says which tasks are ``@cancellable``).
* A signal or a slot never cancels the wrong task: the child matches the task
  *id* in the slot against the ids it runs now.  A signal that arrives after
  the task finished, or while the child already runs the next task, finds no
  match and does nothing (the race Celery warns about for ``terminate=True``
  cannot happen here).
* A task that starts after its slot was written finds it when it starts
  (`mailbox_reason`), so a cancellation that races with the start is not lost.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from .._exceptions import CancelReason
from .._log import logger, reason_fields
from ..events import CANCEL_DELIVERED, MAILBOX_FULL
from ._celery_internals import request_worker_pid, worker_requests
from ._mailbox import Mailbox
from ._registry import RunningTasks, cancel
from ._wakeup import Wakeup

__all__ = ["Delivery", "cancellable_options", "check_mailbox", "mailbox_reason"]

#: Seconds between wake-up signals to a child that has not acknowledged yet.
RESIGNAL_AFTER: Final = 0.5


@dataclass
class _Forward:
    reason: CancelReason
    delivered_at: float
    task_name: str | None
    slot: int | None = None
    signalled_pid: int | None = None
    signalled_at: float = 0.0


def cancellable_options(task: Any) -> Any | None:
    """The options ``@cancellable`` gave ``task`` (a Celery task), or None: a plain task."""
    # ``__wrapped__``: the function ``@app.task`` made the task from; ``run``:
    # the method of a task class.
    for run in (getattr(task, "__wrapped__", None), getattr(task, "run", None)):
        options = getattr(run, "_self_cancellable_options", None)
        if options is None:  # a staticmethod or a bound method around the wrapper
            options = getattr(getattr(run, "__func__", None), "_self_cancellable_options", None)
        if options is not None:
            return options
    return None


class Delivery:
    """One worker's deliveries from its main process (see the module docstring).

    ``mailbox`` is the one shared with the prefork children (None: an
    in-process pool, where every task runs in ``running``); ``app``'s task
    registry says which held tasks are ``@cancellable`` (only those get
    forwards).
    """

    def __init__(
        self, running: RunningTasks, mailbox: Mailbox | None, wakeup: Wakeup, app: Any
    ) -> None:
        self.running = running
        self.mailbox = mailbox
        self.app = app
        self._wakeup = wakeup
        self._forwards: dict[str, _Forward] = {}
        self._lock = threading.Lock()
        self._warned_full = False

    def forwarding(self) -> dict[str, _Forward]:
        """The forwards in flight (a copy)."""
        with self._lock:
            return dict(self._forwards)

    def deliver(self, task_id: str, reason: CancelReason) -> str:
        """Deliver a cancellation of ``task_id`` from this worker's main process.

        Returns how: ``"local"`` (the task runs in this process and its scope
        was cancelled), ``"forward"`` (a prefork child holds or will hold it: a
        forward was made or already existed), or ``"none"`` (this worker does not
        hold the task, or it is a plain task: Celery's revoke alone handles it).
        """
        now = time.time()
        entry = self.running.get(task_id)
        if entry is not None:
            if cancel(entry, reason, now):
                _log_delivered(task_id, entry.task_name, reason, now, "local")
            return "local"
        request = worker_requests().get(task_id)
        if request is None or self.mailbox is None or not self._cancellable(request):
            return "none"
        with self._lock:
            forward = self._forwards.get(task_id)
            if forward is None:
                forward = self._forwards[task_id] = _Forward(
                    reason, now, getattr(request, "name", None)
                )
        self._push(task_id, forward, request, time.monotonic())
        return "forward"

    def _cancellable(self, request: Any) -> bool:
        # The registered name (``type``), not a shadow name.
        name = getattr(request, "type", None) or getattr(request, "task_name", None)
        tasks = getattr(self.app, "tasks", None)
        task = None if tasks is None or name is None else tasks.get(name)
        return task is not None and cancellable_options(task) is not None

    def _push(self, task_id: str, forward: _Forward, request: Any, now: float) -> None:
        # Give the forward a slot if it has none, then wake the child running
        # the task until it acknowledges.  Called from the main thread (deliver)
        # and the poller (tick); the mailbox serialises the writes.
        box = self.mailbox
        if box is None:
            return
        slot = forward.slot
        if slot is None:
            with self._lock:
                # Atomic with the forward's end (tick): a slot is never given
                # to a forward that was dropped, nor twice to one forward.
                if self._forwards.get(task_id) is not forward:
                    return
                if forward.slot is None:
                    forward.slot = box.allocate(task_id, forward.reason, forward.delivered_at)
                slot = forward.slot
            if slot is None:
                if not self._warned_full:
                    self._warned_full = True
                    logger.warning(MAILBOX_FULL, task_id=task_id, slots=box.slots)
                return
        if box.acknowledged(slot):
            return
        pid = request_worker_pid(request)
        if not pid or pid == os.getpid():
            return  # not in a child yet: it finds the slot when it starts
        if forward.signalled_pid == pid and now - forward.signalled_at < RESIGNAL_AFTER:
            return
        first = forward.signalled_pid is None
        forward.signalled_pid, forward.signalled_at = pid, now
        if self._wakeup.wake(pid) and first:
            _log_delivered(
                task_id, forward.task_name, forward.reason, forward.delivered_at, "signal", pid=pid
            )

    def escalate(self, task_id: str, pid: int) -> bool:
        """Ask the child ``pid`` to interrupt ``task_id`` (its grace is over); False if unsent.

        Marks the task's mailbox slot `~cancellable.celery._mailbox.INTERRUPT`
        and signals the child.  Nothing happens while the task has no slot.
        """
        with self._lock:
            forward = self._forwards.get(task_id)
        box = self.mailbox
        slot = None if forward is None else forward.slot
        if slot is None or box is None or not box.escalate(slot, task_id):
            return False
        return self._wakeup.wake(pid)

    def tick(self) -> None:
        """Advance every forward: free those whose task has left, wake the others' children.

        A forward that fails does not keep the others from their tick: the
        first error is raised once every forward has had its turn.
        """
        box = self.mailbox
        if box is None:
            return
        with self._lock:
            items = list(self._forwards.items())
        now = time.monotonic()
        failed: Exception | None = None
        for task_id, forward in items:
            try:
                self._tick_one(box, task_id, forward, now)
            except Exception as exc:  # noqa: BLE001 - raised below, after the others
                failed = failed or exc
        if failed is not None:
            raise failed

    def _tick_one(self, box: Mailbox, task_id: str, forward: _Forward, now: float) -> None:
        request = worker_requests().get(task_id)
        if request is None:
            with self._lock:
                if self._forwards.get(task_id) is not forward:
                    return
                del self._forwards[task_id]
                slot, forward.slot = forward.slot, None
            if slot is not None:
                box.release(slot)
            return
        self._push(task_id, forward, request, now)


def _log_delivered(
    task_id: str,
    task_name: str | None,
    reason: CancelReason,
    delivered_at: float,
    how: str,
    **extra: Any,
) -> None:
    logger.info(
        CANCEL_DELIVERED,
        task_id=task_id,
        task_name=task_name,
        how=how,
        delivered_ms=round((delivered_at - reason.requested_at) * 1000.0, 3),
        **reason_fields(reason),
        **extra,
    )


# --------------------------------------------------------------------------
# The child's side.


def mailbox_reason(box: Mailbox | None, task_id: str) -> CancelReason | None:
    """A cancellation the main process left in ``box`` for ``task_id`` before it started."""
    if box is None:
        return None
    found = box.find({task_id}).get(task_id)
    if found is None:
        return None
    box.acknowledge(found.slot)
    return found.reason


def check_mailbox(box: Mailbox | None, running: RunningTasks) -> None:
    """Cancel the running tasks ``box`` names (after a wake-up signal).

    Runs at a checkpoint (or ``request.revoked()``) on a task's thread,
    never in the signal handler itself.
    """
    if box is None:
        return
    for task_id, found in box.find(running.ids()).items():
        entry = running.get(task_id)
        if entry is not None:
            cancel(entry, found.reason, found.delivered_at)
            box.acknowledge(found.slot)
