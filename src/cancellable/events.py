"""The names of every structlog event `cancellable` emits.

These strings are a stable interface: dashboards and alerts match on them, so
they only ever gain members.  All events go through the logger named
``"cancellable"`` (``structlog.get_logger("cancellable")``); the library
never configures structlog or the standard `logging` module, so the events
appear wherever your configuration sends them.

Every event carries ``source``, ``message`` and ``requested_by`` (the
`~cancellable.CancelReason` fields) where a reason exists, and Celery events
add ``task_id`` and ``task_name``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CANCEL_BROADCAST_FAILED",
    "CANCEL_DELIVERED",
    "CANCEL_DELIVERY_FAILED",
    "CANCEL_ESCALATED",
    "CANCEL_NOT_ESCALATED",
    "CANCEL_OBSERVED",
    "CANCEL_REQUESTED",
    "CANCEL_SWALLOWED",
    "CHILD_RETIRED",
    "CHORD_CANCELLED",
    "CLEANUP_FAILED",
    "CLEANUP_OVERRAN",
    "CLEANUP_TIMED_OUT",
    "LEDGER_IN_USE",
    "LEDGER_NOT_DURABLE",
    "LEDGER_POLL_FAILED",
    "LEDGER_UNAVAILABLE",
    "LOGGER_NAME",
    "MAILBOX_FULL",
    "PREFORK_UNAVAILABLE",
    "SCOPE_CANCELLED",
    "SIBLINGS_CANCELLED",
    "TASK_CANCELLED",
    "TASK_CANCEL_UNOBSERVED",
    "TASK_EVENT_NOT_SENT",
    "TASK_RESULT_NOT_STORED",
    "TASK_SENT_BACK",
    "TASK_SKIPPED",
    "TASK_TERMINATED",
    "TERMINATE_AVERTED",
    "WORKER_CONNECTION_LOST",
    "WORKER_REPLACED",
    "WORKER_SHUTDOWN",
]

#: The structlog logger name all events are emitted on.
LOGGER_NAME: Final = "cancellable"

#: A scope was cancelled for the first time (later `cancel` calls are silent).
CANCEL_REQUESTED: Final = "cancel.requested"

#: A worker's main process received a cancellation for a task it runs and
#: passed it on to the process or thread running it (Celery).  Carries
#: ``delivered_ms``: requested -> delivered.
CANCEL_DELIVERED: Final = "cancel.delivered"

#: Delivering a revoke to running tasks failed in a worker's main process
#: (an internal error, logged instead of breaking Celery's control loop).
#: Carries ``task_ids`` and ``error``.
CANCEL_DELIVERY_FAILED: Final = "cancel.delivery_failed"

#: A checkpoint raised `~cancellable.Cancelled` for the first time in a scope.
#: Carries ``observed_ms``: requested -> observed.
CANCEL_OBSERVED: Final = "cancel.observed"

#: A ``@cancellable`` call returned normally although it was cancelled and
#: the cancellation had been raised into it (a checkpoint raised
#: `~cancellable.Cancelled`, or its asyncio task was cancelled): the body
#: caught it and carried on.  A warning; carries ``function`` and, for a
#: Celery task, ``task_id`` and ``task_name``.
#:
#: .. versionadded:: 0.1.0
CANCEL_SWALLOWED: Final = "cancel.swallowed"

#: A cleanup hook raised.  Carries ``hook`` and ``error``.
CLEANUP_FAILED: Final = "cleanup.failed"

#: A cleanup hook was stopped because it overran its time budget (at a
#: checkpoint, `cancellable.sleep` or `cancellable.wait`, or, in a process
#: that will be retired, wherever it was).  Carries ``hook`` and ``budget_s``.
CLEANUP_TIMED_OUT: Final = "cleanup.timed_out"

#: A cleanup hook ran past its time budget in a process where it is not
#: raised into at an arbitrary bytecode (everywhere but a Celery prefork
#: child): it stops at its next checkpoint, `cancellable.sleep` or
#: `cancellable.wait`, or runs on to its end.  Logged once per hook run, when
#: the budget expires.  Carries ``hook``, ``budget_s`` and ``why``.
CLEANUP_OVERRAN: Final = "cleanup.overran"

#: A cancelled scope exited.  Carries ``caught`` (whether this scope absorbed
#: the `~cancellable.Cancelled`), ``hooks_run``, ``hook_errors`` and
#: ``cleanup_ms`` (time spent in hooks).
SCOPE_CANCELLED: Final = "scope.cancelled"

#: A group member that opted in to fail-fast (``cancel_siblings_on_failure``)
#: failed, and the rest of its group was cancelled (one ``group`` target).
#: Carries ``task_id``, ``task_name`` and ``group``.
#:
#: .. versionadded:: 0.1.0
SIBLINGS_CANCELLED: Final = "siblings.cancelled"

#: A chord joined by polling (Celery's ``celery.chord_unlock``, on a result
#: backend without native chords such as ``db+postgresql://``) found its
#: body stored REVOKED: the chord was cancelled, so it stops polling and
#: neither sends nor fails the body.  Carries ``task_id`` and ``task_name``
#: (of the ``celery.chord_unlock`` task), ``group`` (the header's group id),
#: ``body`` (the body's id) and ``revoked`` (the body's REVOKED message).
#:
#: .. versionadded:: 0.1.0
CHORD_CANCELLED: Final = "chord.cancelled"

#: A Celery task ended as REVOKED because it was cancelled while running.
#: Carries the latencies ``delivered_ms``, ``observed_ms`` and
#: ``cleanup_done_ms``, each measured from the request, and ``ended_by``:
#: ``"checkpoint"`` (it stopped cooperatively) or ``"interrupt"`` (its grace
#: was over and `~cancellable.Cancelled` was raised in its thread).
TASK_CANCELLED: Final = "task.cancelled"

#: A cancelled Celery task finished without ever seeing its cancellation:
#: it reached no checkpoint after the cancellation arrived (and no grace
#: interrupted it), so it ends as it would have (SUCCESS, its result
#: stored).  A warning; carries ``after_cancel_ms`` (from the request to
#: the task's end) and ``after_delivery_ms`` (from the moment the
#: cancellation reached the task's process; None if it never did, e.g. a
#: deadline).
#:
#: .. versionadded:: 0.1.0
TASK_CANCEL_UNOBSERVED: Final = "task.cancel_unobserved"

#: Celery's ``task-revoked`` event for a cancelled task could not be sent
#: (the worker's event dispatcher raised).  A warning; carries ``error``.
#: The task's ending is not affected.
#:
#: .. versionadded:: 0.1.0
TASK_EVENT_NOT_SENT: Final = "task.event_not_sent"

#: A worker's main process moved a cancelled task up the ladder (see
#: :doc:`/grace`).  Carries ``step`` (``"interrupt"`` or ``"terminate"``),
#: ``after_s`` (seconds since the worker got the cancellation), and
#: ``grace_s`` or ``pid``.
#:
#: .. versionadded:: 0.1.0
CANCEL_ESCALATED: Final = "cancel.escalated"

#: The ladder could not take its next step for a task (the pool cannot
#: terminate, the interpreter cannot interrupt a thread...).  A warning,
#: once per task; carries ``step`` and ``why``.
#:
#: .. versionadded:: 0.1.0
CANCEL_NOT_ESCALATED: Final = "cancel.not_escalated"

#: An interrupt landed in this prefork child, at whatever bytecode its task
#: was at, so a lock may be held there for ever: the child leaves the pool
#: once it has reported the task (billiard replaces it, as for
#: ``max_tasks_per_child``).  Logged by the child; carries ``pid``.
#:
#: .. versionadded:: 0.1.0
CHILD_RETIRED: Final = "cancel.child_retired"

#: The last step of the ladder: the prefork child running the task was
#: killed (it was stopped and still ran the task).  A warning; carries
#: ``pid`` and ``after_s``.  The task ends REVOKED, "terminated after N s".
#:
#: .. versionadded:: 0.1.0
TASK_TERMINATED: Final = "task.terminated"

#: Before killing a child, the worker stopped it and found that it no
#: longer ran the cancelled task: it was continued, untouched.  Carries
#: ``pid``.
#:
#: .. versionadded:: 0.1.0
TERMINATE_AVERTED: Final = "cancel.terminate_averted"

#: A cancelled Celery task was about to start and its body was skipped.
TASK_SKIPPED: Final = "task.skipped"

#: ``cancel()`` recorded a cancellation in the ledger but could not
#: broadcast it in time: workers apply it at their next ledger read.
#: Carries ``error``, ``task_ids`` (the first 20) and ``targets`` (a count).
CANCEL_BROADCAST_FAILED: Final = "cancel.broadcast_failed"

#: The cancellation ledger could not be reached; cancellation still reaches
#: the workers that are online, but it is not durable.
LEDGER_UNAVAILABLE: Final = "ledger.unavailable"

#: A duty of a worker's poller threads (a ledger read or write, the delivery
#: or ladder tick, the index purge) failed for a reason other than the ledger
#: being down; the other duties still ran.  Logged once per cause, then at
#: most once a minute.  Carries ``where``, ``error`` and ``repeats``.
LEDGER_POLL_FAILED: Final = "ledger.poll_failed"

#: The REVOKED state of a cancelled task could not be stored in the result
#: backend; the task still ended and its message was acknowledged.
TASK_RESULT_NOT_STORED: Final = "task.result_not_stored"

#: A worker started: where its app's cancellations are kept.  Carries
#: ``app``, ``durable`` and ``where`` (the store and its key, table or
#: path; or ``"not durable: online workers only (<why>)"``).  INFO when
#: durable, WARNING when not.  Logged once per worker start.
#:
#: .. versionadded:: 0.1.0
LEDGER_IN_USE: Final = "ledger.in_use"

#: No durable ledger is configured for this app (logged once per process).
LEDGER_NOT_DURABLE: Final = "ledger.not_durable"

#: Every slot of a prefork worker's mailbox is in use, so a cancellation
#: waits (it is never dropped) until a held task ends.  Logged once per
#: process; it means the worker holds more cancelled tasks than its
#: prefetch setting suggested.
MAILBOX_FULL: Final = "mailbox.full"

#: Tasks running in this worker's prefork children cannot be reached (no
#: wake-up signal on this platform, or children not forked: the spawn start
#: method).  Logged once per process, with ``why``.
PREFORK_UNAVAILABLE: Final = "prefork.unavailable"

#: A second worker started in this process while an earlier one still ran
#: (embedded or test workers): the integration serves one worker per process,
#: so the earlier worker's tasks are no longer cancelled.  WARNING, with
#: ``replaced`` and ``by`` (the two workers' host names).
WORKER_REPLACED: Final = "worker.replaced"

#: A warm shutdown began with ``cancellable_shutdown_grace`` set: the worker's
#: running ``@cancellable`` tasks were cancelled (source ``"shutdown"``) to
#: be sent back to the broker.  Carries ``task_ids`` and ``grace_s``.
#:
#: .. versionadded:: 0.1.0
WORKER_SHUTDOWN: Final = "worker.shutdown"

#: A worker lost its AMQP broker connection, which redelivers its unacked
#: messages: its running ``@cancellable`` ``acks_late`` tasks were cancelled
#: (source ``"connection_lost"``).  A warning; carries ``task_ids``.
#:
#: .. versionadded:: 0.1.0
WORKER_CONNECTION_LOST: Final = "worker.connection_lost"

#: A task cancelled by a shutdown or a lost connection stopped, ran its
#: cleanup and went back to the broker to run again, storing nothing.
#: Carries the reason's fields and ``how``: ``"requeued"`` (``acks_late``:
#: its message was rejected with requeue), ``"resent"`` (acked early: a copy
#: with the same id, arguments and headers was sent) or ``"redelivered"``
#: (the broker redelivers it after the lost connection; nothing was sent).
#:
#: .. versionadded:: 0.1.0
TASK_SENT_BACK: Final = "task.sent_back"
