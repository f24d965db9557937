"""A worker receiving cancellations: revoke commands, and Celery's check before the pool.

Installed by `cancellable.celery._activation` when a worker starts; each
piece acts only while a worker runs in this process (its
`~cancellable.celery._runtime.WorkerRuntime` is active, for the app
concerned) and otherwise leaves Celery's own behaviour untouched.

* **The revoke command.**  Celery dispatches remote-control commands from
  the ``Panel.data`` registry; we wrap its ``revoke`` entry
  (`revoke_command`).  A plain revoke (``AsyncResult.revoke``,
  ``app.control.revoke``, ``GroupResult.revoke``, ``celery control
  revoke``, Flower) runs Celery's own handler first, then is queued for the
  ledger (`~cancellable.celery._runtime.PendingWrites`: the poller's ledger
  thread writes it, once for all the workers it reached, see
  `~cancellable.celery._ledger.revoke_key`), goes into the index and is
  delivered to the tasks this worker holds.  The consumer thread never
  waits on the ledger's server.  A
  revoke sent by `cancellable.celery.cancel` carries its reason under the
  extra argument ``cancellable``; it was recorded in the ledger already,
  and we handle it without Celery's handler, which would write a bare
  "revoked" state per id (two backend round trips each, and a wrong
  reason) and trusts a bounded in-memory set.  ``terminate=True`` is left
  entirely to Celery.
* **Before the pool.**  Celery asks ``Request.revoked()`` before it hands
  any task to the pool (on receipt, when an ETA or rate limit expires,
  after a redelivery).  We extend that check with the local index
  (`request_revoked`), so a task is discarded whenever one of its targets
  is live, whatever the size of Celery's revoked set; and Celery's discard
  stores the recorded reason instead of a bare "revoked"
  (`announce_revoked`).
* **Tasks waiting for their ETA.**  Celery holds a task with an ETA or a
  countdown in its consumer's timer and consults its revoked set only when
  the ETA comes; a ``cancel()`` revoke ends the ones it names at once
  (`discard_scheduled`): REVOKED with the reason, message acknowledged.
* **Workflows.**  ``cancel()`` can also send ``group`` and ``root`` targets
  (under the extra argument ``cancellable_targets``); they are indexed and
  delivered to every held task they match.  A ``root`` target also matches
  a task that would send its id later (`cancellable.celery._workflow`);
  when one does, the worker records the task's real root id as well
  (`promote_workflow`), so the rest of that workflow matches by root id
  everywhere.  A task discarded for a cancellation we know stores its
  reason, does not report to its chord, and its unsent parts (rest of the
  chain, links, chord body) are stored REVOKED.  The read-only control
  command ``cancellable_members`` lists the held tasks some targets name
  (for ``celery cancel --workflow``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from .._exceptions import CancelReason
from .._log import logger
from ..events import CANCEL_DELIVERY_FAILED, TASK_EVENT_NOT_SENT, TASK_RESULT_NOT_STORED
from . import _celery_internals as celery_internals
from . import _ending, _ledger, _workflow
from ._index import TargetIndex, request_targets
from ._ladder import NOT_CANCELLABLE
from ._ledger import Target
from ._runtime import WorkerRuntime, runtime
from ._wire import reason_from_wire

__all__ = [
    "MEMBERS_COMMAND",
    "announce_revoked",
    "cancel_message",
    "deliver_targets",
    "discard_scheduled",
    "members_command",
    "promote_workflow",
    "request_revoked",
    "revoke_command",
    "targets_from",
]

#: The remote-control command that lists the held tasks some targets name.
MEMBERS_COMMAND: Final = "cancellable_members"


def _reason_from(payload: Any) -> CancelReason | None:
    """The reason `cancel()` sent along with a revoke, or None (plain revoke).

    Whatever another version sent, a payload makes a reason
    (`cancellable.celery._wire`): an odd reason never turns a cancellation
    into a plain revoke, which would drop its group and root targets.
    """
    return None if payload is None else reason_from_wire(payload)


def _grace_from(payload: Any) -> float | None:
    """The grace `cancel()` sent along with a revoke (None: not given, or invalid)."""
    # The same rule as cancel()'s own check: a finite number >= 0.
    number = isinstance(payload, (int, float)) and not isinstance(payload, bool)
    if number and math.isfinite(payload) and payload >= 0:
        return float(payload)
    return None


def targets_from(payload: Any) -> list[Target]:
    """The group and root targets `cancel()` sent along with a revoke (bad ones dropped)."""
    targets: list[Target] = []
    for item in payload if isinstance(payload, (list, tuple)) else ():
        # [kind, id]; a later version may add fields after them.
        if isinstance(item, (list, tuple)) and len(item) >= 2:
            try:
                targets.extend(_ledger.check_targets([(item[0], item[1])]))
            except ValueError:
                continue
    return targets


def _held(rt: WorkerRuntime, task_id: str) -> Any:
    """The request (or running-task entry) of a task this worker holds, or None."""
    return celery_internals.worker_requests().get(task_id) or rt.tasks.running.get(task_id)


def deliver_targets(
    rt: WorkerRuntime,
    targets: Iterable[Target],
    grace: float | None = None,
    graces: dict[str, float] | None = None,
) -> int:
    """Deliver newly indexed targets to the tasks this worker holds; return how many.

    Each task reached is also put on the worker's cancellation ladder, with
    ``grace`` if given (a broadcast), or its own entry of ``graces`` (ledger
    entries, by task id).
    """
    task_ids: list[str] = []
    wide = False
    for kind, target_id in targets:
        if kind == "task":
            task_ids.append(target_id)
        else:
            wide = True
    if wide:
        # A group or root target can name any held task: look at all of them.
        held = list(dict(celery_internals.worker_requests())) + list(rt.tasks.running.ids())
        task_ids = list(dict.fromkeys([*task_ids, *held]))
    delivered = 0
    promoted: list[Target] = []
    for task_id in task_ids:
        # One id failing must not keep the others from their cancellation.
        try:
            delivered += _deliver_one(rt, task_id, grace, graces, promoted)
        except Exception as exc:  # noqa: BLE001 - logged once per cause
            rt.failures.report(CANCEL_DELIVERY_FAILED, "deliver", exc, task_id=task_id)
    if promoted:
        delivered += deliver_targets(rt, promoted, grace, graces)
    return delivered


def _deliver_one(
    rt: WorkerRuntime,
    task_id: str,
    grace: float | None,
    graces: dict[str, float] | None,
    promoted: list[Target],
) -> int:
    request = _held(rt, task_id)
    if request is None:
        return 0
    delivered = 0
    reason = rt.index.match_request(request)
    if reason is None:
        reason = rt.index.match(task_id)
    if reason is not None and rt.delivery.deliver(task_id, reason) != "none":
        delivered = 1
        # The registered name (``type``), not a shadow name: the ladder
        # looks the task's own grace up in the registry by it.
        name = getattr(request, "type", None) or getattr(request, "task_name", None)
        given = grace if graces is None else graces.get(task_id, grace)
        rt.ladder.start(task_id, reason, name, given)
    if reason is not None:
        promoted.extend(promote_workflow(rt, request, reason))
    return delivered


def promote_workflow(rt: WorkerRuntime, request: Any, reason: CancelReason) -> list[Target]:
    """Cancel a request's whole workflow when a root target names it by a member's id.

    ``cancel(id, workflow=True)`` records ``("root", id)``.  A request that
    matches it through its own id or a task it would send later (not
    through its root id) tells us the workflow's real root id: we index it,
    queue it for the ledger, and return the new target so the caller
    delivers it.  Its other members (the siblings of a group sent by a link
    that finished) then match by their root id, here and on every other
    worker.  Returns ``[]`` when there is nothing new.
    """
    _task_id, _group_id, root_id = request_targets(request)
    if not root_id or rt.index.has("root", root_id):
        return []
    if rt.index.match_workflow(request) is None:
        return []
    added = rt.index.add([("root", root_id)], reason)
    # Written by the poller's ledger thread: no network I/O here (the
    # consumer thread, or the poller under the lock a fork takes).
    rt.writes.put(added, reason)
    return added


def _on_revoke(
    rt: WorkerRuntime,
    task_ids: list[str],
    reason: CancelReason,
    from_cancel: bool,
    grace: float | None = None,
    wide: Iterable[Target] = (),
) -> None:
    targets: list[Target] = [("task", task_id) for task_id in task_ids]
    targets.extend(wide)
    if not from_cancel:
        # A plain revoke: make it durable too (cancel() wrote the ledger
        # itself).  Queued first, so nothing below can skip it; written once
        # for every worker it reached (and the caller), under its key.
        rt.writes.put(targets, reason, _ledger.revoke_key(targets))
    rt.index.add(targets, reason)
    # Deliver every id this worker holds, even one indexed before: a second
    # revoke of a running task must not be a no-op if the first was missed.
    deliver_targets(rt, targets, grace)


def _active_worker(app: Any) -> WorkerRuntime | None:
    """The worker running in this process for ``app`` (None: Celery is on its own)."""
    worker = runtime().worker
    return worker if worker is not None and worker.serves(app) else None


def revoke_command(original: Callable[..., Any]) -> Callable[..., Any]:
    """The ``revoke`` remote-control command, around Celery's ``original``."""

    def revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> Any:
        rt = _active_worker(getattr(state, "app", None))
        if rt is None:
            return original(state, task_id, terminate=terminate, signal=signal, **kwargs)
        began = time.monotonic()
        given = _reason_from(kwargs.get("cancellable"))
        task_ids = celery_internals.task_ids(task_id)
        running = () if terminate or given is not None else _running_here(rt, task_ids)
        ours = time.monotonic() - began  # the library's own time, Celery's handler apart
        if running:
            # A plain revoke of @cancellable tasks running here: they stop at
            # their next checkpoint and store REVOKED with their cleanup done.
            # Celery 5.6 would store REVOKED for them at once (5.7 skips
            # running tasks itself): give its handler only the others.
            for running_id in running:
                celery_internals.add_revoked_id(running_id)
            rest = [other for other in task_ids if other not in running]
            if rest:
                original(state, rest, terminate=terminate, signal=signal, **kwargs)
            result = {"ok": f"tasks {', '.join(task_ids)} flagged as revoked"}
        elif terminate or given is None:
            result = original(state, task_id, terminate=terminate, signal=signal, **kwargs)
        else:
            # The reply shape of Celery's own handler (``ok(...)``), for any
            # caller that asks for replies.
            result = {"ok": f"tasks {', '.join(task_ids)} flagged as revoked"}
        if not terminate:
            began = time.monotonic()
            try:
                _on_revoke(
                    rt,
                    task_ids,
                    given or CancelReason(source="revoked"),
                    given is not None,
                    _grace_from(kwargs.get("cancellable_grace")),
                    targets_from(kwargs.get("cancellable_targets")) if given else (),
                )
            except Exception as exc:  # noqa: BLE001 - never break Celery's control loop
                logger.error(
                    CANCEL_DELIVERY_FAILED, task_ids=task_ids[:20], error=repr(exc), exc_info=exc
                )
            ours += time.monotonic() - began
        rt.timings.consumer = max(rt.timings.consumer, ours)
        if given is not None and not terminate:
            try:
                discard_scheduled(rt, celery_internals.consumer_of(state))
            except Exception as exc:  # noqa: BLE001 - never break Celery's control loop
                logger.error(
                    CANCEL_DELIVERY_FAILED, task_ids=task_ids[:20], error=repr(exc), exc_info=exc
                )
        return result

    return revoke


def cancel_message(rt: WorkerRuntime, arguments: Any, consumer: Any) -> bool:
    """A `cancel()` sent to this worker alone (`cancellable.celery._direct`); False if ignored.

    ``arguments`` are those of the revoke broadcast `cancel()` would send
    (``task_id``, ``cancellable``, ``cancellable_grace``,
    ``cancellable_targets``), handled as the ``revoke`` command handles a
    `cancel()` revoke: indexed, delivered to the tasks this worker holds,
    and tasks held for their ETA discarded.  Something that is not a
    `cancel()` revoke (no reason) is ignored: a plain revoke is always
    broadcast.  Never raises (the consumer's event loop runs it).
    """
    if not isinstance(arguments, dict):
        return False
    given = _reason_from(arguments.get("cancellable"))
    if given is None:
        return False
    began = time.monotonic()
    task_ids = celery_internals.task_ids(arguments.get("task_id") or [])
    try:
        _on_revoke(
            rt,
            task_ids,
            given,
            True,
            _grace_from(arguments.get("cancellable_grace")),
            targets_from(arguments.get("cancellable_targets")),
        )
        rt.timings.consumer = max(rt.timings.consumer, time.monotonic() - began)
        discard_scheduled(rt, consumer)
    except Exception as exc:  # noqa: BLE001 - never break the consumer's event loop
        logger.error(CANCEL_DELIVERY_FAILED, task_ids=task_ids[:20], error=repr(exc), exc_info=exc)
    return True


def discard_scheduled(rt: WorkerRuntime, consumer: Any) -> int:
    """End now the tasks held for their ETA or countdown that a live cancellation names.

    Celery keeps a task with an ETA (or countdown) in its consumer's timer
    and checks its revoked set only when the ETA comes, so a cancelled one
    would stay PENDING, its message unacknowledged, until then.  Each such
    request the index matches is discarded at once, through Celery's own
    discard (REVOKED with the recorded reason, the message acknowledged,
    its timer entry cancelled).  Called by the revoke command of a
    `~cancellable.celery.cancel` (the consumer's thread, which also fires the
    timer of the event-loop pools); returns how many.  A cancellation that
    reaches the worker only through the ledger poll (a missed broadcast)
    leaves the task to be discarded when its ETA comes, as before.
    """
    if consumer is None:
        return 0
    discarded = 0
    for entry, request in celery_internals.scheduled_requests(consumer):
        if rt.index.match_request(request) is None:
            continue
        if celery_internals.discard_scheduled(consumer, entry, request):
            discarded += 1
    return discarded


def _running_here(rt: WorkerRuntime, task_ids: list[str]) -> set[str]:
    """The ids among ``task_ids`` of ``@cancellable`` tasks this worker runs now."""
    active = celery_internals.active_request_ids()
    if not active:
        return set()
    requests = celery_internals.worker_requests()
    running: set[str] = set()
    for task_id in task_ids:
        if task_id not in active:
            continue
        request = requests.get(task_id)
        name = getattr(request, "type", None) or getattr(request, "task_name", None)
        if rt.ladder.task_grace(name) != NOT_CANCELLABLE:
            running.add(task_id)
    return running


def request_revoked(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``Request.revoked`` extended with the worker's index (see the module docstring)."""

    def revoked(self: Any) -> bool:
        rt = _active_worker(getattr(self, "app", None))
        if (
            rt is not None
            and not celery_internals.request_already_revoked(self)
            and not celery_internals.is_revoked_id(self.id)
        ):
            reason = rt.index.match_request(self)
            if reason is not None:
                # Celery discards what its revoked set names; the index says so.
                celery_internals.add_revoked_id(self.id)
                _promote_quietly(rt, self, reason)
        return bool(original(self))

    return revoked


def announce_revoked(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Request._announce_revoked`` storing the recorded reason (see the module docstring)."""

    def announce(self: Any, reason: str, terminated: bool, signum: Any, expired: bool) -> Any:
        rt = _active_worker(getattr(self, "app", None))
        if rt is None:
            return original(self, reason, terminated, signum, expired)
        recorded = None
        text = reason
        if reason == "terminated" and terminated:
            # The ladder's last step: say why and after how long.
            ending = rt.ladder.ending_of(self.id)
            if ending is not None:
                text = ending
                recorded = rt.index.match_request(self)
        elif reason == "revoked" and not terminated and not expired:
            recorded = rt.index.match_request(self)
            if recorded is not None:
                text = recorded.describe()
        if recorded is None:
            return original(self, text, terminated, signum, expired)
        # Discarded by a cancellation we know: end what it would have sent
        # (first: a chord joined by polling that finds this member REVOKED
        # must find the body REVOKED too, see _workflow), store its reason,
        # and keep it out of its chord's count (the body is REVOKED instead).
        # Celery's task-revoked event carries the reason when it is ours (not
        # a plain revoke's bare "revoked").
        context = celery_internals.request_context(self)
        members: list[_ending.Member] = []
        try:
            members = _workflow.revoke_downstream(self.task.backend, context, recorded)
        except Exception as exc:  # noqa: BLE001 - never break the consumer
            logger.warning(TASK_RESULT_NOT_STORED, task_id=self.id, error=repr(exc), exc_info=exc)
        chord = getattr(context, "chord", None)
        context.chord = None
        ours = text != reason
        try:
            with celery_internals.extra_revoked_fields(
                self, _ending.revoked_fields(text) if ours else {}
            ):
                return original(self, text, terminated, signum, expired)
        finally:
            context.chord = chord
            if ours:
                celery_internals.log_task_ended(self.name, self.id, _ending.description(text))
            try:
                _ending.send_revoked_events(self, text, members, own=False)
            except Exception as exc:  # noqa: BLE001 - never break the consumer
                logger.warning(TASK_EVENT_NOT_SENT, task_id=self.id, error=repr(exc), exc_info=exc)

    return announce


def _promote_quietly(rt: WorkerRuntime, request: Any, reason: CancelReason) -> None:
    # From Celery's consumer: a failure here must not stop the discard.
    try:
        added = promote_workflow(rt, request, reason)
        if added:
            deliver_targets(rt, added)
    except Exception as exc:  # noqa: BLE001 - never break the consumer
        logger.error(CANCEL_DELIVERY_FAILED, task_ids=[request.id], error=repr(exc), exc_info=exc)


def members_command(state: Any, targets: Any = None, **kwargs: Any) -> dict[str, list[Any]]:
    """The tasks this worker holds that the given targets name.

    ``{task id: ["active" | "reserved", parent id or None]}``.  A read-only
    probe for ``celery cancel --workflow``: it indexes nothing.
    """
    probe = TargetIndex()
    probe.add(targets_from(targets), CancelReason(source="revoked"))
    active = celery_internals.active_request_ids()
    found: dict[str, list[Any]] = {}
    for task_id, request in dict(celery_internals.worker_requests()).items():
        if probe.match_request(request) is not None:
            parent_id = getattr(request, "parent_id", None)
            found[task_id] = [
                "active" if task_id in active else "reserved",
                parent_id if isinstance(parent_id, str) else None,
            ]
    return found
