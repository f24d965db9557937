"""The ``@cancellable`` tasks running in a process, by task id.

A cancellation that reaches the process (a revoke handled by the main
process of an in-process pool, or a mailbox slot read by a prefork child)
finds the task's scope in its `RunningTasks` table, which the process's
`~cancellable.celery._runtime.TaskRuntime` holds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .. import _scope
from .._exceptions import CancelReason

__all__ = ["RunningTask", "RunningTasks", "cancel"]


@dataclass
class RunningTask:
    """A ``@cancellable`` task executing in this process."""

    task_id: str
    task_name: str
    scope: _scope.CancelScope
    #: The task's group and workflow root ids (named as on Celery's requests).
    group: str | None = None
    root_id: str | None = None
    started_at: float = field(default_factory=time.time)
    #: When the cancellation reached this process (seconds since the epoch).
    delivered_at: float | None = None
    #: The thread running the task (`threading.get_ident`).
    thread: int = field(default_factory=threading.get_ident)
    #: True while the task's body runs: the only time it may be interrupted
    #: (see `cancellable.celery._interrupt`).  Written by the task's thread
    #: under ``window_lock``.
    interruptible: bool = False
    window_lock: threading.Lock = field(default_factory=threading.Lock)
    #: An interrupt asked through this entry rather than the mailbox (unit
    #: tests; a worker asks a prefork child through its mailbox slot).
    interrupt_reason: CancelReason | None = None
    #: How the task was ended, for its REVOKED message ("interrupted after
    #: 1.0 s"); None: it stopped at a checkpoint.
    ended_by: str | None = None

    def revoked(self) -> bool:
        """``request.revoked()``: has this task been cancelled?"""
        _scope.run_deferred()
        return self.scope.cancel_called


class RunningTasks:
    """The table of the ``@cancellable`` tasks running in one process."""

    def __init__(self) -> None:
        self._running: dict[str, RunningTask] = {}
        self._lock = threading.Lock()

    def register(self, entry: RunningTask) -> None:
        """Record that ``entry`` runs in this process."""
        with self._lock:
            self._running[entry.task_id] = entry

    def unregister(self, entry: RunningTask) -> None:
        """Forget ``entry`` (the task ended)."""
        with self._lock:
            if self._running.get(entry.task_id) is entry:
                del self._running[entry.task_id]

    def get(self, task_id: str) -> RunningTask | None:
        """The entry of ``task_id`` if it runs in this process."""
        return self._running.get(task_id)

    def ids(self) -> set[str]:
        """Ids of the ``@cancellable`` tasks running in this process."""
        with self._lock:
            return set(self._running)

    def entries(self) -> tuple[RunningTask, ...]:
        """The entries now, without taking the lock (safe in a signal handler)."""
        return tuple(self._running.values())


def cancel(entry: RunningTask, reason: CancelReason, delivered_at: float) -> bool:
    """Cancel a running task's scope; True if this was its first cancellation."""
    if entry.delivered_at is None:
        entry.delivered_at = delivered_at
    return _scope.cancel_with(entry.scope, reason)
