"""The ``@cancellable`` tasks running in this process, by task id.

A cancellation that reaches this process (a revoke handled by the main
process of an in-process pool, or a mailbox slot read by a prefork child)
finds the task's scope here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .. import _scope
from .._exceptions import CancelReason

__all__ = ["RunningTask", "cancel", "register", "running", "running_ids", "unregister"]


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
    #: In-process pools: the interrupt the worker asked for (None: none yet).
    interrupt_reason: CancelReason | None = None
    #: How the task was ended, for its REVOKED message ("interrupted after
    #: 1.0 s"); None: it stopped at a checkpoint.
    ended_by: str | None = None

    def revoked(self) -> bool:
        """``request.revoked()``: has this task been cancelled?"""
        _scope.run_deferred()
        return self.scope.cancel_called


_running: dict[str, RunningTask] = {}
_lock = threading.Lock()


def register(entry: RunningTask) -> None:
    """Record that ``entry`` runs in this process."""
    with _lock:
        _running[entry.task_id] = entry


def unregister(entry: RunningTask) -> None:
    """Forget ``entry`` (the task ended)."""
    with _lock:
        if _running.get(entry.task_id) is entry:
            del _running[entry.task_id]


def running(task_id: str) -> RunningTask | None:
    """The entry of ``task_id`` if it runs in this process."""
    return _running.get(task_id)


def running_ids() -> set[str]:
    """Ids of the ``@cancellable`` tasks running in this process."""
    with _lock:
        return set(_running)


def cancel(entry: RunningTask, reason: CancelReason, delivered_at: float) -> bool:
    """Cancel a running task's scope; True if this was its first cancellation."""
    if entry.delivered_at is None:
        entry.delivered_at = delivered_at
    return _scope.cancel_with(entry.scope, reason)


def reset_after_fork() -> None:
    """A forked child runs none of its parent's tasks, and holds none of its locks."""
    global _lock
    _lock = threading.Lock()
    _running.clear()
