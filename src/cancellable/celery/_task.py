"""The task boundary: a ``@cancellable`` call that Celery is executing.

The core decorator asks us (we registered `claim` with
`cancellable._decorator.register_task_runner`) whether a call belongs to a
Celery task execution.  If it does, we:

1. open the call's scope and register it under the task id, so a
   cancellation delivered to this process can find it;
2. check whether the task was cancelled before it started (the local index
   of live cancellations, the prefork mailbox, Celery's revoked set) and, if
   so, skip the body;
3. run the body; if `Cancelled` reaches us (our scope was cancelled, or a
   nested ``@cancellable`` call's timeout let its `Cancelled` through), the
   hooks have run (the scope ran them while unwinding), so we record the
   REVOKED state with the reason (and the same for the parts of its canvas
   that will now never be sent: `cancellable.celery._workflow`) and raise
   `~cancellable.celery._ending.CancelledEnding`, a
   `celery.exceptions.Ignore` that acknowledges the message, stops Celery
   from storing anything else, and has the worker send Celery's
   ``task-revoked`` event and log "Task name[id] revoked: ..."
   (`cancellable.celery._ending`); the span current in the task, if
   OpenTelemetry made one, records it too (`cancellable.celery._otel`).
   A ``self.retry()`` raised from a cancelled scope ends the same way (the
   retry message it sent is discarded on arrival: it carries the same id).
   Under ``task_always_eager`` there is no worker to honour `Ignore`, so we
   raise `~celery.exceptions.TaskRevokedError` with the reason instead, and
   the eager result re-raises it.
4. if the body returns although the task was cancelled, and no checkpoint
   ever saw it (the cancellation came after the last one), log
   ``task.cancel_unobserved`` as a warning: the task ends SUCCESS.

Registering before checking closes the race with a cancellation that
arrives as the task starts: the canceller indexes the cancellation first
and then looks for the running task; the task registers first and then
looks at the index.  One of the two always sees the other.

`Cancelled` must never escape a task: Celery re-raises `BaseException`
subclasses out of the tracer, which would store nothing and, in a prefork
child, end the process.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

from celery import signals
from celery.exceptions import Retry, TaskRevokedError

from .._decorator import CallOptions, run_in_scope
from .._exceptions import Cancelled, CancelReason
from .._log import logger
from .._log import reason_fields as _reason_fields
from .._scope import observed_at, set_log_fields
from ..events import (
    CHILD_RETIRED,
    TASK_CANCEL_UNOBSERVED,
    TASK_CANCELLED,
    TASK_RESULT_NOT_STORED,
    TASK_SKIPPED,
)
from . import _celery_internals as celery_internals
from . import _otel, _shutdown, _workflow
from ._delivery import mailbox_reason
from ._ending import CancelledEnding, Member
from ._index import request_targets
from ._receipt import ending_note
from ._registry import RunningTask
from ._runtime import TaskRuntime, runtime

__all__ = ["claim"]


def claim() -> Callable[..., Any] | None:
    """Return a runner if the decorated call is a Celery task's body."""
    task = celery_internals.current_task()
    if task is None:
        return None
    request = task.request
    task_id = request.id
    if task_id is None or request.called_directly:
        return None
    tasks = runtime().tasks
    if tasks.running.get(task_id) is not None:
        # A @cancellable function called from inside the task: an ordinary
        # nested scope, not a second binding.
        return None
    return functools.partial(_run_task, tasks, task, request)


def _store_revoked(
    task: Any, request: Any, reason: CancelReason, how: str | None = None
) -> CancelledEnding:
    # REVOKED with a TaskRevokedError that describes the reason ("revoked by
    # alice: user pressed stop") and, when the ladder went past the
    # cooperative step, how it ended ("... (interrupted after 1.0 s)"); and
    # the same reason for every part of the canvas this task would have sent
    # (the rest of its chain, its links, its chord's body), which now never
    # will be.
    # Returns what the task leaves the tracer with (the message, and the
    # members stored REVOKED, for the worker's task-revoked events).
    store = not request.ignore_result or task.store_errors_even_if_ignored
    message = reason.describe() if how is None else f"{reason.describe()} ({how})"
    members: list[Member] = []
    try:
        members = _workflow.revoke_member(
            task.backend, request.id, reason, request, store_result=store, message=message
        )
    except Exception as exc:  # noqa: BLE001 - the task must still end cleanly
        logger.warning(TASK_RESULT_NOT_STORED, task_id=request.id, error=repr(exc), exc_info=exc)
    return CancelledEnding(message, members)


def _run_task(
    tasks: TaskRuntime,
    task: Any,
    request: Any,
    wrapped: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: CallOptions,
) -> Any:
    task_id: str = request.id
    scope = options.new_scope()
    set_log_fields(scope, {"task_id": task_id, "task_name": task.name})
    _id, group_id, root_id = request_targets(request)
    entry = RunningTask(task_id, task.name, scope, group_id, root_id)
    tasks.running.register(entry)
    # Prefork: say "this child runs task_id" before the body can start (the
    # terminate step kills a stopped child only if it still says so).
    # An eager task run inside another (``y.apply()`` in x's body) runs in
    # x's process and thread: x stays the one its child's row names, so the
    # terminate step still finds it there.
    table = None if getattr(request, "is_eager", False) else tasks.table
    if table is not None:
        table.publish(task_id)
    tasks.wakeup.ensure_installed()
    # The tutorial idiom `current_task.request.revoked()` (Context has no
    # such method in Celery itself).
    request.revoked = entry.revoked
    try:
        reason = tasks.reason_before_start(request)
        if _shutdown.is_sent_back(reason):
            assert reason is not None
            _shutdown.send_back(task, request, reason)
        if reason is not None:
            ending = _store_revoked(task, request, reason)
            logger.info(
                TASK_SKIPPED,
                task_id=task_id,
                task_name=task.name,
                **_reason_fields(reason),
            )
            _otel.record_cancellation(reason, ending.text, "skipped")
            _end(tasks, request, reason, ending)
        try:
            body = _interruptible(tasks, wrapped, entry, options)
            result = run_in_scope(body, args, kwargs, options, scope)
        except Cancelled as exc:
            # Ours, or one that a nested scope let through (a @cancellable
            # helper's timeout): either way the task was cancelled, and a
            # BaseException must not reach Celery's tracer.
            if _shutdown.is_sent_back(entry.scope.cancel_reason or exc.reason):
                # A shutdown or a lost connection: it runs again (_shutdown).
                _shutdown.send_back(task, request, entry.scope.cancel_reason or exc.reason)
            ending = _finish_cancelled(task, request, entry, exc)
            _end(tasks, request, entry.scope.cancel_reason or exc.reason, ending)
        except Retry:
            reason = entry.scope.cancel_reason
            if reason is None or _shutdown.is_sent_back(reason):
                raise  # (a shutdown: the retry runs it again)
            # The body caught Cancelled and asked for a retry: a cancelled
            # task is never retried.
            ending = _finish_cancelled(task, request, entry, Cancelled(reason))
            _end(tasks, request, reason, ending)
        if not options.is_async:
            _warn_if_unobserved(tasks, task, entry)
        return result
    finally:
        tasks.running.unregister(entry)
        if table is not None:
            if tasks.interrupts.landed:
                # Before the row is cleared: if this log meets a lock the
                # interrupt left held, the terminate step still finds the task.
                logger.info(CHILD_RETIRED, task_id=task_id, task_name=task.name, pid=os.getpid())
            table.clear()


def _interruptible(
    tasks: TaskRuntime, wrapped: Callable[..., Any], entry: RunningTask, options: CallOptions
) -> Callable[..., Any]:
    # The task's body, with the window in which the interrupt step may
    # raise in its thread (see _interrupt).  An async body is cancelled the
    # asyncio way instead: its window stays closed.
    if options.is_async:
        return wrapped

    def body(*args: Any, **kwargs: Any) -> Any:
        tasks.interrupts.open_window(entry)
        try:
            return wrapped(*args, **kwargs)
        finally:
            tasks.interrupts.close_window(entry)

    # What a swallowed-cancellation warning names (functools.wraps costs
    # a microsecond per task for attributes nobody reads here).
    body.__qualname__ = getattr(wrapped, "__qualname__", body.__qualname__)
    return body


def _end(
    tasks: TaskRuntime, request: Any, reason: CancelReason, ending: CancelledEnding
) -> NoReturn:
    # How a cancelled task leaves Celery's tracer: an Ignore in a worker (the
    # state is stored already; the worker announces it, see _ending),
    # TaskRevokedError when run eagerly, since an
    # eager result has no REVOKED state of its own and Ignore would make
    # get() return None.  The eager run also indexes the cancellation, so an
    # eager retry of the same id (autoretry_for=(Exception,)) is skipped.
    if getattr(request, "is_eager", False):
        tasks.index.add([("task", request.id)], reason)
        raise TaskRevokedError(reason.describe())
    raise ending


def _warn_if_unobserved(tasks: TaskRuntime, task: Any, entry: RunningTask) -> None:
    # The body returned although the task was cancelled, and no checkpoint
    # raised (a body that caught Cancelled was warned about already: the
    # core's cancel.swallowed).  It ends SUCCESS: say so, once.  In a
    # prefork child the cancellation may still wait in the mailbox: its
    # wake-up signal hands the check to the next checkpoint, and there was
    # none.
    scope = entry.scope
    reason = scope.cancel_reason
    if reason is None and tasks.wakeup.check_queued:
        reason = mailbox_reason(tasks.mailbox, entry.task_id)
    if reason is None or observed_at(scope) is not None:
        return
    now = time.time()
    delivered = entry.delivered_at
    logger.warning(
        TASK_CANCEL_UNOBSERVED,
        task_id=entry.task_id,
        task_name=task.name,
        **_reason_fields(reason),
        after_cancel_ms=round((now - reason.requested_at) * 1000.0, 3),
        after_delivery_ms=None if delivered is None else round((now - delivered) * 1000.0, 3),
    )


def _finish_cancelled(
    task: Any, request: Any, entry: RunningTask, exc: Cancelled
) -> CancelledEnding:
    reason = entry.scope.cancel_reason or exc.reason
    how = entry.ended_by or ending_note(entry.delivered_at, observed_at(entry.scope))
    ending = _store_revoked(task, request, reason, how)
    done = time.time()

    def since_request(moment: float | None) -> float | None:
        if moment is None:
            return None
        return round((moment - reason.requested_at) * 1000.0, 3)

    observed = observed_at(entry.scope)
    logger.info(
        TASK_CANCELLED,
        task_id=request.id,
        task_name=task.name,
        **_reason_fields(reason),
        delivered_ms=since_request(entry.delivered_at),
        observed_ms=since_request(observed),
        cleanup_done_ms=since_request(done),
        hook_errors=len(exc.hook_errors),
        ended_by="checkpoint" if entry.ended_by is None else "interrupt",
    )
    _otel.record_cancellation(
        reason, ending.text, "checkpoint" if entry.ended_by is None else "interrupt"
    )
    signals.task_revoked.send(
        sender=task,
        request=request,
        terminated=False,
        signum=None,
        expired=False,
        reason=reason,
    )
    return ending
