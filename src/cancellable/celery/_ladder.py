"""The cancellation ladder, run by a worker's main process: grace, interrupt, terminate.

A cancellation is cooperative first: the task stops at its next
checkpoint.  With a *grace* (``cancel(..., grace=)``,
``@cancellable(grace=)`` or the app's ``cancellable_grace``, first given
wins in that order; None, the default, means cooperative only), a task
still running in a prefork child when the grace is over is *interrupted*
(`Cancelled` raised in its own thread, see `cancellable.celery._interrupt`;
the child is retired once it has reported the task), and one still running
``cancellable_kill_after`` seconds later (default `DEFAULT_KILL_AFTER`;
None: never) is *terminated*: its prefork child is killed and billiard starts
a new one.  A task running in the worker's own process (threads, solo,
gevent, eventlet) is neither: it stops at a checkpoint, and the ladder says
once (``cancel.not_escalated``) that it can do no more.

The main process owns the timers because it knows what each child holds:
its `Ladder` (in the worker's `~cancellable.celery._runtime.WorkerRuntime`)
has `Ladder.tick` called every 0.1 s by the worker's poller thread, which
moves each cancelled task up the ladder and keeps signalling it.

Terminate never hits the wrong task
-----------------------------------

`Ladder.terminate` stops the child (``SIGSTOP``), waits until the kernel reports it
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
from . import _celery_internals as celery_internals
from ._childtable import ChildTable
from ._delivery import Delivery, cancellable_options
from ._registry import RunningTask, RunningTasks
from ._settings import DEFAULT_KILL_AFTER, Settings

__all__ = ["DEFAULT_KILL_AFTER", "Ladder", "stop_check_kill"]

#: How long `Ladder.terminate` waits for a stopped child to be reported stopped.
#: A child normally is within a millisecond; one in uninterruptible sleep
#: (disk or NFS I/O) is not until that ends.  The wait holds up the
#: worker's poller (every other delivery), so it is short, and retried at
#: the next tick, at most `MAX_STOP_TRIES` times for one task.
STOP_WAIT: Final = 0.05
MAX_STOP_TRIES: Final = 20

#: Seconds after a kill at which the pool is asked to replace the child.
REPLACE_AFTER: Final = (0.05, 0.5)

#: Seconds after an interrupted task ended at which the pool is asked to
#: replace its child, which retires once the main process has read the
#: task's result (billiard's child checks every 0.1 s, then exits).
RETIRE_REPLACE_AFTER: Final = (0.1, 0.2, 0.3, 0.5, 0.8, 1.3)

#: What `Ladder.task_grace` says of a task that is not ``@cancellable``: never on the ladder.
NOT_CANCELLABLE: Final = "not cancellable"


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
    warned: bool = False
    #: Terminate attempts whose child could not be seen stopped in time.
    stop_tries: int = 0


class Ladder:
    """One worker's cancellation ladder (see the module docstring).

    Args:
        app: The worker's app (its task registry, for each task's own grace).
        settings: The app's validated settings (``cancellable_grace``,
            ``cancellable_kill_after``).
        worker: The ``WorkController`` (its pool, its event loop), or None.
        pool_kind: ``"prefork"``, ``"threads"``, ``"solo"``, ``"gevent"``,
            ``"eventlet"`` or ``""``.
        delivery: The worker's deliveries (the mailbox slots of prefork children).
        running: The tasks running in the worker's own process.
        table: The table the prefork children publish their task in.
    """

    def __init__(
        self,
        app: Any,
        settings: Settings,
        worker: Any,
        pool_kind: str,
        delivery: Delivery,
        running: RunningTasks,
        table: ChildTable | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.worker = worker
        self.pool_kind = pool_kind
        self.table = table
        self._delivery = delivery
        self._running = running
        self._rungs: dict[str, _Rung] = {}
        self._lock = threading.Lock()
        #: Held while rungs are advanced (by `tick`, or by `start` for grace
        #: 0), so two threads never advance the same rung at once.
        self._advancing = threading.Lock()
        #: Texts for REVOKED messages of tasks the ladder terminated, by task id.
        self._endings: dict[str, str] = {}

    def resolve_grace(self, call_grace: float | None, task_grace: Any) -> float | None:
        """The grace that applies: the call's, else the task's, else the app's."""
        if call_grace is not None:
            return call_grace
        if task_grace is not DEFAULT:
            return None if task_grace is None else validate_seconds(task_grace, "grace")
        return self.settings.grace

    def task_grace(self, task_name: str | None) -> Any:
        """The task's ``@cancellable(grace=...)``, read from the app's task registry.

        `~cancellable.DEFAULT` when it gives none, `NOT_CANCELLABLE` for a task that is
        not ``@cancellable``.
        """
        if self.app is None or task_name is None:
            return DEFAULT
        task = self.app.tasks.get(task_name)
        if task is None:
            return DEFAULT
        options = cancellable_options(task)
        if options is None:
            # A plain task: it has no task boundary to interrupt at, and Celery's
            # own revoke handles it; signalling its child would only disturb it.
            return NOT_CANCELLABLE
        return getattr(options, "grace", DEFAULT)

    def start(
        self,
        task_id: str,
        reason: CancelReason,
        task_name: str | None,
        grace: float | None,
        *,
        terminate: bool = True,
    ) -> None:
        """Put a cancelled task this worker holds on the ladder.

        ``grace`` is the one given to `~cancellable.celery.cancel` (None: use
        the task's, then the app's).  A task already on the ladder keeps the
        earlier of its deadline and the new one: a later cancellation may
        shorten its grace, never lengthen it.  ``terminate=False`` stops at
        the interrupt step (a task sent back to the broker must not end
        REVOKED).
        """
        task_grace = self.task_grace(task_name)
        if task_grace == NOT_CANCELLABLE:
            return
        kill_after = self.settings.kill_after if terminate else None
        try:
            resolved = self.resolve_grace(grace, task_grace)
        except (TypeError, ValueError) as exc:
            # A bad grace must not stop the cooperative cancellation.
            logger.warning(CANCEL_NOT_ESCALATED, task_id=task_id, task_name=task_name, why=str(exc))
            return
        if resolved is None:
            return
        now = time.monotonic()
        with self._lock:
            rung = self._rungs.get(task_id)
            if rung is None:
                rung = self._rungs[task_id] = _Rung(
                    task_id, task_name, reason, now, resolved, kill_after
                )
            elif rung.step == "cooperative" and rung.grace is not None:
                # A later cancel may shorten the grace, never lengthen it:
                # the earlier of the two deadlines wins.
                rung.grace = min(rung.grace, now - rung.since + resolved)
            else:
                return
        if resolved == 0 and self._advancing.acquire(blocking=False):
            # No grace: interrupt now rather than at the next tick (if the tick
            # is busy right now, it does it within 0.1 s).
            try:
                self._advance_one(rung, time.monotonic())
            finally:
                self._advancing.release()

    def ending_of(self, task_id: str) -> str | None:
        """The REVOKED message for a task the ladder terminated (and forget it)."""
        with self._lock:
            return self._endings.pop(task_id, None)

    def rungs(self) -> dict[str, _Rung]:
        """The tasks on the ladder now (a copy)."""
        with self._lock:
            return dict(self._rungs)

    def tick(self) -> None:
        """Move every task on the ladder up a step when its time has come."""
        with self._lock:
            items = list(self._rungs.values())
        with self._advancing:
            now = time.monotonic()
            for rung in items:
                self._advance_one(rung, now)

    def _advance_one(self, rung: _Rung, now: float) -> None:
        request = celery_internals.worker_requests().get(rung.task_id)
        entry = self._running.get(rung.task_id)
        if (request is None and entry is None) or rung.step == "done":
            with self._lock:
                self._rungs.pop(rung.task_id, None)
            if rung.step == "interrupt" and self.pool_kind == "prefork":
                # It ended after the interrupt was asked: if it landed, its
                # child is retiring now (see _interrupt); replace it at once.
                self._replace_children_soon()
            return
        try:
            self._advance(rung, request, entry, now)
        except Exception as exc:  # noqa: BLE001 - one task must not stop the ladder
            logger.warning(CANCEL_NOT_ESCALATED, task_id=rung.task_id, why="error", error=repr(exc))
            with self._lock:
                self._rungs.pop(rung.task_id, None)

    def _advance(self, rung: _Rung, request: Any, entry: RunningTask | None, now: float) -> None:
        assert rung.grace is not None
        if rung.step == "cooperative":
            if now - rung.since < rung.grace:
                return
            if entry is None and not celery_internals.request_worker_pid(request):
                return  # not started yet: it is skipped when it starts
            if self.pool_kind != "prefork" or entry is not None:
                # In this process (threads, solo, gevent, eventlet): never an
                # exception at an arbitrary bytecode (see _interrupt, "The
                # rule for locks"), and no process to kill.  Say so, once.
                rung.step = "interrupt"  # the step it cannot take, for the warning
                _not_escalated(rung, _in_process_limit(self.pool_kind))
                rung.step = "done"
                return
            rung.step, rung.interrupted_at = "interrupt", now
            _log_step(rung, "interrupt", now, grace_s=rung.grace)
        if rung.step == "interrupt":
            if rung.kill_after is not None and now - rung.interrupted_at >= rung.kill_after:
                rung.step = "terminate"
            else:
                self._interrupt_step(rung, request)
                return
        if rung.step == "terminate":
            pid = celery_internals.request_worker_pid(request)
            if not pid:
                return
            outcome = self.terminate(pid, rung.task_id, rung, request)
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

    def _interrupt_step(self, rung: _Rung, request: Any) -> None:
        # A prefork child: ask through the mailbox slot, then signal; the
        # child retires once the interrupt has landed and its task is reported.
        pid = celery_internals.request_worker_pid(request)
        if pid:
            self._delivery.escalate(rung.task_id, pid)

    def terminate(
        self, pid: int, task_id: str, rung: _Rung | None = None, request: Any = None
    ) -> str:
        """Kill the prefork child ``pid`` if, once stopped, it still runs ``task_id``.

        Returns what `stop_check_kill` returns, or ``"unavailable"`` (the child
        has no row in the table, or the pool does not know it).  After a kill,
        the task's ending (REVOKED, acknowledged) is announced on the worker's
        event loop at once (`_announce_terminated`), rather than when billiard
        next looks at its dead children (seconds later).
        """
        table = self.table
        if table is None or not table.knows(pid):
            return "unavailable"
        proc = celery_internals.pool_process(getattr(self.worker, "pool", None), pid)
        if proc is None:
            return "unavailable"

        def before_kill() -> None:
            if rung is not None:
                after = time.monotonic() - rung.since
                with self._lock:
                    self._endings[task_id] = (
                        f"{rung.reason.describe()} (terminated after {after:.1f} s)"
                    )
            # The pool then reports the job as Terminated (REVOKED,
            # acknowledged), not as a lost worker.
            celery_internals.mark_process_terminated(proc)

        outcome = stop_check_kill(
            table, pid, task_id, before_kill, self.settings.kill_process_group
        )
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
            hub = celery_internals.worker_hub(self.worker)
            if request is not None and hub is not None:
                hub.call_soon(self._announce_terminated, hub, request)
        return outcome

    def _replace_children_soon(self) -> None:
        # billiard replaces an exited child when it next maintains the pool
        # (a 5 s timer); ask for it shortly after the child's exit instead,
        # from the worker's event loop (the only thread that may touch the pool).
        hub = celery_internals.worker_hub(self.worker)
        if hub is not None:
            hub.call_soon(self._maintain_later, hub, RETIRE_REPLACE_AFTER)

    def _maintain_later(self, hub: Any, delays: tuple[float, ...]) -> None:
        maintain = celery_internals.pool_maintainer(getattr(self.worker, "pool", None))
        if maintain is not None:
            for delay in delays:
                hub.call_later(delay, maintain)

    def _announce_terminated(self, hub: Any, request: Any) -> None:
        # On the worker's event loop thread (kombu's Hub.call_soon), where
        # Celery itself announces a terminate: store REVOKED, acknowledge, send
        # task_revoked.  When billiard later reports the job Terminated,
        # Celery sees it was announced already and does nothing more.
        # A failure here must not escape: kombu runs call_soon callbacks
        # unguarded, and an exception would stop the worker's event loop.
        try:
            if not celery_internals.request_already_revoked(request):
                celery_internals.announce_revoked(
                    request, "terminated", True, int(signal.SIGKILL), False
                )
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
        self._maintain_later(hub, REPLACE_AFTER)


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


def _in_process_limit(pool_kind: str) -> str:
    """Why a task running in the worker's own process is never interrupted nor terminated."""
    pool = f"the {pool_kind} pool" if pool_kind else "this pool"
    return (
        f"{pool} interrupts a task only at its checkpoints (checkpoint(), cancellable.sleep, "
        "cancellable.wait): an exception raised at an arbitrary point could leave a lock "
        "held for ever and hang later tasks, and there is no process to kill"
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
