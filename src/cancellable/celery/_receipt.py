"""What `cancel` returns: a receipt that can wait for the outcome of each task it names.

The outcome of a task is read from the result backend, the one place every
client can read whatever backend the app uses (Redis, a ``db+`` database,
django-celery-results, ...).  How a cancelled task ended is in its
``REVOKED`` message, which the worker writes (`ending_note`) and the receipt
reads back (`ended_by`): ``"revoked by alice: stop (stopped at a checkpoint
after 45 ms)"``, ``"... (interrupted after 1.0 s)"``, ``"... (terminated
after 11.0 s)"``; a bare reason is a task that never started (discarded
while queued, reserved or held for its ETA, or a part of a workflow that
will never be sent).  The message is the only field every backend keeps for
a ``REVOKED`` result (Celery's meta has no room for more: custom keys are
dropped by the database backends and by the decoding of every backend).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
import time
from collections.abc import Iterable
from typing import Any, Final

from celery import states

from .._exceptions import CancelReason

__all__ = ["CancelReceipt", "Outcome", "TaskOutcome", "ended_by", "ending_note"]

#: The note the worker adds to the REVOKED message of a task that ran.
_NOTE: Final = re.compile(
    r"\((stopped at a checkpoint|interrupted|terminated)(?: after [0-9]+(?:\.[0-9]+)? m?s)?\)\Z"
)

#: States a task that has not started yet may have stored (a retry waits for its ETA).
_WAITING: Final = frozenset({states.PENDING, states.RECEIVED, states.RETRY})


def ending_note(delivered_at: float | None, observed_at: float | None) -> str:
    """How a task that stopped at a checkpoint ended, for its REVOKED message."""
    if delivered_at is None or observed_at is None:
        return "stopped at a checkpoint"
    seconds = max(0.0, observed_at - delivered_at)
    if seconds < 1.0:
        return f"stopped at a checkpoint after {seconds * 1000:.0f} ms"
    return f"stopped at a checkpoint after {seconds:.1f} s"


class Outcome(str, enum.Enum):
    """How a task named by a `CancelReceipt` ended, or where it was when the wait ended.

    .. versionadded:: 0.1.0
    """

    #: Never started: discarded while queued, reserved or held for its ETA,
    #: or a part of a workflow that will now never be sent.  REVOKED.
    DISCARDED = "discarded"
    #: Was running and stopped at a checkpoint; its cleanup hooks ran.  REVOKED.
    STOPPED = "stopped"
    #: Was running and was interrupted after its grace (see :doc:`/grace`).  REVOKED.
    INTERRUPTED = "interrupted"
    #: Was running and its process was terminated (the grace ladder's last
    #: step, or ``revoke(terminate=True)``).  REVOKED.
    TERMINATED = "terminated"
    #: Had already finished (SUCCESS, FAILURE or REVOKED) when `cancel` was
    #: called.  Nothing was recorded for it.
    FINISHED = "finished"
    #: Finished (SUCCESS or FAILURE) after the cancellation without observing
    #: it: it reached no checkpoint after the cancellation arrived (or is not
    #: ``@cancellable``).  The worker logs ``task.cancel_unobserved``.
    UNOBSERVED = "unobserved"
    #: Still running when the wait ended (no checkpoint reached yet).
    RUNNING = "running"
    #: Not started when the wait ended (held by a worker, or waiting to be
    #: retried): it will not run.
    QUEUED = "queued"
    #: No state in the result backend and not held by any online worker: a
    #: task still in the broker's queue, or an id that names nothing.  The
    #: cancellation is recorded, so it will not run if it is queued.
    UNKNOWN = "unknown"


#: Outcomes of a task the cancellation stopped or kept from running.
CANCELLED: Final = frozenset(
    {Outcome.DISCARDED, Outcome.STOPPED, Outcome.INTERRUPTED, Outcome.TERMINATED}
)


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """The outcome of one task, as `CancelReceipt.wait` found it.

    Attributes:
        task_id: The task.
        outcome: What happened to it (an `Outcome`).
        state: Its state in the result backend when it was read
            (``"PENDING"`` for a task with no state).
        message: The message of its ``REVOKED`` result, with the reason
            (``"revoked by alice: stop (stopped at a checkpoint after 45 ms)"``),
            or None for a task that did not end REVOKED.

    .. versionadded:: 0.1.0
    """

    task_id: str
    outcome: Outcome
    state: str
    message: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the cancellation stopped the task or kept it from running."""
        return self.outcome in CANCELLED

    def describe(self) -> str:
        """One line for people (what ``celery cancel`` prints after the id)."""
        outcome, state = self.outcome, self.state
        if outcome in CANCELLED:
            what = {
                Outcome.DISCARDED: "discarded before it started",
                Outcome.STOPPED: "stopped at a checkpoint",
                Outcome.INTERRUPTED: "interrupted",
                Outcome.TERMINATED: "terminated",
            }[outcome]
            message = self.message or ""
            note = _NOTE.search(message)
            if note is not None:  # "stopped at a checkpoint after 4 ms (REVOKED: reason)"
                what, message = note.group(0)[1:-1], message[: note.start()].rstrip()
            return f"{what} ({state}: {message})"
        if outcome is Outcome.FINISHED:
            return f"finished ({state}); nothing to cancel"
        if outcome is Outcome.UNOBSERVED:
            return (
                f"finished ({state}) after the cancellation without observing it "
                "(no checkpoint reached)"
            )
        if outcome is Outcome.RUNNING:
            return "still running (no checkpoint reached yet)"
        if outcome is Outcome.QUEUED:
            where = "reserved by a worker" if state == states.PENDING else state
            return f"queued ({where}); will not run"
        return "unknown (not seen by any online worker); recorded, so it will not run if queued"


@dataclasses.dataclass(frozen=True)
class CancelReceipt:
    """What `cancel` recorded and sent, and the tasks it can report on.

    `cancel` returns it at once; call `wait` for the outcome of each task.

    Attributes:
        reason: The `~cancellable.CancelReason` that was recorded and sent
            (what `cancel` returned before it returned a receipt).
        targets: What was recorded in the ledger and broadcast:
            ``("task", id)``, ``("group", id)`` and ``("root", id)`` pairs
            (see :doc:`/workflows`).  Empty when every task named had
            finished already: then nothing was recorded or sent.
        task_ids: Every task the receipt knows, in order: the ids given,
            the members of the groups given, and with ``workflow=True`` the
            tasks of each workflow that the held results or the result
            backend name (a workflow's tasks that no one knows yet are
            cancelled all the same, but not listed).
        finished: ``(task id, state)`` of the tasks given by id or result
            that had finished when `cancel` was called: they were left
            alone (not recorded, not broadcast).
        workflow: Whether `cancel` was called with ``workflow=True``.

    .. versionadded:: 0.1.0
    """

    reason: CancelReason
    targets: tuple[tuple[str, str], ...]
    task_ids: tuple[str, ...]
    finished: tuple[tuple[str, str], ...] = ()
    workflow: bool = False
    app: Any = dataclasses.field(default=None, repr=False, compare=False)
    #: Ids whose state was read when `cancel` was called (not finished then).
    _read_before: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, compare=False)

    @property
    def recorded(self) -> bool:
        """Whether anything was recorded and broadcast (False: all had finished)."""
        return bool(self.targets)

    def wait(self, timeout: float = 10.0, *, workers_timeout: float = 1.0) -> list[TaskOutcome]:
        """Wait up to ``timeout`` seconds for every task to end; return each one's outcome.

        Reads each task's state from the result backend until all have
        ended or the time is up.  The tasks still not ended are then looked
        up on the online workers (one ``query_task`` broadcast, answers
        awaited ``workers_timeout`` seconds; 0 skips it) to tell a running
        task from a queued one and from an unknown id.

        A task stored ``REVOKED`` counts as ended only once its cleanup
        hooks have run: the worker stores the state after them.

        Returns:
            One `TaskOutcome` per id of `task_ids`, in the same order.
        """
        if timeout < 0 or workers_timeout < 0:
            raise ValueError("timeout and workers_timeout must not be negative")
        backend = self.app.backend if self.app is not None else None
        done: dict[str, TaskOutcome] = {
            task_id: TaskOutcome(task_id, Outcome.FINISHED, state)
            for task_id, state in self.finished
        }
        pending = [t for t in self.task_ids if t not in done]
        last: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while True:
            for task_id in list(pending):
                meta = _meta(backend, task_id)
                status = str(meta.get("status") or states.PENDING)
                if status in states.READY_STATES:
                    done[task_id] = self._ended(task_id, status, meta)
                    pending.remove(task_id)
                else:
                    last[task_id] = status
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(0.05, left))
        if pending:
            held = _held(self.app, pending, workers_timeout) if workers_timeout else {}
            for task_id in pending:
                done[task_id] = _not_ended(task_id, last.get(task_id, states.PENDING), held)
        return [done[task_id] for task_id in self.task_ids]

    def _ended(self, task_id: str, status: str, meta: dict[str, Any]) -> TaskOutcome:
        message = str(meta.get("result")) if status == states.REVOKED else None
        if task_id not in self._read_before:
            done_at = _timestamp(meta.get("date_done"))
            if done_at is not None and done_at < self.reason.requested_at:
                return TaskOutcome(task_id, Outcome.FINISHED, status, message)
        if status != states.REVOKED:
            return TaskOutcome(task_id, Outcome.UNOBSERVED, status)
        return TaskOutcome(task_id, ended_by(message or ""), status, message)


def ended_by(message: str) -> Outcome:
    """The `Outcome` a REVOKED message says (see the module docstring)."""
    if message == "terminated":  # Celery's own revoke(terminate=True)
        return Outcome.TERMINATED
    match = _NOTE.search(message)
    if match is None:
        return Outcome.DISCARDED
    return {
        "stopped at a checkpoint": Outcome.STOPPED,
        "interrupted": Outcome.INTERRUPTED,
        "terminated": Outcome.TERMINATED,
    }[match.group(1)]


def _not_ended(task_id: str, status: str, held: dict[str, str]) -> TaskOutcome:
    where = held.get(task_id)
    if where == "active" or (where is None and status not in _WAITING):
        return TaskOutcome(task_id, Outcome.RUNNING, status)
    if where is not None or status != states.PENDING:
        return TaskOutcome(task_id, Outcome.QUEUED, status)
    return TaskOutcome(task_id, Outcome.UNKNOWN, status)


def _meta(backend: Any, task_id: str) -> dict[str, Any]:
    if backend is None:
        return {}
    try:
        meta = backend.get_task_meta(task_id)
    except Exception:  # noqa: BLE001 - no backend, or it failed: no state known
        return {}
    return meta if isinstance(meta, dict) else {}


def _timestamp(value: object) -> float | None:
    """Seconds since the epoch of a stored ``date_done`` (a datetime or ISO text)."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime.datetime):
        return None
    if value.tzinfo is None:  # Celery stores UTC (enable_utc, its default)
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


def _held(app: Any, task_ids: Iterable[str], timeout: float) -> dict[str, str]:
    """Which of ``task_ids`` online workers hold: ``{id: "active" | "reserved" | ...}``."""
    found: dict[str, str] = {}
    try:
        replies = app.control.inspect(timeout=timeout).query_task(*task_ids) or {}
    except Exception:  # noqa: BLE001 - no answer: nothing known to be held
        return found
    for tasks in replies.values():
        for task_id, (state, _info) in (tasks or {}).items():
            if state == "active" or task_id not in found:
                found[task_id] = str(state)
    return found
