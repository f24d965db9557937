"""Worker-side wiring: the revoke interceptor, start-up, and the safety-net poller.

Everything here is installed when `cancellable.celery` is imported, which the
``@cancellable`` decorator does in any process that has imported Celery.  In
a worker, task modules are imported by the main process before the pool
starts, so by the time children are forked the interceptor is in place, the
shared mailbox exists, and ``worker_process_init`` will install the signal
handler in each child.

* **Interceptor.**  Celery dispatches remote-control commands from the
  ``Panel.data`` registry.  We wrap its ``revoke`` entry: Celery's own
  handler runs first (it updates the revoked set and discards queued
  tasks), then we deliver the cancellation to running ``@cancellable``
  tasks and record it in the ledger.  Any revoke works: ``AsyncResult.revoke``,
  ``app.control.revoke``, ``GroupResult.revoke``, ``celery control revoke``,
  Flower, and `cancellable.celery.cancel`, whose broadcast also carries the
  reason under the extra argument ``cancellable``.  ``terminate=True`` is
  left entirely to Celery.
* **Start-up** (``worker_init``, main process, before the pool and the
  consumer start): every live id in the ledger goes into Celery's revoked
  set, so tasks cancelled while no worker was online are discarded on
  receipt, redelivered ``acks_late`` messages included.
* **Poller**, one daemon thread per worker main process: every 0.1 s it
  signals children that accepted a task after its cancellation arrived (the
  window between a child starting a task and the main process learning its
  pid), and every ``cancellable_poll_interval`` seconds it reads what the
  ledger gained since its last read (one round trip), adds those ids to the
  revoked set and delivers them to tasks already here.  That catches missed
  broadcasts, and it is the only way into a busy ``solo`` worker, whose
  consumer reads nothing (broadcasts included) while a task runs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Final

from celery import signals
from celery.utils.functional import maybe_list
from celery.worker import state as worker_state
from celery.worker.control import Panel

from .. import _config
from .._exceptions import CancelReason
from .._log import logger
from ..events import CANCEL_DELIVERY_FAILED, LEDGER_POLL_FAILED, LEDGER_UNAVAILABLE
from . import _delivery, _ledger, _task

__all__ = ["install"]

#: Seconds between a worker's polls of the ledger for the tasks it runs.
DEFAULT_POLL_INTERVAL: Final = 2.0

_installed = False
_install_lock: Final = threading.Lock()

#: Cancellations received for tasks reserved by this worker whose child is
#: not known yet; the poller signals the child once it is.
_awaiting: dict[str, CancelReason] = {}
_awaiting_lock: Final = threading.Lock()
_worker_app: Any = None


def _reason_from(payload: Any) -> CancelReason | None:
    """The reason `cancel()` sent along with a revoke, or None (plain revoke)."""
    if isinstance(payload, dict):
        try:
            return CancelReason.from_dict(payload)
        except (TypeError, ValueError):
            pass
    return None


def _deliver(task_id: str, reason: CancelReason) -> None:
    # Hand a cancellation to the task, wherever this worker holds it.  A
    # request whose child is not known yet waits in _awaiting for its pid.
    _remember_delivered(task_id)
    request = worker_state.requests.get(task_id)
    pid = getattr(request, "worker_pid", None)
    how = _delivery.deliver(task_id, reason, pid, getattr(request, "name", None))
    if how == "mailbox" and request is not None:
        with _awaiting_lock:
            _awaiting[task_id] = reason


def _on_revoke(state: Any, task_ids: list[str], reason: CancelReason, from_cancel: bool) -> None:
    for task_id in task_ids:
        _deliver(task_id, reason)
    if not from_cancel:
        # A plain revoke: make it durable too (cancel() wrote the ledger itself).
        app = getattr(state, "app", None) or _worker_app
        if app is not None:
            try:
                _ledger.ledger_for(app).record(task_ids, reason)
            except _ledger.LedgerError as exc:
                logger.warning(LEDGER_UNAVAILABLE, error=str(exc))


def _store_reason_first(state: Any, task_ids: list[str], reason: CancelReason) -> None:
    # Celery (5.6.2+) stores REVOKED with the bare reason "revoked" for every
    # revoked id that is not active on the receiving worker and has no state
    # yet, so an idle worker would publish "revoked" before the worker that
    # runs the task can store the real reason.  For a cancel() that carries a
    # reason, store it first; Celery then sees a final state and leaves it.
    active = {request.id for request in list(worker_state.active_requests)}
    app = getattr(state, "app", None) or _worker_app
    if app is None:
        return
    for task_id in task_ids:
        if task_id in active:
            continue
        request = worker_state.requests.get(task_id)
        backend = request.task.backend if request is not None else app.backend
        if backend.get_state(task_id) in _NOT_STARTED_STATES:
            _task.mark_revoked(backend, task_id, reason)


_NOT_STARTED_STATES: Final = frozenset({"PENDING", "RECEIVED", "RETRY", "REJECTED"})


def _wrap_revoke() -> None:
    original = Panel.data.get("revoke")
    if original is None or getattr(original, "_cancellable_original", None) is not None:
        return

    def revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> Any:
        given = _reason_from(kwargs.get("cancellable"))
        task_ids = [str(t) for t in (maybe_list(task_id) or [])]
        if given is not None and not terminate:
            with contextlib.suppress(Exception):
                _store_reason_first(state, task_ids, given)
        result = original(state, task_id, terminate=terminate, signal=signal, **kwargs)
        if not terminate:
            try:
                reason = given or CancelReason(source="revoked")
                _on_revoke(state, task_ids, reason, from_cancel=given is not None)
            except Exception as exc:  # noqa: BLE001 - never break Celery's control loop
                logger.error(CANCEL_DELIVERY_FAILED, task_ids=task_ids, error=repr(exc))
        return result

    revoke._cancellable_original = original  # type: ignore[attr-defined]
    revoke.__doc__ = original.__doc__
    Panel.data["revoke"] = revoke


def _poll_interval(app: Any) -> float:
    value = app.conf.get("cancellable_poll_interval")
    return DEFAULT_POLL_INTERVAL if value is None else float(value)


def _poller(app: Any) -> None:
    interval = _poll_interval(app)
    next_ledger_poll = time.monotonic() + interval
    while True:
        time.sleep(0.1)
        with contextlib.suppress(Exception):
            _signal_awaiting()
        if time.monotonic() >= next_ledger_poll:
            next_ledger_poll = time.monotonic() + interval
            try:
                _poll_ledger(app)
            except _ledger.LedgerError as exc:
                logger.warning(LEDGER_UNAVAILABLE, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - the net must not die
                logger.warning(LEDGER_POLL_FAILED, error=repr(exc))


def _signal_awaiting() -> None:
    with _awaiting_lock:
        items = list(_awaiting.items())
    for task_id, reason in items:
        request = worker_state.requests.get(task_id)
        pid = getattr(request, "worker_pid", None)
        if request is None or pid:
            with _awaiting_lock:
                _awaiting.pop(task_id, None)
        if pid:
            _delivery.deliver(task_id, reason, pid, getattr(request, "name", None))


#: Ids already delivered in this process, so the poller does not deliver
#: (and log) them again every interval while the task runs on.
_polled: set[str] = set()


def _remember_delivered(task_id: str) -> None:
    if len(_polled) > 10_000:
        _polled.clear()
    _polled.add(task_id)


_cursor: float = 0.0


def _poll_ledger(app: Any) -> None:
    # Learn every cancellation recorded since the last poll: add it to
    # Celery's revoked set (so the task is discarded when it arrives, even in
    # a solo worker that has not read the broadcast yet) and deliver it to
    # the task if it is already here.
    global _cursor
    ledger = _ledger.ledger_for(app)
    ids, _cursor = ledger.since(_cursor)
    new = [task_id for task_id in ids if task_id not in _polled]
    if not new:
        return
    for task_id in new:
        worker_state.revoked.add(task_id)
    running = set(_delivery.running_ids())
    here = [t for t in new if t in running or t in worker_state.requests]
    for task_id, reason in ledger.lookup(here).items() if here else ():
        _deliver(task_id, reason)


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    global _worker_app, _cursor
    app = getattr(sender, "app", None)
    if app is None:
        return
    _worker_app = app
    try:
        ids, _cursor = _ledger.ledger_for(app).since(0.0)
    except _ledger.LedgerError as exc:
        logger.warning(LEDGER_UNAVAILABLE, error=str(exc), during="worker start")
        ids = []
    for task_id in ids:
        worker_state.revoked.add(task_id)
    threading.Thread(target=_poller, args=(app,), name="cancellable-poller", daemon=True).start()


def _on_worker_process_init(**kwargs: Any) -> None:
    _delivery.install_child_handler()


def _on_task_revoked(
    sender: Any = None, request: Any = None, terminated: bool = False, **kwargs: Any
) -> None:
    # Celery discarded a task on receipt (or before handing it to the pool)
    # and stored REVOKED with the reason "revoked".  If we know a better
    # reason, store that instead.  Only in the main process, only on discard.
    if terminated or "reason" in kwargs or request is None or _worker_app is None:
        return
    task_id = getattr(request, "id", None)
    if not task_id:
        return
    try:
        reason = _ledger.ledger_for(_worker_app).lookup([task_id]).get(task_id)
    except _ledger.LedgerError:
        return
    if reason is None or not (reason.message or reason.requested_by):
        return
    task = getattr(request, "task", None) or sender
    with contextlib.suppress(Exception):
        _task.mark_revoked(task.backend, task_id, reason)


def install() -> None:
    """Install the worker-side machinery in this process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        _wrap_revoke()
        signals.worker_init.connect(_on_worker_init, weak=False)
        signals.worker_process_init.connect(_on_worker_process_init, weak=False)
        signals.task_revoked.connect(_on_task_revoked, weak=False)
        _config.call_runner = _task.claim
