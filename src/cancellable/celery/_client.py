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

from .._config import validate_seconds
from .._exceptions import CancelReason
from .._log import logger
from ..events import LEDGER_UNAVAILABLE, TASK_RESULT_NOT_STORED
from . import _celery_internals as celery_internals
from . import _ledger
from ._runtime import runtime
from ._settings import PREFIX, SettingError, Settings, forget_settings
from ._workflow import is_group_result, resolve_id, tree_targets, unsent_ids, workflow_of

__all__ = [
    "BrokerUnavailableError",
    "LedgerUnavailableWarning",
    "cancel",
    "cancel_targets",
    "configure",
    "install_revoke_recorder",
]


class BrokerUnavailableError(ConnectionError):
    """`cancel` could not reach the broker; nothing was recorded or sent.

    .. versionadded:: 0.1.0
    """


class LedgerUnavailableWarning(UserWarning):
    """The cancellation was broadcast but could not be recorded durably.

    Online workers still stop the task; a worker that was offline or restarts
    before it receives the task may run it.

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
) -> CancelReason:
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

    Args:
        task_or_id: A task id, an `~celery.result.AsyncResult`, a
            `~celery.result.GroupResult`, or a list of them.
        reason: A message `str`, a `~cancellable.CancelReason`, or None.
            A string becomes a reason with source ``"revoked"``.
        requested_by: Who is cancelling (a user, a service); stored with
            the reason.
        app: The Celery app; defaults to the result's app or the current app.
        workflow: Cancel the whole workflow each result or id belongs to.
            For a held result the workflow is found from the result tree
            (``.parent`` links); for a bare id, from the result backend and
            from the workers that hold its workflow's tasks.
        grace: Seconds a running ``@cancellable`` task may take to stop at a
            checkpoint before it is interrupted, and later terminated (see
            :doc:`/grace`).  None: the task's ``@cancellable(grace=)``, else
            the app's ``cancellable_grace`` (default: cooperative only).

    Returns:
        The `~cancellable.CancelReason` that was recorded and sent.

    Raises:
        TypeError: ``task_or_id``, ``reason`` or ``grace`` has the wrong type.
        ValueError: An id is empty or longer than 1,024 bytes (UTF-8),
            the reason message is too long, or
            ``grace`` is negative, NaN or infinite.
        BrokerUnavailableError: The broker cannot be reached; nothing was
            recorded or sent.

    Warns:
        LedgerUnavailableWarning: The ledger is down; the broadcast was sent
            but the cancellation is not durable.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.1.0
       ``workflow=True``; a `~celery.result.GroupResult` is one group target.
    """
    grace_s = validate_seconds(grace, "grace")
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
    for task_id in dict.fromkeys(plan.bare):
        targets, seen = resolve_id(app.backend, task_id)
        plan.wide.extend(targets)
        plan.seen.update(seen)

    task_ids = list(dict.fromkeys(plan.task_ids))
    wide = [t for t in plan.targets() if t[0] != "task"]
    cancel_targets(app, task_ids, wide, cancel_reason, grace_s)
    if plan.trees:
        _mark_unsent(app, plan.trees, cancel_reason)
    return cancel_reason


def cancel_targets(
    app: Any,
    task_ids: list[str],
    wide: list[_ledger.Target],
    reason: CancelReason,
    grace: float | None = None,
) -> None:
    """Record targets in the ledger, then broadcast them in one revoke.

    ``task_ids`` travel as Celery's own ``task_id`` argument; group and root
    targets under ``cancellable_targets`` and the grace under
    ``cancellable_grace``, which only this library's interceptor reads.
    """
    targets: list[_ledger.Target] = [("task", task_id) for task_id in task_ids]
    targets.extend(wide)
    _ledger.check_targets(targets)
    # A pooled connection: repeated cancels reuse one open connection.
    with app.pool.acquire(block=True) as conn:
        _check_broker(conn, app)
        try:
            runtime().ledgers.get(app).record(targets, reason, grace)
        except _ledger.LedgerError as exc:
            logger.warning(LEDGER_UNAVAILABLE, error=str(exc), task_ids=task_ids[:20])
            warnings.warn(
                f"cancellation of {len(targets)} target(s) sent to online workers but not "
                f"recorded durably: {exc}",
                LedgerUnavailableWarning,
                stacklevel=3,
            )
        arguments: dict[str, Any] = {
            "task_id": task_ids,
            "terminate": False,
            "signal": "SIGTERM",
            "cancellable": reason.to_dict(),
            "cancellable_grace": grace,
        }
        if wide:
            arguments["cancellable_targets"] = [list(target) for target in wide]
        app.control.broadcast("revoke", arguments=arguments, connection=conn)


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


#: Seconds `cancel` waits for the broker before it gives up.
BROKER_CHECK_TIMEOUT = 2.0


def _check_broker(conn: Any, app: Any) -> None:
    """Raise `BrokerUnavailableError` unless the broker answers within about 2 s.

    ``ensure_connection`` alone is not enough: on a pooled connection it
    returns at once (kombu's Redis transport always says it is connected),
    and the broadcast would then block in kombu's retry loop until the
    broker comes back.  So we also make the transport do a round trip: a
    ``PING`` for Redis, opening a channel for the others.
    """
    try:
        conn.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0.2, timeout=BROKER_CHECK_TIMEOUT
        )
        client = celery_internals.redis_broker_client(conn)
        if client is not None:
            celery_internals.ping_redis_once(client, BROKER_CHECK_TIMEOUT)
    except Exception as exc:
        with contextlib.suppress(Exception):
            conn.collect()  # do not give the broken connection back to the pool
        raise BrokerUnavailableError(
            f"cannot reach the broker at {conn.as_uri()}: {exc}; nothing was cancelled"
        ) from exc


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
                _ledger.record_once(
                    runtime().ledgers.get(self.app),
                    targets,
                    CancelReason(source="revoked"),
                    _ledger.revoke_key(targets),
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
    poll_interval: float = UNCHANGED,
    grace: float | None = UNCHANGED,
    kill_after: float | None = UNCHANGED,
    kill_process_group: bool = UNCHANGED,
    cancel_siblings_on_failure: bool = UNCHANGED,
    wakeup_signal: int | str | None = UNCHANGED,
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
        poll_interval: ``cancellable_poll_interval``: seconds between a
            worker's reads of the ledger (default 2).
        grace: ``cancellable_grace``: seconds before a cancelled task is
            interrupted (None: cooperative only, the default).
        kill_after: ``cancellable_kill_after``: seconds from the interrupt to
            the terminate step (None: never terminate; default 10).
        kill_process_group: ``cancellable_kill_process_group``.
        cancel_siblings_on_failure: ``cancellable_cancel_siblings_on_failure``.
        wakeup_signal: ``cancellable_wakeup_signal``: the signal that wakes
            prefork children (default ``SIGURG``); signals billiard uses in
            pool children are refused.

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
        "poll_interval": poll_interval,
        "grace": grace,
        "kill_after": kill_after,
        "kill_process_group": kill_process_group,
        "cancel_siblings_on_failure": cancel_siblings_on_failure,
        "wakeup_signal": wakeup_signal,
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
    return settings
