"""The client side: `cancel`, `configure`, and the recorder of plain revokes.

What a workflow is made of (a result tree, or ids in the result backend) is
worked out by `cancellable.celery._workflow`.

Nothing here is installed when the module is imported: the first `cancel`
patches ``Control.revoke`` (`install_revoke_recorder`), as a worker does
when it starts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Final

from celery import states
from celery.exceptions import TaskRevokedError

from .._config import validate_grace
from .._exceptions import CancelReason
from .._log import logger
from ..events import CANCEL_BROADCAST_FAILED, LEDGER_UNAVAILABLE, TASK_RESULT_NOT_STORED
from . import _celery_internals as celery_internals
from . import _direct, _ledger
from ._broker import Deadline, wait_for
from ._receipt import CancelReceipt
from ._runtime import runtime
from ._settings import PREFIX, SettingError, Settings, forget_settings, settings_for
from ._workflow import (
    is_group_result,
    resolve_id,
    tree_ids,
    tree_targets,
    unsent_ids,
    workflow_of,
)

__all__ = [
    "BroadcastFailedWarning",
    "BrokerUnavailableError",
    "LedgerUnavailableWarning",
    "NotDurableWarning",
    "cancel",
    "cancel_targets",
    "configure",
    "install_revoke_recorder",
]


class BrokerUnavailableError(ConnectionError):
    """`cancel` could not reach the broker in time; the cancellation is not in effect.

    Raised within ``cancellable_cancel_timeout`` when the broker refuses the
    connection, fails, or does not answer (a stopped or partitioned server).
    Retrying the call is always safe.

    Attributes:
        maybe_sent: False when the check before anything was done failed:
            nothing was recorded or sent.  True when the check passed but the
            broadcast then failed or timed out and the cancellation could not
            be recorded in the ledger either: it is not durable, and online
            workers may or may not have received it (a broadcast that reaches
            a worker more than a second late is dropped by it).

    .. versionadded:: 0.1.0
    """

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


class LedgerUnavailableWarning(UserWarning):
    """The cancellation was broadcast but could not be recorded durably.

    Online workers still stop the task; a worker that was offline or restarts
    before it receives the task may run it.

    .. versionadded:: 0.1.0
    """


class BroadcastFailedWarning(UserWarning):
    """The cancellation was recorded in the ledger, but its broadcast failed or timed out.

    It is in effect: every worker applies it when it next reads the ledger
    (every ``cancellable_poll_interval`` seconds) rather than at once, and a
    worker that starts later reads it when it starts.

    .. versionadded:: 0.1.0
    """


class NotDurableWarning(UserWarning):
    """The app has no durable ledger: a cancellation reaches online workers only.

    Issued by `cancel` once per process and app (and printed by ``celery
    cancel``), with why: the result backend and the broker keep no ledger
    and ``cancellable_ledger_url`` is not set.  A task queued while no
    worker is online, or received by a worker that restarts, still runs.
    Setting ``cancellable_ledger_url = "none"`` says this is intended and
    silences it.  See :doc:`ledgers`.

    .. versionadded:: 0.1.0
    """


@dataclasses.dataclass
class _Plan:
    """What one `cancel` call names, gathered from its arguments."""

    workflow: bool
    task_ids: list[str] = dataclasses.field(default_factory=list)
    #: Group and root targets.
    wide: list[_ledger.Target] = dataclasses.field(default_factory=list)
    #: Bare ids whose workflow must be looked up in the result backend.
    bare: list[str] = dataclasses.field(default_factory=list)
    #: Result trees held by the client (to mark their unsent members).
    trees: list[Any] = dataclasses.field(default_factory=list)
    #: States the result backend gave while resolving bare ids, by task id.
    seen: dict[str, str] = dataclasses.field(default_factory=dict)
    apps: list[Any] = dataclasses.field(default_factory=list)

    def targets(self) -> list[_ledger.Target]:
        tasks: list[_ledger.Target] = [("task", task_id) for task_id in self.task_ids]
        return list(dict.fromkeys([*tasks, *self.wide]))


def _collect(task_or_id: object, plan: _Plan) -> None:
    if isinstance(task_or_id, str):
        if not task_or_id.strip():
            raise ValueError("a task id must be a non-empty string")
        if plan.workflow:
            plan.bare.append(task_or_id)
        else:
            plan.task_ids.append(task_or_id)
        return
    if task_or_id is None:
        raise TypeError("cancel() needs a task id, an AsyncResult or a list of them, got None")
    if is_group_result(task_or_id) and not isinstance(getattr(task_or_id, "id", None), str):
        # A ResultSet: a set of results with no group id, so no group target;
        # each member is cancelled as it would be on its own.
        plan.apps.append(getattr(task_or_id, "app", None))
        for member in task_or_id.results:  # type: ignore[attr-defined]
            _collect(member, plan)
        return
    if is_group_result(task_or_id):
        plan.apps.append(getattr(task_or_id, "app", None))
        plan.trees.append(task_or_id)
        if plan.workflow:
            plan.wide.extend(workflow_of(task_or_id))
        else:
            plan.wide.extend(tree_targets(task_or_id))
        return
    task_id = getattr(task_or_id, "id", None)
    if isinstance(task_id, str) and hasattr(task_or_id, "revoke"):
        if not task_id.strip():
            raise ValueError("a task id must be a non-empty string")
        plan.apps.append(getattr(task_or_id, "app", None))
        if plan.workflow:
            plan.trees.append(task_or_id)
            plan.wide.extend(workflow_of(task_or_id))
        else:
            plan.task_ids.append(task_id)
        return
    if isinstance(task_or_id, (list, tuple, set, frozenset)):
        for item in task_or_id:
            _collect(item, plan)
        return
    raise TypeError(
        "cancel() needs a task id (str), an AsyncResult, a GroupResult or a list of them, "
        f"got {type(task_or_id).__name__}"
    )


def cancel(
    task_or_id: str | Any | Iterable[str | Any],
    reason: CancelReason | str | None = None,
    *,
    requested_by: str | None = None,
    app: Any = None,
    workflow: bool = False,
    grace: float | None = None,
) -> CancelReceipt:
    """Cancel Celery tasks, groups or whole workflows, durably and with a reason.

    A queued or reserved task will not run; a running ``@cancellable`` task
    stops at its next checkpoint, runs its cleanup hooks and ends as REVOKED
    with ``reason`` in its `~celery.exceptions.TaskRevokedError`.  The
    cancellation is written to the ledger, so it is honoured by workers that
    are offline now or restart later, and by redelivered ``acks_late``
    messages.  It is also a standard ``revoke`` broadcast, so tasks that are
    not ``@cancellable`` are revoked the usual way.

    A `~celery.result.GroupResult` is cancelled as one *group target*,
    however many members it has: one ledger record, one broadcast, one
    entry in each worker's memory.  With ``workflow=True`` each result or id
    stands for the whole workflow it belongs to (chain links, group members,
    chord headers and bodies, nested canvases, tasks not sent yet), named by
    its root id; see :doc:`/workflows`.  Whenever a member of a canvas ends
    cancelled, the parts it would have sent (the rest of its chain, its
    links, its chord's body) are stored REVOKED with the same reason, so
    nothing is left PENDING and ``get()`` raises
    `~celery.exceptions.TaskRevokedError`.

    A task given by id or `~celery.result.AsyncResult` that has finished
    already (SUCCESS, FAILURE or REVOKED in the result backend) is left
    alone: nothing is recorded or sent for it, and the receipt says it had
    finished.  Cancelling twice is therefore harmless.

    A chain's result is the result of its *last* link: ``cancel(chain_result)``
    cancels that task only (the earlier links run, and the last one is
    discarded when it is sent).  Pass ``workflow=True`` to cancel the whole
    chain, or any canvas.

    Bounded: ``cancel()`` returns or raises within the app's
    ``cancellable_cancel_timeout`` (6 s by default) whatever the broker or
    the ledger does, refusing, failing or answering nothing.  It checks the
    broker (one round trip), records the cancellation in the ledger, then
    broadcasts it; each wait for the broker is at most a third of the bound
    (2 s by default), the ledger's at most its own 2 s.  What happens when a
    step is hit is in :doc:`/reliability` ("Time bounds").  The state of each
    task given by id is read from the result backend (in bulk where the
    backend can) while the broker is checked, within the same bound: a task
    not read in time is cancelled as if it were still running.  With
    ``workflow=True``, the climb of each bare id comes before the bound.

    Args:
        task_or_id: A task id, an `~celery.result.AsyncResult`, a
            `~celery.result.GroupResult`, a `~celery.result.ResultSet` (its
            members), or a list of them.
        reason: A message `str`, a `~cancellable.CancelReason`, or None.
            A string becomes a reason with source ``"revoked"``.
        requested_by: Who is cancelling (a user, a service); stored with
            the reason.
        app: The Celery app; defaults to the result's app or the current
            app.  Required in a thread where no app is current (unless you
            called ``app.set_default()``): Celery would otherwise hand over
            its fallback ``amqp://localhost`` app.
        workflow: Cancel the whole workflow each result or id belongs to.
            For a held result the workflow is found from the result tree
            (``.parent`` links); for a bare id, from the result backend and
            from the workers that hold its workflow's tasks.
        grace: Seconds a running ``@cancellable`` task may take to stop at a
            checkpoint before it is interrupted, and later terminated (see
            :doc:`/grace`), at most `~cancellable.celery.MAX_GRACE` (one
            day).  None: the task's ``@cancellable(grace=)``, else the app's
            ``cancellable_grace`` (default: cooperative only).  A later
            ``cancel()`` of a task already on its grace may shorten it (the
            earlier deadline wins), never lengthen it.

    Returns:
        A `CancelReceipt`: the `~cancellable.CancelReason` that was recorded
        and sent (``receipt.reason``), the targets, the tasks it knows, and
        `CancelReceipt.wait`, which waits for the outcome of each (stopped
        at a checkpoint, interrupted, terminated, discarded before it
        started, already finished, finished without observing the
        cancellation, still running, unknown).

    Raises:
        TypeError: ``task_or_id``, ``reason`` or ``grace`` has the wrong type.
        ValueError: An id is empty or longer than 1,024 bytes (UTF-8), the
            reason message is too long, or ``grace`` is negative, NaN,
            infinite or above ``MAX_GRACE``.
        RuntimeError: No ``app`` was given and this thread has no current
            Celery app.
        BrokerUnavailableError: The broker could not be reached, or did not
            answer, in time.  ``maybe_sent`` False: the check failed, nothing
            was recorded or sent.  True: the broadcast failed after the check
            and the ledger has no record either; online workers may or may
            not have received it.  Retrying is safe.

    Warns:
        LedgerUnavailableWarning: The ledger is down or did not answer in
            time; the broadcast was sent but the cancellation is not durable.
        BroadcastFailedWarning: The cancellation was recorded in the ledger
            but its broadcast failed or timed out; workers apply it at their
            next ledger read (``cancellable_poll_interval``).
        NotDurableWarning: The app has no durable ledger at all (once per
            process and app): only online workers receive the cancellation.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.1.0
       ``workflow=True``; a `~celery.result.GroupResult` is one group target.
    .. versionchanged:: 0.1.0
       Returns a `CancelReceipt` (its ``reason`` is what was returned
       before); finished tasks are left alone.
    """
    grace_s = validate_grace(grace)
    install_revoke_recorder()
    plan = _Plan(workflow=bool(workflow))
    _collect(task_or_id, plan)
    if not plan.task_ids and not plan.wide and not plan.bare:
        raise ValueError("cancel() was given no task ids")
    cancel_reason = CancelReason.coerce(reason, default_source="revoked")
    if requested_by is not None:
        cancel_reason = dataclasses.replace(cancel_reason, requested_by=requested_by)
    if app is None:
        app = next((a for a in plan.apps if a is not None), None)
        if app is None:
            from celery import current_app

            app = current_app._get_current_object()
        if celery_internals.is_fallback_app(app):
            raise RuntimeError(
                "cancel() was given no app= and this thread has no current Celery app: "
                "Celery would fall back on its default app (amqp://localhost), not yours. "
                "Pass app=your_app, or call your_app.set_default() once"
            )
    for task_id in dict.fromkeys(plan.bare):
        targets, seen = resolve_id(app.backend, task_id)
        plan.wide.extend(targets)
        plan.seen.update(seen)

    # The bound starts here: the workflow reads above are Celery's own.
    deadline = Deadline(settings_for(app).cancel_timeout)
    # Finished tasks are left alone: cancelling them would record nothing
    # true.  Their states are read while the broker is checked.
    given = list(dict.fromkeys(plan.task_ids))
    wide = [t for t in plan.targets() if t[0] != "task"]
    finished: dict[str, str] = {}
    if given or wide:
        reads = StateReads(app, given)
        finished = cancel_targets(
            app, given, wide, cancel_reason, grace_s, deadline=deadline, states=reads
        )
        if plan.trees:
            _mark_unsent(app, plan.trees, cancel_reason)
    task_ids = [t for t in given if t not in finished]
    known = [*given]
    for tree in plan.trees:
        known.extend(tree_ids(tree, whole=plan.workflow))
    known.extend(plan.bare)
    known.extend(plan.seen)
    return CancelReceipt(
        reason=cancel_reason,
        targets=tuple([("task", t) for t in task_ids] + list(dict.fromkeys(wide))),
        task_ids=tuple(dict.fromkeys(known)),
        finished=tuple(finished.items()),
        workflow=plan.workflow,
        app=app,
        _read_before=frozenset(task_ids),
    )


#: The states of a task that has ended.
READY: Final = states.READY_STATES


class StateReads:
    """The stored states of tasks, read on a daemon thread from the start.

    A result backend that hangs or retries (Celery's Redis backend retries a
    refused connection) costs `cancel` only the budget it waits in
    `finished`.  An id not read in time is cancelled as if it had not
    finished: recording a finished task does it no harm, and
    `CancelReceipt.wait` reports it finished.
    """

    def __init__(self, app: Any, task_ids: list[str]) -> None:
        self._read: dict[str, str] = {}
        #: The worker named by each task read STARTED (``task_track_started``).
        self._hosts: dict[str, str] = {}
        #: Set once the read has returned (at once when there is nothing to read).
        self._done = threading.Event()
        if task_ids:
            # This thread's backend first: its module's imports (redis-py's
            # among them) complete here, before the read's thread and the
            # broker connection import anything.  redis-py 8 imported on two
            # threads at once raised a _DeadlockError in one of them (its
            # modules import each other) and that cancel() failed.
            with contextlib.suppress(Exception):
                _ = app.backend
            # A helper thread of this process's (`_ledger.LedgerCalls.start`).
            self._done = runtime().ledger_calls.start(lambda: self._reads(app, task_ids))
        else:
            self._done.set()

    def _reads(self, app: Any, task_ids: list[str]) -> None:
        try:
            celery_internals.stored_states(app.backend, task_ids, self._read, self._hosts)
        except Exception:  # noqa: BLE001 - no backend, or it failed: cancel them anyway
            pass
        finally:
            with contextlib.suppress(Exception):
                celery_internals.close_thread_connections(app.backend)

    def finished(self, budget: float) -> dict[str, str]:
        """The tasks read as finished (READY states) within ``budget`` more seconds."""
        self._done.wait(max(budget, 0.0))
        return {t: s for t, s in dict(self._read).items() if s in READY}

    def hosts(self, task_ids: list[str]) -> list[str] | None:
        """The workers running ``task_ids`` as read (once read), or None unless all are known."""
        if not self._done.is_set():
            return None
        hosts = dict(self._hosts)
        if not task_ids or any(task_id not in hosts for task_id in task_ids):
            return None
        return [hosts[task_id] for task_id in task_ids]


def cancel_targets(
    app: Any,
    task_ids: list[str],
    wide: list[_ledger.Target],
    reason: CancelReason,
    grace: float | None = None,
    *,
    deadline: Deadline | None = None,
    states: StateReads | None = None,
) -> dict[str, str]:
    """Check the broker, record targets in the ledger, then broadcast them in one revoke.

    ``task_ids`` travel as Celery's own ``task_id`` argument; group and root
    targets under ``cancellable_targets`` and the grace under
    ``cancellable_grace``, which only this library's interceptor reads.
    Every step waits only until ``deadline`` (default: the app's
    ``cancellable_cancel_timeout`` from now); see `cancel` for what each
    failure raises or warns.  With ``states``, the tasks it reads as
    finished once the broker has answered (waiting at most one broker
    wait) are left out and returned; nothing is recorded or sent when
    nothing is left.
    """
    targets: list[_ledger.Target] = [("task", task_id) for task_id in task_ids]
    targets.extend(wide)
    _ledger.check_targets(targets)
    if deadline is None:
        deadline = Deadline(settings_for(app).cancel_timeout)
    broadcasts = runtime().broadcasts
    try:
        conn = broadcasts.acquire(app, deadline)
    except Exception as exc:
        raise _unavailable(app, exc, deadline, "no broker connection") from exc
    broken = True
    try:
        try:
            broadcasts.check(conn, deadline)
        except Exception as exc:
            raise _unavailable(app, exc, deadline, "the broker did not answer") from exc
        finished: dict[str, str] = {}
        if states is not None:
            finished = states.finished(min(wait_for(deadline.seconds), deadline.left()))
            task_ids = [task_id for task_id in task_ids if task_id not in finished]
            targets = [("task", task_id) for task_id in task_ids]
            targets.extend(wide)
            if not targets:
                broken = False
                return finished
        recorded = _record(app, targets, task_ids, reason, grace, deadline)
        _warn_not_durable(app)
        # Running tasks whose workers are known: revoke on those workers only
        # (their own queues, `_direct`), when the ledger has it (the others
        # learn it from there).
        destination = _running_on(app, task_ids, wide, deadline, states) if recorded else None
        arguments: dict[str, Any] = {
            "task_id": task_ids,
            "terminate": False,
            "signal": "SIGTERM",
            "cancellable": reason.to_dict(),
            "cancellable_grace": grace,
        }
        if wide:
            arguments["cancellable_targets"] = [list(target) for target in wide]
        try:
            if deadline.left() <= 0:
                raise TimeoutError(f"no time left of cancellable_cancel_timeout={deadline.seconds}")
            if destination and _direct.supported(conn):
                # To those workers' own queues: the others never see it.
                _direct.publish(app, conn, destination, arguments, deadline)
            else:
                broadcasts.publish(app, conn, arguments, destination)
        except Exception as exc:  # noqa: BLE001 - said by a warning or an error
            _broadcast_failed(app, exc, deadline, targets, task_ids, recorded)
        else:
            broken = False
    finally:
        broadcasts.release(conn, broken=broken)
    return finished


#: The most task ids a `cancel` looks up to address their workers directly.
DIRECT_MAX: Final = 16


def _running_on(
    app: Any,
    task_ids: list[str],
    wide: list[_ledger.Target],
    deadline: Deadline,
    states: StateReads | None = None,
) -> list[str] | None:
    """The workers running ``task_ids``, if all are known; None: broadcast to everyone.

    Known only for tasks whose STARTED state names their worker
    (``task_track_started``) in a Redis result backend: as ``states`` read
    them at the start of the call (no round trip more), else read now in one
    bounded round trip.  A queued, reserved or unknown task, a group or root
    target, more than `DIRECT_MAX` ids, or any failure: None.  A running
    task is held by one worker; one that is redelivered or retried elsewhere
    meanwhile is stopped there from the ledger (every poll interval, and at
    receipt once read).
    """
    if wide or not task_ids or len(task_ids) > DIRECT_MAX:
        return None
    if not app.conf.task_track_started or not settings_for(app).direct_running:
        return None
    read = None if states is None else states.hosts(task_ids)
    if read is not None:
        return sorted(set(read))
    wait = min(wait_for(settings_for(app).cancel_timeout), deadline.left())
    if wait <= 0:
        return None
    try:
        hosts = celery_internals.started_hostnames(app.backend, task_ids, wait)
    except Exception:  # noqa: BLE001 - the broadcast reaches them anyway
        return None
    return None if hosts is None else sorted(set(hosts))


def _unavailable(
    app: Any, exc: BaseException, deadline: Deadline, what: str, *, maybe_sent: bool = False
) -> BrokerUnavailableError:
    done = (
        "not recorded durably; online workers may or may not receive it"
        if maybe_sent
        else "nothing was cancelled"
    )
    return BrokerUnavailableError(
        f"cannot reach the broker at {_broker_uri(app)} ({what} after "
        f"{deadline.elapsed():.1f} s: {exc!r}); {done}",
        maybe_sent=maybe_sent,
    )


def _broker_uri(app: Any) -> str:
    try:
        return str(app.connection_for_write().as_uri())
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def _record(
    app: Any,
    targets: list[_ledger.Target],
    task_ids: list[str],
    reason: CancelReason,
    grace: float | None,
    deadline: Deadline,
) -> bool:
    """Record the cancellation in the ledger; True if it is durable now, else warn.

    The write runs on a thread of its own (`~cancellable.celery._ledger.LedgerCalls`)
    and is waited for until the deadline less the broadcast's share, whatever
    the store does (a frozen PostgreSQL server answers nothing, and psycopg
    never gives up on a reply).
    """
    try:
        ledger = runtime().ledgers.get(app)
        wait = deadline.left() - wait_for(deadline.seconds)
        if wait <= 0:
            raise _ledger.LedgerError(
                f"no time left of cancellable_cancel_timeout={deadline.seconds}"
            )
        runtime().ledger_calls.run(lambda: ledger.record(targets, reason, grace), wait)
    except _ledger.LedgerError as exc:
        logger.warning(LEDGER_UNAVAILABLE, error=str(exc), task_ids=task_ids[:20])
        warnings.warn(
            f"cancellation of {len(targets)} target(s) not recorded durably: {exc}",
            LedgerUnavailableWarning,
            stacklevel=4,
        )
        return False
    return bool(getattr(ledger, "durable", False))


def _warn_not_durable(app: Any) -> None:
    """`NotDurableWarning`, once per process and app, when ``app`` has no durable ledger."""
    try:
        why = runtime().ledgers.not_durable_once(app)
    except (SettingError, ValueError):
        return  # a bad setting: `_record` has said so
    if why is not None:
        warnings.warn(why, NotDurableWarning, stacklevel=4)


def _broadcast_failed(
    app: Any,
    exc: BaseException,
    deadline: Deadline,
    targets: list[_ledger.Target],
    task_ids: list[str],
    recorded: bool,
) -> None:
    """Say what a failed broadcast leaves: warn if the ledger has it, else raise."""
    if not recorded:
        raise _unavailable(app, exc, deadline, "the broadcast failed", maybe_sent=True) from exc
    logger.warning(
        CANCEL_BROADCAST_FAILED, error=repr(exc), task_ids=task_ids[:20], targets=len(targets)
    )
    warnings.warn(
        f"cancellation of {len(targets)} target(s) recorded durably but not broadcast "
        f"({exc!r}): workers apply it at their next ledger read "
        "(every cancellable_poll_interval seconds)",
        BroadcastFailedWarning,
        stacklevel=4,
    )


def _mark_unsent(app: Any, trees: list[Any], reason: CancelReason) -> None:
    # Best effort: a worker marks these too when the member before them
    # ends cancelled; the client does it at once for the ones it holds.
    try:
        ids: list[str] = []
        for tree in trees:
            ids.extend(unsent_ids(tree))
        if ids:
            error = TaskRevokedError(reason.describe())
            for task_id in dict.fromkeys(ids):
                app.backend.store_result(task_id, error, states.REVOKED)
    except Exception as exc:  # noqa: BLE001 - the cancellation itself is done
        logger.warning(TASK_RESULT_NOT_STORED, error=repr(exc), task_ids=ids[:20])


def _check_broker(conn: Any, app: Any) -> None:
    """The broker check of `cancel` on ``conn`` (kept for the benchmarks' step timings)."""
    runtime().broadcasts.check(conn, Deadline(settings_for(app).cancel_timeout))


#: Seconds a patched ``Control.revoke`` waits for its ledger record (after
#: Celery's broadcast), whatever the store does; then it logs
#: ``ledger.unavailable`` and returns (the write may complete later).
REVOKE_RECORD_WAIT: Final = 2 * _ledger.TIMEOUT


class _Installed:
    """Whether this process has installed the revoke recorder (set under ``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False


_recorder: Final = _Installed()


def install_revoke_recorder() -> None:
    """Make Celery's own ``Control.revoke`` durable too (idempotent).

    ``AsyncResult.revoke()``, ``GroupResult.revoke()`` and
    ``app.control.revoke()`` all end in ``Control.revoke``.  Once a process
    has called `cancel` (or runs a worker), a revoke it sends to every worker
    (no ``destination``, no ``terminate``) is also recorded in the ledger
    after Celery's broadcast, as ``cancel()`` records its own: so a plain
    revoke sent while no worker is online is not lost either.  A failure to
    record is logged (``ledger.unavailable``) and never fails Celery's call.
    """
    with _recorder.lock:
        if _recorder.done:
            return
        _recorder.done = True
        celery_internals.wrap_control_revoke(_recording_revoke)


def _recording_revoke(original: Callable[..., Any]) -> Callable[..., Any]:
    def revoke(
        self: Any,
        task_id: Any,
        destination: Any = None,
        terminate: bool = False,
        signal: Any = "SIGTERM",
        **kwargs: Any,
    ) -> Any:
        result = original(
            self, task_id, destination=destination, terminate=terminate, signal=signal, **kwargs
        )
        if destination is None and not terminate:
            ids = celery_internals.task_ids(task_id)
            targets: list[_ledger.Target] = [("task", t) for t in ids]
            try:
                # Under the key the workers it reaches use: one record in all.
                ledger = runtime().ledgers.get(self.app)
                runtime().ledger_calls.run(
                    lambda: _ledger.record_once(
                        ledger, targets, CancelReason(source="revoked"), _ledger.revoke_key(targets)
                    ),
                    REVOKE_RECORD_WAIT,
                )
            except (_ledger.LedgerError, SettingError) as exc:
                logger.warning(LEDGER_UNAVAILABLE, error=str(exc), task_ids=ids[:20])
        return result

    return revoke


class _Unchanged:
    """The default of `configure`'s options: leave the setting as it is."""

    def __repr__(self) -> str:
        return "UNCHANGED"


#: `configure`'s default for every option: the setting is left as it is.
UNCHANGED: Final[Any] = _Unchanged()


def configure(
    app: Any,
    *,
    ledger_url: str | None = UNCHANGED,
    ledger_ttl: float = UNCHANGED,
    cancel_timeout: float = UNCHANGED,
    poll_interval: float = UNCHANGED,
    grace: float | None = UNCHANGED,
    kill_after: float | None = UNCHANGED,
    kill_process_group: bool = UNCHANGED,
    cancel_siblings_on_failure: bool = UNCHANGED,
    wakeup_signal: int | str | None = UNCHANGED,
    direct_running: bool = UNCHANGED,
    shutdown_grace: float | None = UNCHANGED,
    cancel_on_connection_loss: bool = UNCHANGED,
) -> Settings:
    """Set `cancellable`'s settings on a Celery app, checked now (all optional).

    Each option is the app setting ``cancellable_<option>`` (see
    :doc:`/settings` for what each means and accepts); the same can be set in
    the app's configuration directly.  The new values are validated together
    with the app's other ``cancellable_*`` settings, by the rules a worker
    applies when it starts, and stored only if all are valid.  Call it where
    you create the app, before a worker starts or the first `cancel`: both
    read the settings once per app.

    Args:
        app: The Celery app.
        ledger_url: ``cancellable_ledger_url``: ``redis://...``,
            ``file:///path``, ``"none"``, or None (the app's Redis or
            filesystem result backend, else its Redis broker).
        ledger_ttl: ``cancellable_ledger_ttl``: seconds a cancellation is
            remembered (default one week).
        cancel_timeout: ``cancellable_cancel_timeout``: the longest
            `cancel` waits for the broker and the ledger together (default
            6 s; see :doc:`/reliability`).
        poll_interval: ``cancellable_poll_interval``: seconds between a
            worker's reads of the ledger (default 2).
        grace: ``cancellable_grace``: seconds before a cancelled task is
            interrupted, at most `MAX_GRACE` (one day); None: cooperative
            only, the default.
        kill_after: ``cancellable_kill_after``: seconds from the interrupt to
            the terminate step (None: never terminate; default 10).
        kill_process_group: ``cancellable_kill_process_group``.
        cancel_siblings_on_failure: ``cancellable_cancel_siblings_on_failure``.
        wakeup_signal: ``cancellable_wakeup_signal``: the signal that wakes
            prefork children: ``SIGURG`` (the default) or ``SIGWINCH``, the
            signals whose default action is to ignore them (a child signalled
            before it installed the handler must not die).
        direct_running: ``cancellable_direct_running``.
        shutdown_grace: ``cancellable_shutdown_grace``: at a warm shutdown,
            running ``@cancellable`` tasks are cancelled with this grace and
            sent back to the broker (None: Celery's behaviour, the default;
            see :doc:`/shutdown`).
        cancel_on_connection_loss: ``cancellable_cancel_on_connection_loss``:
            stop the ``acks_late`` tasks an AMQP broker will redeliver when
            the worker's connection is lost (default True).

    Returns:
        The app's settings as a worker will read them.

    Raises:
        SettingError: A value is invalid (or another ``cancellable_*``
            setting of the app is); the message names each one.  Nothing
            is stored then.

    .. versionadded:: 0.1.0
    """
    given = {
        "ledger_url": ledger_url,
        "ledger_ttl": ledger_ttl,
        "cancel_timeout": cancel_timeout,
        "poll_interval": poll_interval,
        "grace": grace,
        "kill_after": kill_after,
        "kill_process_group": kill_process_group,
        "cancel_siblings_on_failure": cancel_siblings_on_failure,
        "wakeup_signal": wakeup_signal,
        "direct_running": direct_running,
        "shutdown_grace": shutdown_grace,
        "cancel_on_connection_loss": cancel_on_connection_loss,
    }
    updates = {PREFIX + name: value for name, value in given.items() if value is not UNCHANGED}
    settings = Settings.from_conf(
        collections.ChainMap(updates, app.conf), namespace=getattr(app, "namespace", None)
    )
    app.conf.update(updates)
    # What this process read before is stale now: the next read (a cancel(),
    # a worker built later) sees the new values.  A running worker keeps the
    # settings it started with.
    forget_settings(app)
    runtime().ledgers.forget(app)
    runtime().broadcasts.forget(app)
    return settings
