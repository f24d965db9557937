"""The library's event log: structured events that print nothing unless asked to.

A library must not decide where its log goes.  So every event is routed by
what the *application* has set up, at the moment it is emitted:

* the application configured **structlog** (`structlog.is_configured`): the
  event goes through the application's structlog pipeline as key/value
  pairs, on the logger named ``"cancellable"``;
* otherwise the event goes to the standard library logger ``"cancellable"``,
  which has a `logging.NullHandler` (the standard library's rule for
  libraries): nothing is printed unless the application configures
  `logging`.  A Celery worker does, so there the events appear in the
  worker's log at their own levels, as ``<event> key=value ...``; the fields
  are also attached to the record as ``record.event`` and
  ``record.event_fields`` for handlers that want them.

Emitting is never on the checkpoint hot path: events are logged when a
cancellation happens, not when it is checked.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import structlog

from ._exceptions import CancelReason
from .events import LOGGER_NAME

__all__ = ["logger", "reason_fields"]

_stdlib: Final = logging.getLogger(LOGGER_NAME)
_stdlib.addHandler(logging.NullHandler())


def _format(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={value!r}" for key, value in fields.items() if value is not None)


class EventLogger:
    """``logger.info(event_name, **fields)`` and friends (see the module docstring)."""

    __slots__ = ()

    def debug(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at DEBUG."""
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at INFO."""
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at WARNING."""
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Emit ``event`` at ERROR."""
        self._emit(logging.ERROR, "error", event, fields)

    @staticmethod
    def _emit(level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(structlog.get_logger(LOGGER_NAME), method)(event, **fields)
            return
        if not _stdlib.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        _stdlib.log(
            level,
            "%s %s",
            event,
            _format(fields),
            exc_info=exc_info,
            extra={"event": event, "event_fields": fields},
        )


#: The library's one logger.
logger: Final = EventLogger()


def reason_fields(reason: CancelReason) -> dict[str, Any]:
    """The fields every event about a cancellation carries: who, why, from where."""
    return {
        "source": reason.source,
        "message": reason.message,
        "requested_by": reason.requested_by,
    }
