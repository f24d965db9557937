"""Cancellations nobody asked for: a worker's warm shutdown, a lost AMQP connection.

Both end a running ``@cancellable`` task the cooperative way (its next
checkpoint, then the ladder's interrupt step; its cleanup hooks run) but
the task is not over: it goes back to the broker and runs again, from the
start, on another worker.  It is never stored REVOKED or FAILURE and sends
no ``task-revoked`` event.

The worker's main process (`cancel_running`)
    A warm shutdown (``WorkerStep.stop``, which Celery calls before the
    pool's ``stop`` waits for the running tasks) or a lost connection
    cancels every running ``@cancellable`` task this worker holds with a
    reason of source ``"shutdown"`` or ``"connection_lost"``, through the
    same delivery and ladder as a revoke (grace, then interrupt; never
    terminate, which would end the task REVOKED).  Nothing is written to the
    index or the ledger: the next run must not be skipped.
The process that runs the task (`send_back`)
    The task boundary (`cancellable.celery._task`) hands a task that ended
    with such a reason here, after its cleanup hooks ran:

    * shutdown, ``acks_late``: `~celery.exceptions.Reject` with requeue; the
      worker returns the unacked message to the broker;
    * shutdown, acked early: a copy with the same id, arguments, headers and
      options is sent (what ``Task.retry`` sends, without counting a retry),
      then `~celery.exceptions.Ignore`;
    * connection lost: `~celery.exceptions.Ignore`; the broker redelivers
      the message by itself, and the ack of the dead channel goes nowhere.

    The copy is sent, and the message rejected, only after the hooks ran, so
    the next run never overlaps this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NoReturn

from celery.exceptions import Ignore, Reject

from .._exceptions import CancelReason
from .._log import logger, reason_fields
from ..events import (
    CANCEL_DELIVERY_FAILED,
    TASK_SENT_BACK,
    WORKER_CONNECTION_LOST,
    WORKER_SHUTDOWN,
)
from . import _celery_internals as celery_internals
from ._delivery import cancellable_options
from ._runtime import WorkerRuntime, runtime

__all__ = [
    "SENT_BACK",
    "begin_shutdown",
    "cancel_running",
    "connection_lost",
    "is_sent_back",
    "keep_running",
    "send_back",
    "shutdown_requested",
]

#: The sources whose task goes back to the broker instead of ending.
SENT_BACK: Final = frozenset({"shutdown", "connection_lost"})

_MESSAGES: Final = {
    "shutdown": "worker shutdown: the task goes back to the queue",
    "connection_lost": "broker connection lost: the broker redelivers the task",
}


def is_sent_back(reason: CancelReason | None) -> bool:
    """Whether a task cancelled for ``reason`` goes back to the broker."""
    return reason is not None and reason.source in SENT_BACK


def _task_of(rt: WorkerRuntime, request: Any) -> Any | None:
    name = getattr(request, "type", None) or getattr(request, "task_name", None)
    tasks = getattr(rt.app, "tasks", None)
    return None if tasks is None or name is None else tasks.get(name)


def cancel_running(
    rt: WorkerRuntime, source: str, grace: float | None, *, acks_late_only: bool = False
) -> list[str]:
    """Cancel the running ``@cancellable`` tasks of this worker; return their ids.

    ``source`` is ``"shutdown"`` or ``"connection_lost"``; ``grace`` the
    seconds before the interrupt step (None: cooperative only).
    ``acks_late_only``: leave alone the tasks whose message was acked when
    they started.
    """
    reason = CancelReason(
        source=source,  # type: ignore[arg-type]  # one of SENT_BACK
        message=_MESSAGES[source],
        requested_by=getattr(rt.worker, "hostname", None),
    )
    requests = celery_internals.worker_requests()
    held = [*celery_internals.active_request_ids(), *rt.tasks.running.ids()]
    cancelled: list[str] = []
    for task_id in dict.fromkeys(held):
        request = requests.get(task_id)
        entry = rt.tasks.running.get(task_id)
        task = _task_of(rt, request if request is not None else entry)
        if task is None or cancellable_options(task) is None:
            continue  # a plain task: Celery's own shutdown handles it
        if acks_late_only and not task.acks_late:
            continue  # its message is gone: it would not run again
        if rt.delivery.deliver(task_id, reason) == "none":
            continue
        cancelled.append(task_id)
        rt.ladder.start(task_id, reason, task.name, grace, terminate=False)
    if source == "shutdown":
        logger.info(WORKER_SHUTDOWN, task_ids=cancelled, grace_s=grace)
    elif cancelled:
        logger.warning(WORKER_CONNECTION_LOST, task_ids=cancelled, how="cancelled")
    return cancelled


def begin_shutdown(rt: WorkerRuntime) -> list[str]:
    """A warm shutdown begins: see the module docstring.  Acts once per worker.

    Called by the worker's bootstep ``close`` on the consumer's thread, and
    by the ticker once Celery's warm-shutdown handler has run
    (`shutdown_requested`): in the solo pool the task runs on the thread
    that would call ``close``, which it reaches only after the task.
    """
    grace = rt.settings.shutdown_grace
    if grace is None or not rt.active:
        return []
    if not rt.shutdown_begun.acquire(blocking=False):
        return []  # begun already, by the other caller
    return cancel_running(rt, "shutdown", grace)


def shutdown_requested(sender: Any = None, how: str | None = None, **kwargs: Any) -> None:
    """The ``worker_shutting_down`` receiver: note a warm shutdown for the ticker.

    Celery sends the signal from its signal handler, which may run in the
    middle of a task (solo pool): only a flag is set here.
    """
    rt = runtime().worker
    if how == "Warm" and rt is not None and getattr(rt.worker, "hostname", None) == sender:
        rt.shutdown_requested = True


def connection_lost(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Consumer.on_connection_error_after_connected``, cancelling first (module docstring).

    Runs on the consumer's thread while the old connection is still
    there: if its broker redelivers unacked messages (AMQP) and
    ``cancellable_cancel_on_connection_loss`` is on, the running
    ``@cancellable`` ``acks_late`` tasks are cancelled, and their messages
    are never acknowledged (the delivery died with the channel).  Celery's
    ``worker_cancel_long_running_tasks_on_connection_loss`` then leaves them
    alone (it skips acknowledged requests) instead of killing their child.
    """

    def on_connection_error_after_connected(consumer: Any, exc: Any) -> Any:
        rt = runtime().worker
        connection = getattr(consumer, "connection", None)
        if (
            rt is not None
            and rt.serves(getattr(consumer, "app", None))
            and rt.settings.cancel_on_connection_loss
        ):
            try:
                if celery_internals.redelivers_unacked(connection):
                    requests = celery_internals.worker_requests()
                    for task_id in cancel_running(rt, "connection_lost", None, acks_late_only=True):
                        request = requests.get(task_id)
                        if request is not None:
                            celery_internals.drop_acknowledgement(request)
                elif celery_internals.restores_unacked_on_close(connection):
                    keep_running(rt, consumer)
            except Exception as error:  # noqa: BLE001 - never break the consumer's restart
                logger.error(CANCEL_DELIVERY_FAILED, error=repr(error), exc_info=error)
        return original(consumer, exc)

    return on_connection_error_after_connected


def keep_running(rt: WorkerRuntime, consumer: Any) -> list[str]:
    """Redis: keep the running ``@cancellable`` ``acks_late`` tasks' messages where they are.

    kombu's Redis transport puts a closing channel's unacked messages back
    on their queue (`celery_internals.restores_unacked_on_close`), so
    another worker would start a running task again while it runs.  Their
    messages are kept out of that restore instead: the tasks run on, and
    each one's ack, through the consumer's new channel, removes its message
    when it ends (or the visibility timeout brings it back if this worker
    dies first).  Nothing is
    cancelled.  Returns the ids kept; logs ``worker.connection_lost``.
    """
    requests = celery_internals.worker_requests()
    kept: list[str] = []
    for task_id in dict.fromkeys(celery_internals.active_request_ids()):
        request = requests.get(task_id)
        task = _task_of(rt, request)
        if task is None or cancellable_options(task) is None or not task.acks_late:
            continue
        if celery_internals.keep_unacked_on_close(request, consumer):
            kept.append(task_id)
    if kept:
        logger.warning(WORKER_CONNECTION_LOST, task_ids=kept, how="kept_running")
    return kept


def send_back(task: Any, request: Any, reason: CancelReason) -> NoReturn:
    """End a task cancelled for ``reason`` (in `SENT_BACK`) so that it runs again.

    Called by the task boundary once the cleanup hooks have run; raises
    what Celery's tracer needs (see the module docstring).
    """
    if reason.source == "connection_lost":
        how = "redelivered"
        ending: BaseException = Ignore()
    elif task.acks_late:
        how = "requeued"
        ending = Reject(reason.describe(), requeue=True)
    else:
        how = "resent"
        task.signature_from_request(request).apply_async()
        ending = Ignore()
    logger.info(
        TASK_SENT_BACK,
        task_id=request.id,
        task_name=task.name,
        how=how,
        **reason_fields(reason),
    )
    raise ending from None
