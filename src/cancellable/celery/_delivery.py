"""Getting a cancellation from a worker's main process to the task it names.

The main process of a Celery worker receives every revoke broadcast; the
task may be running in the same process (threads, gevent, eventlet and solo
pools) or in a prefork child, which has no broker connection of its own.

Same process
    `deliver_local` finds the task's scope in this process's registry and
    cancels it directly: `CancelScope.cancel` is thread-safe.

Prefork child
    The main process writes the task id and reason into a shared-memory
    *mailbox* (an anonymous ``mmap`` created at import time, before the pool
    forks, so every child maps the same pages), then sends the child a signal
    (``SIGURG`` by default).  The child's handler does the minimum a signal
    handler may: it asks the core to run `_check_mailbox` at the next
    checkpoint (`request_slow_path` takes no lock and does no I/O).  That
    function, run by the task's own thread, looks up the ids of the tasks this
    child is running in the mailbox and cancels their scopes.

Invariants:

* The mailbox has one writer per worker, its main process, and any number
  of readers (its children).  It is a ring: the header counts the slots
  written so far, a key table holds one NUL-terminated task id per slot, and
  each slot holds ``[u32 length][JSON with the id and reason]``.  The writer
  blanks a slot's key, fills the slot, then writes the key; a reader finds a
  key, reads the slot and checks the id inside it, so a slot caught while
  being rewritten is skipped, never misread (the ledger poll is the net).
* A signal or a slot never cancels the wrong task: the child matches the task
  *id* in the slot against the ids it is running now.  A signal that arrives
  after the task finished, or while the child already runs the next task,
  finds no match and does nothing (the race Celery warns about for
  ``terminate=True`` cannot happen here).
* The signal is ``SIGURG`` because its default action is to do nothing: a
  child that has not installed our handler yet (or a process that is not a
  pool child at all) is never killed by it.  ``SIGUSR1`` is billiard's soft
  time limit, and billiard replaces the handlers of ``SIGUSR2`` and the other
  termination signals *after* ``worker_process_init`` in pools without an
  event loop, so a handler installed there would be lost and the signal
  would end the child.  ``SIGURG`` is otherwise only sent for out-of-band
  socket data to a process that asked for it with ``F_SETOWN``; an unexpected
  one costs a look at the mailbox and nothing else.  The main process still
  signals only the child named by the request (``request.worker_pid``).
* A task that starts after its cancellation was written finds it at start
  (`pending_reason`), so a cancellation that races with the start is not lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from .. import _scope
from .._exceptions import CancelReason
from .._log import logger
from ..events import CANCEL_DELIVERED

__all__ = [
    "RunningTask",
    "deliver",
    "deliver_local",
    "install_child_handler",
    "pending_reason",
    "register",
    "unregister",
]

_SLOTS: Final = 64
_SLOT_SIZE: Final = 16384
_KEY_SIZE: Final = 128
_HEADER: Final = struct.Struct("<Q")
_SLOT_HEAD: Final = struct.Struct("<I")
_KEYS_START: Final = _HEADER.size
_KEYS_END: Final = _KEYS_START + _SLOTS * _KEY_SIZE

#: The shared mailbox: a header (slots written so far), a table of task-id
#: keys (one fixed-size entry per slot, small enough to search in about a
#: microsecond at every task start), and the slots holding the reasons.
#: Created here, at import, which happens in the worker's main process when
#: it imports the task modules, before the pool forks.
_mailbox: Final = mmap.mmap(-1, _KEYS_END + _SLOTS * _SLOT_SIZE)
_write_lock: Final = threading.Lock()


def _key(task_id: str) -> bytes:
    # The key-table entry for a task id, NUL-terminated.  Task ids are
    # normally 36-character UUIDs; an id too long for an entry is hashed.
    raw = task_id.encode()
    if len(raw) >= _KEY_SIZE - 1:
        raw = b"#" + hashlib.sha256(raw).hexdigest().encode()
    return raw + b"\0"


def _write_slot(task_id: str, reason: CancelReason, delivered_at: float) -> None:
    def encode(reason: CancelReason) -> bytes:
        entry = {"id": task_id, "reason": reason.to_dict(), "delivered_at": delivered_at}
        return json.dumps(entry).encode()

    payload = encode(reason)
    if len(payload) > _SLOT_SIZE - _SLOT_HEAD.size:
        # Only a huge message can do this: keep the id, trim the message.
        payload = encode(dataclasses.replace(reason, message=reason.message[:1000]))
    key = _key(task_id)
    with _write_lock:
        (count,) = _HEADER.unpack_from(_mailbox, 0)
        slot = count % _SLOTS
        key_at = _KEYS_START + slot * _KEY_SIZE
        slot_at = _KEYS_END + slot * _SLOT_SIZE
        # Invalidate the key first, fill the slot, then publish the key.
        _mailbox[key_at : key_at + _KEY_SIZE] = bytes(_KEY_SIZE)
        _SLOT_HEAD.pack_into(_mailbox, slot_at, len(payload))
        _mailbox[slot_at + _SLOT_HEAD.size : slot_at + _SLOT_HEAD.size + len(payload)] = payload
        _mailbox[key_at : key_at + len(key)] = key
        _HEADER.pack_into(_mailbox, 0, count + 1)


def _read_slot(slot: int, task_id: str) -> tuple[CancelReason, float] | None:
    slot_at = _KEYS_END + slot * _SLOT_SIZE
    (length,) = _SLOT_HEAD.unpack_from(_mailbox, slot_at)
    raw = _mailbox[slot_at + _SLOT_HEAD.size : slot_at + _SLOT_HEAD.size + length]
    try:
        data = json.loads(raw)
        if data["id"] == task_id:
            return CancelReason.from_dict(data["reason"]), float(data["delivered_at"])
    except (ValueError, KeyError, TypeError):
        pass  # being rewritten right now; the ledger poll is the net
    return None


def _read_mailbox(task_ids: set[str]) -> dict[str, tuple[CancelReason, float]]:
    """Entries of the mailbox that name one of ``task_ids``."""
    found: dict[str, tuple[CancelReason, float]] = {}
    if not task_ids or not _HEADER.unpack_from(_mailbox, 0)[0]:
        return found
    for task_id in task_ids:
        key = _key(task_id)
        at = _mailbox.find(key, _KEYS_START, _KEYS_END)
        while at != -1:
            slot, misaligned = divmod(at - _KEYS_START, _KEY_SIZE)
            if not misaligned:
                entry = _read_slot(slot, task_id)
                if entry is not None:
                    found[task_id] = entry
                    break
            at = _mailbox.find(key, at + 1, _KEYS_END)
    return found


# --------------------------------------------------------------------------
# The registry of tasks running in this process.


@dataclass
class RunningTask:
    """A ``@cancellable`` task executing in this process."""

    task_id: str
    task_name: str
    scope: _scope.CancelScope
    started_at: float = field(default_factory=time.time)
    delivered_at: float | None = None

    def revoked(self) -> bool:
        """``request.revoked()``: has this task been cancelled?"""
        if _scope._deferred:
            _scope._run_deferred()
        return self.scope.cancel_called


_running: dict[str, RunningTask] = {}
_running_lock: Final = threading.Lock()

#: Reasons delivered to this process for tasks not (yet) running here, e.g. a
#: threads-pool task still waiting in the executor's queue.  Bounded.
_early: dict[str, tuple[CancelReason, float]] = {}
_EARLY_MAX: Final = 10_000


def register(entry: RunningTask) -> None:
    """Record that ``entry`` runs in this process."""
    with _running_lock:
        _running[entry.task_id] = entry


def unregister(entry: RunningTask) -> None:
    """Forget ``entry`` (the task ended)."""
    with _running_lock:
        if _running.get(entry.task_id) is entry:
            del _running[entry.task_id]
        _early.pop(entry.task_id, None)


def running(task_id: str) -> RunningTask | None:
    """The entry of ``task_id`` if it runs in this process."""
    with _running_lock:
        return _running.get(task_id)


def running_ids() -> list[str]:
    """Ids of the ``@cancellable`` tasks running in this process."""
    with _running_lock:
        return list(_running)


def _cancel_entry(entry: RunningTask, reason: CancelReason, delivered_at: float) -> None:
    if entry.delivered_at is None:
        entry.delivered_at = delivered_at
    entry.scope._cancel(reason)


def deliver_local(task_id: str, reason: CancelReason) -> bool:
    """Cancel ``task_id`` if it runs in this process; remember it otherwise.

    Returns True if a running task was cancelled.
    """
    now = time.time()
    with _running_lock:
        entry = _running.get(task_id)
        if entry is None:
            if len(_early) >= _EARLY_MAX:
                _early.pop(next(iter(_early)))
            _early.setdefault(task_id, (reason, now))
    if entry is None:
        return False
    _cancel_entry(entry, reason, now)
    _log_delivered(task_id, entry.task_name, reason, now, "local")
    return True


def deliver(
    task_id: str, reason: CancelReason, worker_pid: int | None, task_name: str | None = None
) -> str:
    """Deliver a cancellation from a worker's main process.

    Returns how: ``"local"`` (cancelled in this process), ``"signal"``
    (mailbox + signal to the child ``worker_pid``) or ``"mailbox"``
    (written for a task that has not started in a child yet).
    """
    if deliver_local(task_id, reason):
        return "local"
    delivered_at = time.time()
    _write_slot(task_id, reason, delivered_at)
    if worker_pid and worker_pid != os.getpid():
        try:
            os.kill(worker_pid, _signum)
        except ProcessLookupError:
            return "mailbox"
        _log_delivered(task_id, task_name, reason, delivered_at, "signal", pid=worker_pid)
        return "signal"
    return "mailbox"


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
        **_scope._reason_fields(reason),
        **extra,
    )


def pending_reason(task_id: str) -> tuple[CancelReason, float] | None:
    """A cancellation that reached this process before ``task_id`` started."""
    with _running_lock:
        early = _early.get(task_id)
    if early is not None:
        return early
    return _read_mailbox({task_id}).get(task_id)


def _check_mailbox() -> None:
    # Runs at a checkpoint (or request.revoked()) on a task's thread, after a
    # signal: never in the signal handler itself.
    ids = set(running_ids())
    for task_id, (reason, delivered_at) in _read_mailbox(ids).items():
        entry = running(task_id)
        if entry is not None:
            _cancel_entry(entry, reason, delivered_at)


def _on_signal(signum: int, frame: object) -> None:
    # Signal handler: no locks, no I/O, no allocation beyond the deque entry.
    _scope.request_slow_path(_check_mailbox)


_signum: int = signal.SIGURG


def set_signal(signum: int) -> None:
    """Use ``signum`` instead of SIGURG (call before the pool starts)."""
    global _signum
    _signum = signum


def install_child_handler() -> None:
    """Install the handler in a pool child (``worker_process_init``)."""
    signal.signal(_signum, _on_signal)


_checked_pid = 0


def ensure_child_handler() -> None:
    """Reinstall the handler if something replaced it (first task of a process).

    billiard may reset signal handlers after ``worker_process_init``, never
    later, so one check per process, on the main thread, is enough.
    """
    global _checked_pid
    pid = os.getpid()
    if pid == _checked_pid or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(_signum) is not _on_signal:
        signal.signal(_signum, _on_signal)
    _checked_pid = pid
