"""Reading reasons that another version of the library wrote.

During a rolling upgrade, old and new clients and workers share one broker
and one ledger, so a worker meets revoke payloads and ledger entries that a
newer (or older) version wrote.  What cannot be read of the *reason* must
never cost the *targets*: a cancellation whose reason is odd still cancels
every task, group and workflow it names, with the reason degraded by these
rules (documented in docs/reliability.md, "Version skew"):

* unknown fields are ignored;
* a ``source`` this version does not know (or that is not a string) becomes
  `FALLBACK_SOURCE`, ``"revoked"``;
* a ``message`` that is not a string becomes ``""``; one longer than
  `~cancellable.CancelReason.MAX_MESSAGE_LENGTH` is cut to it and ends with
  `TRIMMED`;
* a ``requested_by`` that is not a string becomes None; one too long is cut;
* a ``requested_at`` that is not a finite number becomes the time the entry
  was recorded (or now);
* a reason that is not a mapping at all: a string becomes the message,
  anything else an empty reason.

The mailbox between a worker and its children is not covered: both sides
always run the same code.
"""

from __future__ import annotations

import math
import time
from typing import Final, get_args

from .._exceptions import _MAX_REQUESTED_BY_LENGTH, CancelReason, CancelSource

__all__ = ["FALLBACK_SOURCE", "TRIMMED", "reason_from_wire", "trim"]

#: The source of a reason whose own source this version does not know.
FALLBACK_SOURCE: Final[CancelSource] = "revoked"
#: What ends a text that was cut to fit.
TRIMMED: Final = "\N{HORIZONTAL ELLIPSIS} [trimmed]"

_SOURCES: Final = frozenset(get_args(CancelSource))


def trim(text: str, limit: int) -> str:
    """``text``, or, if it is longer than ``limit`` characters, a prefix ending in `TRIMMED`."""
    if len(text) <= limit:
        return text
    if limit < 2 * len(TRIMMED):
        return text[:limit]
    return text[: limit - len(TRIMMED)] + TRIMMED


def reason_from_wire(data: object, recorded_at: float | None = None) -> CancelReason:
    """A `~cancellable.CancelReason` from whatever a revoke payload or ledger entry held.

    Never raises: see the module docstring for how each field degrades.
    ``recorded_at`` stands in for a missing or unreadable ``requested_at``.
    """
    fallback_at = time.time() if recorded_at is None else recorded_at
    if isinstance(data, str):
        data = {"message": data}
    if not isinstance(data, dict):
        data = {}
    source = data.get("source")
    message = data.get("message")
    requested_by = data.get("requested_by")
    requested_at = data.get("requested_at")
    number = isinstance(requested_at, (int, float)) and not isinstance(requested_at, bool)
    return CancelReason(
        source=source if isinstance(source, str) and source in _SOURCES else FALLBACK_SOURCE,  # type: ignore[arg-type]
        message=trim(message, CancelReason.MAX_MESSAGE_LENGTH) if isinstance(message, str) else "",
        requested_by=(
            trim(requested_by, _MAX_REQUESTED_BY_LENGTH) if isinstance(requested_by, str) else None
        ),
        requested_at=(
            float(requested_at) if number and math.isfinite(requested_at) else fallback_at  # type: ignore[arg-type]
        ),
    )
