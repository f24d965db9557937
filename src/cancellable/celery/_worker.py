"""Worker-side wiring: the revoke interceptor, the checks before the pool, the poller.

Everything here is installed when `cancellable.celery` is imported, which
happens as soon as the program imports Celery (see
`cancellable._integrations`).  In a worker that is long before the pool forks
its children, so ``worker_init`` creates the shared mailbox in time and
``worker_process_init`` installs the wake-up handler in each child.

* **Interceptor.**  Celery dispatches remote-control commands from the
  ``Panel.data`` registry; we wrap its ``revoke`` entry.  A plain revoke
  (``AsyncResult.revoke``, ``app.control.revoke``, ``GroupResult.revoke``,
  ``celery control revoke``, Flower) runs Celery's own handler first, then
  goes into the index and the ledger and is delivered to the tasks this
  worker holds.  A revoke sent by `cancellable.celery.cancel` carries its
  reason under the extra argument ``cancellable``; it was recorded in the
  ledger already, and we handle it without Celery's handler, which would
  write a bare "revoked" state per id (two backend round trips each, and
  a wrong reason) and trusts a bounded in-memory set.  ``terminate=True`` is
  left entirely to Celery.
* **Before the pool.**  Celery asks ``Request.revoked()`` before it hands any
  task to the pool (on receipt, when an ETA or rate limit expires, after a
  redelivery).  We extend that check with the local index, so a task is
  discarded whenever one of its targets is live, whatever the size of
  Celery's revoked set; and Celery's discard stores the recorded reason
  instead of a bare "revoked".
* **Workflows.**  ``cancel()`` can also send ``group`` and ``root`` targets
  (under the extra argument ``cancellable_targets``); they are indexed and
  delivered to every held task they match.  A ``root`` target also matches a
  task that would send its id later (`cancellable.celery._workflow`); when
  one does, the worker records the task's real root id as well
  (`promote_workflow`), so the rest of that workflow matches by root id
  everywhere.  A task discarded for a cancellation we know stores its
  reason, does not report to its chord, and its unsent parts (rest of the
  chain, links, chord body) are stored REVOKED.  The read-only control
  command ``cancellable_members`` lists the held tasks some targets name
  (for ``celery cancel --workflow``).
* **Poller**, one thread per running worker, started at ``worker_init`` and
  stopped at ``worker_shutdown``: every 0.1 s it advances the forwards to
  prefork children (`_delivery.tick`); every ``cancellable_poll_interval``
  seconds it reads what the ledger gained since its last read (one round
  trip) and delivers it to the tasks here.  That catches missed broadcasts,
  and it is the only way into a busy ``solo`` worker, whose consumer reads
  nothing (broadcasts included) while a task runs.
* **Fork safety.**  The poller does its work under ``_tick_lock``, which
  `os.register_at_fork` takes before every fork, so a child is never forked
  while the poller holds one of our locks or a logger's.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Iterable
from typing import Any, Final

from celery import bootsteps, signals
from celery.utils.functional import maybe_list
from celery.worker import state as worker_state
from celery.worker.control import Panel

from .. import _decorator
from .._exceptions import CancelReason
from .._log import logger
from ..events import (
    CANCEL_DELIVERY_FAILED,
    LEDGER_POLL_FAILED,
    LEDGER_UNAVAILABLE,
    PREFORK_UNAVAILABLE,
    TASK_RESULT_NOT_STORED,
)
from . import (
    _api,
    _delivery,
    _failfast,
    _index,
    _interrupt,
    _ladder,
    _ledger,
    _registry,
    _task,
    _wakeup,
    _workflow,
)
from ._ledger import Target

__all__ = ["DEFAULT_POLL_INTERVAL", "install"]

#: Seconds between a worker's polls of the ledger.
DEFAULT_POLL_INTERVAL: Final = 2.0

#: Seconds between the poller's forwarding ticks.
TICK: Final = 0.1

#: The remote-control command that lists the held tasks some targets name.
MEMBERS_COMMAND: Final = "cancellable_members"

#: Seconds between purges of expired index entries.
PURGE_EVERY: Final = 600.0

_installed = False
_install_lock: Final = threading.Lock()


class PreforkDeliveryWarning(RuntimeWarning):
    """Running tasks in this worker's prefork children cannot be reached.

    Queued tasks are still discarded, and tasks in other pools still stop
    at their next checkpoint.

    .. versionadded:: 0.1.0
    """


def _reason_from(payload: Any) -> CancelReason | None:
    """The reason `cancel()` sent along with a revoke, or None (plain revoke)."""
    if isinstance(payload, dict):
        try:
            return CancelReason.from_dict(payload)
        except (TypeError, ValueError):
            pass
    return None


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
        if isinstance(item, (list, tuple)) and len(item) == 2:
            try:
                targets.extend(_ledger.check_targets([(item[0], item[1])]))
            except ValueError:
                continue
    return targets


def deliver_targets(
    targets: Iterable[Target],
    grace: float | None = None,
    graces: dict[str, float] | None = None,
) -> int:
    """Deliver newly indexed targets to the tasks this worker holds; return how many.

    Each task reached is also put on the cancellation ladder
    (`cancellable.celery._ladder`), with ``grace`` if given (a broadcast),
    or its own entry of ``graces`` (ledger entries, by task id).
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
        held = list(worker_state.requests.copy()) + list(_registry.running_ids())
        task_ids = list(dict.fromkeys([*task_ids, *held]))
    delivered = 0
    promoted: list[Target] = []
    for task_id in task_ids:
        if task_id not in worker_state.requests and _registry.running(task_id) is None:
            continue
        request = worker_state.requests.get(task_id) or _registry.running(task_id)
        reason = _index.index.match_request(request) if request is not None else None
        if reason is None:
            reason = _index.index.match(task_id)
        if reason is not None and _delivery.deliver(task_id, reason) != "none":
            delivered += 1
            # The registered name (``type``), not a shadow name: the ladder
            # looks the task's own grace up in the registry by it.
            name = getattr(request, "type", None) or getattr(request, "task_name", None)
            given = grace if graces is None else graces.get(task_id, grace)
            _ladder.start(task_id, reason, name, given)
        if reason is not None and request is not None:
            promoted.extend(promote_workflow(request, reason))
    if promoted:
        delivered += deliver_targets(promoted, grace, graces)
    return delivered


def promote_workflow(request: Any, reason: CancelReason) -> list[Target]:
    """Cancel a request's whole workflow when a root target names it by a member's id.

    ``cancel(id, workflow=True)`` records ``("root", id)``.  A request that
    matches it through its own id or a task it would send later (not
    through its root id) tells us the workflow's real root id: we index it,
    record it in the ledger, and return the new target so the caller
    delivers it.  Its other members (the siblings of a group sent by a link
    that finished) then match by their root id, here and on every other
    worker.  Returns ``[]`` when there is nothing new.
    """
    _task_id, _group_id, root_id = _index.request_targets(request)
    if not root_id or _index.index.has("root", root_id):
        return []
    if _index.index.match_workflow(request) is None:
        return []
    added = _index.index.add([("root", root_id)], reason)
    if added:
        app = _current_app()
        if app is not None:
            try:
                _ledger.ledger_for(app).record(added, reason)
            except _ledger.LedgerError as exc:
                logger.warning(LEDGER_UNAVAILABLE, error=str(exc), task_ids=[root_id])
    return added


def _on_revoke(
    state: Any,
    task_ids: list[str],
    reason: CancelReason,
    from_cancel: bool,
    grace: float | None = None,
    wide: Iterable[Target] = (),
) -> None:
    targets: list[Target] = [("task", task_id) for task_id in task_ids]
    targets.extend(wide)
    _index.index.add(targets, reason)
    # Deliver every id this worker holds, even one indexed before: a second
    # revoke of a running task must not be a no-op if the first was missed.
    deliver_targets(targets, grace)
    if not from_cancel:
        # A plain revoke: make it durable too (cancel() wrote the ledger itself).
        app = getattr(state, "app", None) or _current_app()
        if app is not None:
            try:
                _ledger.ledger_for(app).record(targets, reason)
            except _ledger.LedgerError as exc:
                logger.warning(LEDGER_UNAVAILABLE, error=str(exc), task_ids=task_ids[:20])


def _wrap_revoke() -> None:
    original = Panel.data.get("revoke")
    if original is None or getattr(original, "_cancellable_original", None) is not None:
        return

    def revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> Any:
        given = _reason_from(kwargs.get("cancellable"))
        task_ids = [str(t) for t in (maybe_list(task_id) or [])]
        if terminate or given is None:
            result = original(state, task_id, terminate=terminate, signal=signal, **kwargs)
        else:
            result = task_ids
        if not terminate:
            try:
                _on_revoke(
                    state,
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
        return result

    revoke._cancellable_original = original  # type: ignore[attr-defined]
    revoke.__doc__ = original.__doc__
    Panel.data["revoke"] = revoke


def _patch_request() -> None:
    # Extend Celery's own pre-pool check (see the module docstring).
    from celery.worker.request import Request

    if getattr(Request.revoked, "_cancellable_original", None) is not None:
        return
    original_revoked = Request.revoked
    original_announce = Request._announce_revoked

    def revoked(self: Any) -> bool:
        if not self._already_revoked and self.id not in worker_state.revoked:
            reason = _index.index.match_request(self)
            if reason is not None:
                # Celery discards what its revoked set names; the index says so.
                worker_state.revoked.add(self.id)
                _promote_quietly(self, reason)
        return bool(original_revoked(self))

    def announce_revoked(
        self: Any, reason: str, terminated: bool, signum: Any, expired: bool
    ) -> Any:
        recorded = None
        text = reason
        if reason == "terminated" and terminated:
            # The ladder's last step: say why and after how long.
            ending = _ladder.ending_of(self.id)
            if ending is not None:
                text = ending
                recorded = _index.index.match_request(self)
        elif reason == "revoked" and not terminated and not expired:
            recorded = _index.index.match_request(self)
            if recorded is not None:
                text = recorded.describe()
        if recorded is None:
            return original_announce(self, text, terminated, signum, expired)
        # Discarded by a cancellation we know: store its reason, keep it out
        # of its chord's count (the body is REVOKED below instead), and end
        # what it would have sent.
        context = self._context
        chord = getattr(context, "chord", None)
        context.chord = None
        try:
            return original_announce(self, text, terminated, signum, expired)
        finally:
            context.chord = chord
            try:
                _workflow.revoke_downstream(self.task.backend, context, recorded)
            except Exception as exc:  # noqa: BLE001 - never break the consumer
                logger.warning(
                    TASK_RESULT_NOT_STORED, task_id=self.id, error=repr(exc), exc_info=exc
                )

    revoked._cancellable_original = original_revoked  # type: ignore[attr-defined]
    announce_revoked._cancellable_original = original_announce  # type: ignore[attr-defined]
    revoked.__doc__ = original_revoked.__doc__
    Request.revoked = revoked
    Request._announce_revoked = announce_revoked


def _promote_quietly(request: Any, reason: CancelReason) -> None:
    # From Celery's consumer: a failure here must not stop the discard.
    try:
        added = promote_workflow(request, reason)
        if added:
            deliver_targets(added)
    except Exception as exc:  # noqa: BLE001 - never break the consumer
        logger.error(CANCEL_DELIVERY_FAILED, task_ids=[request.id], error=repr(exc), exc_info=exc)


def _members(state: Any, targets: Any = None, **kwargs: Any) -> dict[str, list[Any]]:
    """The tasks this worker holds that the given targets name.

    ``{task id: ["active" | "reserved", parent id or None]}``.  A read-only
    probe for ``celery cancel --workflow``: it indexes nothing.
    """
    probe = _index.TargetIndex()
    probe.add(targets_from(targets), CancelReason(source="revoked"))
    active = {request.id for request in list(worker_state.active_requests)}
    found: dict[str, list[Any]] = {}
    for task_id, request in list(worker_state.requests.items()):
        if probe.match_request(request) is not None:
            parent_id = getattr(request, "parent_id", None)
            found[task_id] = [
                "active" if task_id in active else "reserved",
                parent_id if isinstance(parent_id, str) else None,
            ]
    return found


def _register_members() -> None:
    if MEMBERS_COMMAND not in Panel.data:
        Panel.register(_members, name=MEMBERS_COMMAND, type="inspect")


# --------------------------------------------------------------------------
# The poller and the worker's lifecycle.

#: Held by the poller while it works; taken before every fork.
_tick_lock = threading.Lock()


def _poll_interval(app: Any) -> float:
    value = app.conf.get("cancellable_poll_interval")
    return DEFAULT_POLL_INTERVAL if value is None else float(value)


class _Poller:
    """One worker's poller thread (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cancellable-poller", daemon=True)
        self.interval = _poll_interval(app)
        self.ttl = _ledger.ledger_ttl(app)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(5.0)

    def _run(self) -> None:
        now = time.monotonic()
        next_sync = now + self.interval
        next_purge = now + PURGE_EVERY
        while not self.stopped.wait(TICK):
            try:
                with _tick_lock:
                    _delivery.tick()
                    _ladder.tick()
                now = time.monotonic()
                if now >= next_sync:
                    next_sync = now + self.interval
                    self.sync()
                if now >= next_purge:
                    next_purge = now + PURGE_EVERY
                    _index.index.purge(self.ttl)
            except Exception as exc:  # noqa: BLE001 - the net must not die
                with _tick_lock:
                    logger.warning(LEDGER_POLL_FAILED, error=repr(exc), exc_info=exc)

    def sync(self) -> None:
        """Read the ledger's news into the index and deliver it (network outside the lock)."""
        with _tick_lock:
            ledger = _ledger.ledger_for(self.app)
        try:
            entries, cursor = ledger.read(_index.index.cursor)
        except _ledger.LedgerError as exc:
            with _tick_lock:
                logger.warning(LEDGER_UNAVAILABLE, error=str(exc))
            return
        if self.stopped.is_set():
            return
        with _tick_lock:
            added = _index.index.add_entries(entries)
            _index.index.cursor = cursor
            if added:
                # The grace a cancel() gave travels in its entry: by task id
                # for task targets, and for each group or root target, to
                # every held task that target reaches.
                graces = {
                    target_id: entry.grace
                    for entry in entries
                    if entry.grace is not None
                    for kind, target_id in entry.targets
                    if kind == "task"
                }
                fresh = set(added)
                wide: dict[float, list[Target]] = {}
                for entry in entries:
                    if entry.grace is not None:
                        for target in entry.targets:
                            if target[0] != "task" and target in fresh:
                                wide.setdefault(entry.grace, []).append(target)
                for grace, targets in wide.items():
                    deliver_targets(targets, grace)
                in_wide = {target for targets in wide.values() for target in targets}
                deliver_targets([t for t in added if t not in in_wide], graces=graces)


_poller: _Poller | None = None
_poller_lock = threading.Lock()


def _current_app() -> Any:
    poller = _poller
    return None if poller is None else poller.app


def _mailbox_slots(sender: Any, app: Any) -> int:
    # The most tasks one worker can hold at once: its prefetch plus one
    # running task per child.  (Unlimited prefetch is capped by the mailbox.)
    concurrency = getattr(sender, "concurrency", None)
    if not isinstance(concurrency, int) or concurrency <= 0:
        concurrency = os.cpu_count() or 1
    multiplier = app.conf.get("worker_prefetch_multiplier")
    multiplier = 4 if not isinstance(multiplier, int) or multiplier < 0 else multiplier
    if multiplier == 0:
        return 1 << 30
    return concurrency * multiplier + concurrency + 16


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    global _poller
    app = getattr(sender, "app", None)
    if app is None:
        return
    with _poller_lock:
        if _poller is not None:
            _poller.stop()  # an earlier worker in this process that did not shut down
        _index.index.clear()
        try:
            _index.index.sync(_ledger.ledger_for(app))
        except _ledger.LedgerError as exc:
            logger.warning(LEDGER_UNAVAILABLE, error=str(exc), during="worker start")
        _delivery.create_mailbox(_mailbox_slots(sender, app))
        kind = _pool_kind(sender)
        _ladder.configure_worker(app, sender, kind)
        if kind == "solo" and _wakeup.available():
            # The solo pool runs tasks on this process's main thread: the
            # interrupt step signals this very process.
            _wakeup.install(_no_mailbox, _interrupt.raise_if_asked)
        if _is_prefork(sender):
            if not _wakeup.available():
                _warn_prefork("this platform has no SIGURG to wake pool children")
            elif getattr(sender, "pool_start_method", "fork") != "fork":
                _warn_prefork("the pool does not fork its children (spawn start method)")
        _poller = _Poller(app)
        _poller.start()
        # Celery sends worker_shutdown only on a warm stop; a bootstep hears
        # every way a worker ends (warm, cold, embedded workers' terminate()).
        app.steps["worker"].add(_PollerStep)


def _stop_poller(app: Any = None) -> None:
    global _poller
    with _poller_lock:
        if _poller is not None and (app is None or app is _poller.app):
            _poller.stop()
            _poller = None


def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    _stop_poller(getattr(sender, "app", None))


class _PollerStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Stops this worker's poller however the worker ends."""

    label = "cancellable-poller"

    def start(self, parent: Any) -> None:
        """Nothing to start: the poller runs from ``worker_init`` on."""

    def stop(self, parent: Any) -> None:
        """Warm shutdown."""
        _stop_poller(getattr(parent, "app", None))

    def terminate(self, parent: Any) -> None:
        """Cold shutdown (also ``WorkController.terminate()``)."""
        _stop_poller(getattr(parent, "app", None))

    def shutdown(self, parent: Any) -> None:
        """Final teardown."""
        _stop_poller(getattr(parent, "app", None))


def _is_prefork(sender: Any) -> bool:
    return _pool_kind(sender) == "prefork"


def _pool_kind(sender: Any) -> str:
    """``"prefork"``, ``"threads"``, ``"solo"``, ``"gevent"``, ``"eventlet"`` or ``""``."""
    pool = getattr(sender, "pool_cls", None)
    name = str(pool if isinstance(pool, str) else getattr(pool, "__module__", ""))
    for kind in ("prefork", "threads", "solo", "gevent", "eventlet"):
        if kind in name or (kind == "threads" and "thread" in name):
            return kind
    return ""


def _no_mailbox() -> None:
    """A solo worker has no mailbox to read after a wake-up signal."""


_warned_prefork = False


def _warn_prefork(why: str) -> None:
    global _warned_prefork
    if _warned_prefork:
        return
    _warned_prefork = True
    message = (
        f"cancellable cannot reach tasks running in prefork children: {why}. Queued tasks "
        "are still discarded; use the threads or solo pool to stop running tasks."
    )
    logger.warning(PREFORK_UNAVAILABLE, why=why)
    warnings.warn(message, PreforkDeliveryWarning, stacklevel=2)


def _on_worker_process_init(**kwargs: Any) -> None:
    box = _delivery.mailbox()
    if box is None or box.owner != os.getppid():
        # The child did not inherit the main process's mailbox: the pool
        # started it with the spawn (or forkserver) start method.
        _warn_prefork("the pool does not fork its children (spawn start method)")
        return
    _wakeup.install(_delivery.check_mailbox, _interrupt.raise_if_asked)
    _ladder.child_started()
    table = _ladder.child_table()
    if table is not None and table.owner == os.getppid():
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
        if isinstance(index, int):
            table.claim(index)


def _before_fork() -> None:
    _tick_lock.acquire()


def _after_fork_in_parent() -> None:
    _tick_lock.release()


def _after_fork_in_child() -> None:
    global _tick_lock, _poller, _poller_lock
    # Threads do not survive a fork: the child has no poller, and a fresh
    # copy of every lock the poller might have held.
    _tick_lock = threading.Lock()
    _poller_lock = threading.Lock()
    _poller = None
    _registry.reset_after_fork()
    _delivery.reset_after_fork()
    _ledger.reset_after_fork()


def install() -> None:
    """Install the worker-side machinery in this process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        _wrap_revoke()
        _register_members()
        _patch_request()
        _api.install_client_side()
        signals.worker_init.connect(_on_worker_init, weak=False)
        signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
        signals.worker_process_init.connect(_on_worker_process_init, weak=False)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=_before_fork,
                after_in_parent=_after_fork_in_parent,
                after_in_child=_after_fork_in_child,
            )
        _decorator.register_task_runner(_task.claim)
        _failfast.install()
