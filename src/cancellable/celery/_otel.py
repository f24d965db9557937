"""OpenTelemetry: a cancelled task's span says so.

``opentelemetry-instrumentation-celery`` starts a span for each task in
``task_prerun`` and makes it current in the task's thread until
``task_postrun``; a task that leaves through ``Ignore`` ends it with status
UNSET, like a success.  When the task boundary ends a task cancelled, it
calls `record_cancellation`, which marks the span current in the task (the
instrumentation's, or any other):

* an event ``task.cancelled`` with the reason's fields;
* the attribute ``celery.revoked.reason`` (the key the Celery
  instrumentation defines for a revoked task, ``_TASK_REVOKED_REASON_KEY``)
  set to the REVOKED message;
* status ERROR with the message as its description.

No dependency: the OpenTelemetry API is looked up among the modules already
imported (the instrumentation, or any code that creates spans, has imported
it); without it there can be no current span, and nothing is done.
"""

from __future__ import annotations

import sys
from typing import Any, Final

from .._exceptions import CancelReason

__all__ = ["EVENT_NAME", "REASON_ATTRIBUTE", "record_cancellation"]

#: The span event added for a cancelled task.
EVENT_NAME: Final = "task.cancelled"

#: The span attribute for the REVOKED message (opentelemetry-instrumentation-celery's key).
REASON_ATTRIBUTE: Final = "celery.revoked.reason"


def record_cancellation(reason: CancelReason, text: str, ended_by: str) -> bool:
    """Record a cancelled ending on the span current in this thread; False if none records.

    ``text`` is the REVOKED message; ``ended_by`` is ``"checkpoint"``,
    ``"interrupt"`` or ``"skipped"`` (cancelled before its body started).
    """
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return False
    span = trace.get_current_span()
    if not span.is_recording():
        return False
    attributes: dict[str, Any] = {
        "cancellable.source": reason.source,
        "cancellable.message": reason.message,
        "cancellable.requested_at": reason.requested_at,
        "cancellable.ended_by": ended_by,
    }
    if reason.requested_by is not None:
        attributes["cancellable.requested_by"] = reason.requested_by
    span.add_event(EVENT_NAME, attributes)
    span.set_attribute(REASON_ATTRIBUTE, text)
    span.set_status(trace.Status(trace.StatusCode.ERROR, text))
    return True
