"""The cancellation ladder, run by a worker's main process: grace, interrupt, terminate.

A cancellation is cooperative first: the task stops at its next
checkpoint.  With a *grace* (``cancel(..., grace=)``,
``@cancellable(grace=)`` or the app's ``cancellable_grace``, first given
wins in that order; None, the default, means cooperative only), a task
still running when the grace is over is *interrupted* (`Cancelled` raised
in its own thread, see `cancellable.celery._interrupt`), and one still
running ``cancellable_kill_after`` seconds later (default `DEFAULT_KILL_AFTER`;
None: never) is *terminated*: its prefork child is killed and billiard starts
a new one.

The main process owns the timers because it knows what each child holds:
`tick`, called every 0.1 s by the worker's poller thread, moves each
cancelled task up the ladder and keeps signalling it.

Terminate never hits the wrong task
-----------------------------------

`terminate` stops the child (``SIGSTOP``), waits until the kernel reports it
stopped, reads the child's row in the shared `ChildTable`, and kills it
(``SIGKILL``) only if the row still names the cancelled task; otherwise it
continues the child (``SIGCONT``) and the task, which has ended, is dropped
from the ladder.  A stopped child cannot start another task between the
check and the kill, so there is no window in which the kill can reach a
task that was not cancelled (the race of Celery's ``terminate=True``).
Before the kill we mark the billiard process as terminated on purpose (what
billiard's own ``terminate_job`` marks), so the pool reports the job as
``Terminated``, not as a lost worker: Celery then stores REVOKED
(`cancellable.celery._worker` replaces its bare "terminated" with the reason
and "terminated after N s"), acknowledges the message (never retried, also
with ``acks_late`` and ``task_reject_on_worker_lost``) and billiard replaces
the child.  A redelivered copy of the message is discarded by the index,
since the cancellation is in the ledger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from celery.worker import state as worker_state

from .._config import DEFAULT, validate_seconds
from .._exceptions import CancelReason
from .._log import logger
from .._log import reason_fields as _reason_fields
from ..events import (
    CANCEL_ESCALATED,
    CANCEL_NOT_ESCALATED,
    TASK_RESULT_NOT_STORED,
    TASK_TERMINATED,
    TERMINATE_AVERTED,
)
from . import _delivery, _interrupt, _registry, _wakeup
from ._childtable import ChildTable

__all__ = [
    "DEFAULT_KILL_AFTER",
    "configure_worker",
    "ending_of",
    "start",
    "stop_check_kill",
    "terminate",
    "tick",
]

#: Seconds between the interrupt and the terminate step, by default.
DEFAULT_KILL_AFTER: Final = 10.0

#: How long `terminate` waits for a stopped child to be reported stopped.
#: A child normally is within a millisecond; one in uninterruptible sleep
#: (disk or NFS I/O) is not until that ends.  The wait holds up the
#: worker's poller (every other delivery), so it is short, and retried at
#: the next tick, at most `MAX_STOP_TRIES` times for one task.
STOP_WAIT: Final = 0.05
MAX_STOP_TRIES: Final = 20

#: Seconds between two interrupt attempts on a pool thread (each may hold
#: the core's lock for up to `~cancellable.celery._interrupt.LAND_WAIT`).
THREAD_RETRY: Final = 0.5


@dataclass
class _Rung:
    task_id: str
    task_name: str | None
    reason: CancelReason
    #: time.monotonic() when the worker got the cancellation.
    since: float
    grace: float | None
    kill_after: float | None
    step: str = "cooperative"
    interrupted_at: float = 0.0
    last_try: float = 0.0
    warned: bool = False
    #: Terminate attempts whose child could not be seen stopped in time.
    stop_tries: int = 0


_rungs: dict[str, _Rung] = {}
_lock = threading.Lock()
#: Held while rungs are advanced (by `tick`, or by `start` for grace 0), so
#: two threads never advance the same rung at once.
_advancing = threading.Lock()
#: Texts for REVOKED messages of tasks the ladder terminated, by task id.
_endings: dict[str, str] = {}

_app: Any = None
_worker: Any = None
_pool_kind = ""
_table: ChildTable | None = None
#: ``cancellable_kill_process_group``: each child leads its own process
#: group, and the terminate step kills the whole group (the task's
#: subprocesses too).
_kill_group = False


def configure_worker(app: Any, worker: Any, pool_kind: str) -> ChildTable | None:
    """Set up the ladder for a worker that is starting (``worker_init``, before the fork)."""
    global _app, _worker, _pool_kind, _table, _kill_group
    _app, _worker, _pool_kind = app, worker, pool_kind
    _kill_group = bool(app.conf.get("cancellable_kill_process_group", False))
    with _lock:
        _rungs.clear()
        _endings.clear()
    _table = ChildTable() if pool_kind == "prefork" else None
    return _table


def child_table() -> ChildTable | None:
    """The table shared with this worker's prefork children, if any."""
    return _table


def child_started() -> None:
    """In a new prefork child: lead a process group of its own, if so configured."""
    if _kill_group and hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError as exc:
            logger.warning(CANCEL_NOT_ESCALATED, why=f"cannot lead a process group: {exc}")


def _setting(name: str, default: Any) -> Any:
    if _app is None:
        return default
    value = _app.conf.get(name, default)
    return default if value == "default" else value


def _resolve_grace(call_grace: float | None, task_grace: Any) -> float | None:
    if call_grace is not None:
        return call_grace
    if task_grace is not DEFAULT:
        return None if task_grace is None else float(task_grace)
    value = _setting("cancellable_grace", None)
    return validate_seconds(value, "cancellable_grace")


#: `_task_grace` for a task that is not ``@cancellable``: never on the ladder.
_NOT_CANCELLABLE: Final = "not cancellable"


def _task_grace(task_name: str | None) -> Any:
    # The task's @cancellable(grace=...), read from the task registry.
    if _app is None or task_name is None:
        return DEFAULT
    task = _app.tasks.get(task_name)
    if task is None:
        return DEFAULT
    run = getattr(task, "__wrapped__", None)
    options = getattr(run, "_self_cancellable_options", None)
    if options is None:  # a staticmethod around the wrapper (bind=False)
        options = getattr(getattr(run, "__func__", None), "_self_cancellable_options", None)
    if options is None:
        # A plain task: it has no task boundary to interrupt at, and Celery's
        # own revoke handles it; signalling its child would only disturb it.
        return _NOT_CANCELLABLE
    return getattr(options, "grace", DEFAULT)


def start(task_id: str, reason: CancelReason, task_name: str | None, grace: float | None) -> None:
    """Put a cancelled task this worker holds on the ladder (no-op if already on it).

    ``grace`` is the one given to `~cancellable.celery.cancel` (None: use
    the task's, then the app's).
    """
    task_grace = _task_grace(task_name)
    if task_grace == _NOT_CANCELLABLE:
        return
    try:
        resolved = _resolve_grace(grace, task_grace)
        kill_after = validate_seconds(
            _setting("cancellable_kill_after", DEFAULT_KILL_AFTER), "cancellable_kill_after"
        )
    except (TypeError, ValueError) as exc:
        # A bad setting must not stop the cooperative cancellation.
        logger.warning(CANCEL_NOT_ESCALATED, task_id=task_id, task_name=task_name, why=str(exc))
        return
    if resolved is None:
        return
    with _lock:
        if task_id in _rungs:
            return
        rung = _rungs[task_id] = _Rung(
            task_id, task_name, reason, time.monotonic(), resolved, kill_after
        )
    if resolved == 0 and _advancing.acquire(blocking=False):
        # No grace: interrupt now rather than at the next tick (if the tick
        # is busy right now, it does it within 0.1 s).
        try:
            _advance_one(rung, time.monotonic())
        finally:
            _advancing.release()


def ending_of(task_id: str) -> str | None:
    """The REVOKED message for a task the ladder terminated (and forget it)."""
    with _lock:
        return _endings.pop(task_id, None)


def rungs() -> dict[str, _Rung]:
    """The tasks on the ladder now (a copy; for tests and diagnostics)."""
    with _lock:
        return dict(_rungs)


def tick() -> None:
    """Move every task on the ladder up a step when its time has come."""
    with _lock:
        items = list(_rungs.values())
    with _advancing:
        now = time.monotonic()
        for rung in items:
            _advance_one(rung, now)


def _advance_one(rung: _Rung, now: float) -> None:
    request = worker_state.requests.get(rung.task_id)
    entry = _registry.running(rung.task_id)
    if (request is None and entry is None) or rung.step == "done":
        with _lock:
            _rungs.pop(rung.task_id, None)
        return
    try:
        _advance(rung, request, entry, now)
    except Exception as exc:  # noqa: BLE001 - one task must not stop the ladder
        logger.warning(CANCEL_NOT_ESCALATED, task_id=rung.task_id, why="error", error=repr(exc))
        with _lock:
            _rungs.pop(rung.task_id, None)


def _log_step(rung: _Rung, step: str, now: float, **extra: Any) -> None:
    logger.info(
        CANCEL_ESCALATED,
        task_id=rung.task_id,
        task_name=rung.task_name,
        step=step,
        after_s=round(now - rung.since, 3),
        **_reason_fields(rung.reason),
        **extra,
    )


def _not_escalated(rung: _Rung, why: str) -> None:
    if not rung.warned:
        rung.warned = True
        logger.warning(
            CANCEL_NOT_ESCALATED,
            task_id=rung.task_id,
            task_name=rung.task_name,
            step=rung.step,
            why=why,
            **_reason_fields(rung.reason),
        )


def _advance(rung: _Rung, request: Any, entry: _registry.RunningTask | None, now: float) -> None:
    assert rung.grace is not None
    if rung.step == "cooperative":
        if now - rung.since < rung.grace:
            return
        if entry is None and not getattr(request, "worker_pid", None):
            return  # not started yet: it is skipped when it starts
        rung.step, rung.interrupted_at = "interrupt", now
        _log_step(rung, "interrupt", now, grace_s=rung.grace)
    if rung.step == "interrupt":
        if rung.kill_after is not None and now - rung.interrupted_at >= rung.kill_after:
            if _pool_kind != "prefork":
                # No process to kill: say so once, and keep trying to
                # interrupt (a blocking call may return, and then it lands).
                _not_escalated(rung, f"the {_pool_kind} pool cannot terminate a task")
                _interrupt_step(rung, request, entry, now)
                return
            rung.step = "terminate"
        else:
            _interrupt_step(rung, request, entry, now)
            return
    if rung.step == "terminate":
        pid = getattr(request, "worker_pid", None)
        if not pid:
            return
        outcome = terminate(pid, rung.task_id, rung, request)
        if outcome == "killed":
            rung.step = "done"
            _log_step(rung, "terminate", now, pid=pid)
        elif outcome == "moved_on":
            rung.step = "done"
        elif outcome == "unavailable":
            rung.step = "done"
            _not_escalated(rung, "the child has no row in the child table")
        else:  # "retry"
            rung.stop_tries += 1
            if rung.stop_tries >= MAX_STOP_TRIES:
                rung.step = "done"
                _not_escalated(
                    rung,
                    f"the child could not be stopped in {MAX_STOP_TRIES} tries "
                    "(uninterruptible sleep?); left running",
                )


def _interrupt_step(
    rung: _Rung, request: Any, entry: _registry.RunningTask | None, now: float
) -> None:
    if _pool_kind in ("gevent", "eventlet"):
        _not_escalated(rung, f"the {_pool_kind} pool cannot interrupt a greenlet")
        return
    if entry is not None:
        # In this process: threads or solo pool.
        if entry.thread != threading.main_thread().ident:
            if now - rung.last_try < THREAD_RETRY:
                return
            if not _interrupt.thread_interrupt_available():
                _not_escalated(rung, "this interpreter cannot interrupt threads")
                return
        rung.last_try = now
        _interrupt.interrupt_in_process(entry, rung.reason)
        return
    # A prefork child: ask through the mailbox slot, then signal.
    forward = _delivery.forwarding().get(rung.task_id)
    box = _delivery.mailbox()
    pid = getattr(request, "worker_pid", None)
    if forward is None or forward.slot is None or box is None or not pid:
        return
    box.escalate(forward.slot)
    _wakeup.wake(pid)


# --------------------------------------------------------------------------
# Terminate.


def _stopped(pid: int) -> bool | None:
    """Whether ``pid`` is stopped (None: gone, or no way to tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return _stopped_waitid(pid)
    state = stat.rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):
        return None
    return state in ("T", "t")


def _stopped_waitid(pid: int) -> bool | None:
    # Platforms without /proc: ask the kernel without reaping the child.
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return None
    try:
        result = waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return result is not None


def _billiard_process(pid: int) -> Any:
    pool = getattr(_worker, "pool", None)
    inner = getattr(pool, "_pool", None)
    finder = getattr(inner, "_process_by_pid", None)
    if finder is None:
        return None
    proc, _index = finder(pid)
    return proc


def stop_check_kill(
    table: ChildTable, pid: int, task_id: str, before_kill: Any = None, group: bool = False
) -> str:
    """Stop ``pid``, and kill it only if its row in ``table`` still names ``task_id``.

    The race-free core of the terminate step.  ``before_kill()``, if given,
    runs while the child is stopped and known to run the task, just before
    the ``SIGKILL``.  With ``group``, a child that leads its own process
    group is killed with its whole group (what the task started, too).
    Returns ``"killed"``, ``"moved_on"`` (the child runs something else, or
    is gone: it was continued, untouched) or ``"retry"`` (it could not be
    seen stopped within `STOP_WAIT`, or it was stopped in the middle of
    writing its row: continued).
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return "moved_on"
    killed = False
    try:
        deadline = time.monotonic() + STOP_WAIT
        while True:
            state = _stopped(pid)
            if state is None:
                return "moved_on"  # it died on its own
            if state:
                break
            if time.monotonic() >= deadline:
                return "retry"
            time.sleep(0.0005)
        if table.busy(pid):
            return "retry"  # stopped mid-write of its row: look again next tick
        if not table.runs(pid, task_id):
            return "moved_on"
        if before_kill is not None:
            before_kill()
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        killed = True
        return "killed"
    finally:
        if not killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def terminate(pid: int, task_id: str, rung: _Rung | None = None, request: Any = None) -> str:
    """Kill the prefork child ``pid`` if, once stopped, it still runs ``task_id``.

    Returns what `stop_check_kill` returns, or ``"unavailable"`` (the child
    has no row in the table, or the pool does not know it).  After a kill,
    the task's ending (REVOKED, acknowledged) is announced on the worker's
    event loop at once (`_announce_terminated`), rather than when billiard
    next looks at its dead children (seconds later).
    """
    table = _table
    if table is None or not table.knows(pid):
        return "unavailable"
    proc = _billiard_process(pid)
    if proc is None:
        return "unavailable"

    def before_kill() -> None:
        if rung is not None:
            after = time.monotonic() - rung.since
            with _lock:
                _endings[task_id] = f"{rung.reason.describe()} (terminated after {after:.1f} s)"
        # What billiard's terminate_job marks: the pool then reports the job
        # as Terminated (REVOKED, acknowledged), not as a lost worker.
        proc._controlled_termination = True
        proc._job_terminated = True

    outcome = stop_check_kill(table, pid, task_id, before_kill, _kill_group)
    if outcome == "moved_on":
        logger.info(TERMINATE_AVERTED, task_id=task_id, pid=pid)
    elif outcome == "killed":
        logger.warning(
            TASK_TERMINATED,
            task_id=task_id,
            task_name=None if rung is None else rung.task_name,
            pid=pid,
            after_s=None if rung is None else round(time.monotonic() - rung.since, 3),
            **({} if rung is None else _reason_fields(rung.reason)),
        )
        hub = getattr(_worker, "hub", None)
        if request is not None and hub is not None:
            hub.call_soon(_announce_terminated, hub, request)
    return outcome


#: Seconds after a kill at which the pool is asked to replace the child.
REPLACE_AFTER: Final = (0.05, 0.5)


def _announce_terminated(hub: Any, request: Any) -> None:
    # On the worker's event loop thread (kombu's Hub.call_soon), where
    # Celery itself announces a terminate: store REVOKED, acknowledge, send
    # task_revoked.  When billiard later reports the job Terminated,
    # Celery sees it was announced already and does nothing more.
    # A failure here must not escape: kombu runs call_soon callbacks
    # unguarded, and an exception would stop the worker's event loop.
    try:
        if not request._already_revoked:
            request._announce_revoked("terminated", True, int(signal.SIGKILL), False)
    except Exception as exc:  # noqa: BLE001 - log it; billiard still reports the job
        logger.warning(
            TASK_RESULT_NOT_STORED,
            task_id=getattr(request, "id", None),
            task_name=getattr(request, "type", None),
            error=repr(exc),
            exc_info=exc,
        )
    # billiard replaces dead children when it next maintains the pool (a
    # 5 s timer); ask for it now, once the kernel has reaped the child.
    maintain = getattr(
        getattr(getattr(_worker, "pool", None), "_pool", None), "maintain_pool", None
    )
    if maintain is not None:
        for delay in REPLACE_AFTER:
            hub.call_later(delay, maintain)
