"""The reason for a cancellation, and the exceptions the library raises.

`Cancelled` is the only exception that travels through user code when a scope
is cancelled.  Everything in this module is immutable and picklable, because a
reason crosses process boundaries: it is written to the ledger by a client,
read by a worker's main process and handed to a prefork child.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from typing import Any, ClassVar, Final, Literal, get_args

__all__ = [
    "CancelReason",
    "CancelSource",
    "Cancelled",
    "HookTimeoutError",
    "TooSlowError",
]

#: Where a cancellation came from.  ``"shutdown"`` (a worker's warm shutdown)
#: and ``"connection_lost"`` (a worker lost its AMQP broker connection) send
#: the task back to the broker to run again instead of ending it.
CancelSource = Literal["revoked", "deadline", "manual", "shutdown", "connection_lost"]

_SOURCES: Final = frozenset(get_args(CancelSource))

_MAX_REQUESTED_BY_LENGTH: Final = 256


@dataclasses.dataclass(frozen=True, slots=True)
class CancelReason:
    """Why something was cancelled: an immutable, picklable record.

    Args:
        source: What kind of event cancelled the scope: ``"revoked"`` (a
            Celery revoke or `cancellable.celery.cancel`), ``"deadline"`` (a
            timeout), ``"manual"`` (`CancelScope.cancel` in user code),
            ``"shutdown"`` (the worker is stopping: a warm shutdown with
            ``cancellable_shutdown_grace`` set) or ``"connection_lost"``
            (the worker lost its AMQP broker connection, which redelivers
            the task).  The last two send a Celery task back to run again.
        message: Free text for humans, at most `MAX_MESSAGE_LENGTH`
            characters.
        requested_by: Who asked for it (a user name, a service), if known.
        requested_at: Wall-clock time of the request, in seconds since the
            epoch (`time.time`).  Defaults to the moment the reason is made.

    Raises:
        TypeError: A field has the wrong type.
        ValueError: ``source`` is not one of the sources above, a text field
            is too long, or ``requested_at`` is not a finite number.

    .. versionadded:: 0.1.0
    """

    #: The longest ``message`` a reason accepts.  A reason travels in
    #: broadcasts, ledger entries and result meta; an unbounded one would
    #: turn a typo (``reason=open(f).read()``) into megabytes on every worker.
    MAX_MESSAGE_LENGTH: ClassVar[int] = 4096

    source: CancelSource = "manual"
    message: str = ""
    requested_by: str | None = None
    requested_at: float = dataclasses.field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise TypeError(f"CancelReason.source must be a str, got {type(self.source).__name__}")
        if self.source not in _SOURCES:
            raise ValueError(
                f"CancelReason.source must be one of {sorted(_SOURCES)}, got {self.source!r}"
            )
        if not isinstance(self.message, str):
            raise TypeError(
                f"CancelReason.message must be a str, got {type(self.message).__name__}"
            )
        if len(self.message) > self.MAX_MESSAGE_LENGTH:
            raise ValueError(
                f"CancelReason.message is {len(self.message)} characters long; "
                f"the limit is {self.MAX_MESSAGE_LENGTH}. Put large details somewhere else "
                "and refer to them in the message."
            )
        if self.requested_by is not None:
            if not isinstance(self.requested_by, str):
                raise TypeError(
                    "CancelReason.requested_by must be a str or None, "
                    f"got {type(self.requested_by).__name__}"
                )
            if len(self.requested_by) > _MAX_REQUESTED_BY_LENGTH:
                raise ValueError(
                    "CancelReason.requested_by is longer than "
                    f"{_MAX_REQUESTED_BY_LENGTH} characters"
                )
        if isinstance(self.requested_at, bool) or not isinstance(self.requested_at, (int, float)):
            raise TypeError(
                "CancelReason.requested_at must be a number (seconds since the epoch), "
                f"got {type(self.requested_at).__name__}"
            )
        if not math.isfinite(self.requested_at):
            raise ValueError("CancelReason.requested_at must be finite")

    @classmethod
    def coerce(cls, reason: object, *, default_source: CancelSource = "manual") -> CancelReason:
        """Turn what a user passed as ``reason=`` into a `CancelReason`.

        ``None`` gives an empty reason with ``default_source``; a `str`
        becomes the message; a `CancelReason` is returned as is.  Anything
        else raises `TypeError`.
        """
        if reason is None:
            return cls(source=default_source)
        if isinstance(reason, cls):
            return reason
        if isinstance(reason, str):
            return cls(source=default_source, message=reason)
        raise TypeError(
            "reason must be None, a str or a CancelReason, "
            f"got {type(reason).__name__}: {reason!r:.80}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The reason as a JSON-ready dict (the inverse of `from_dict`)."""
        return {
            "source": self.source,
            "message": self.message,
            "requested_by": self.requested_by,
            "requested_at": self.requested_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CancelReason:
        """Rebuild a reason written by `to_dict`; unknown keys are ignored."""
        return cls(
            source=data.get("source", "manual"),
            message=data.get("message", "") or "",
            requested_by=data.get("requested_by"),
            requested_at=data.get("requested_at", time.time()),
        )

    def describe(self) -> str:
        """A one-line human description, e.g. ``"revoked by alice: stop"``."""
        text: str = self.source
        if self.requested_by:
            text += f" by {self.requested_by}"
        if self.message:
            text += f": {self.message}"
        return text


class Cancelled(BaseException):
    """Raised by `checkpoint` when the enclosing cancel scope is cancelled.

    It derives from `BaseException`, not `Exception`, for the same reason as
    `KeyboardInterrupt`: it is not an error in the code that sees it, and a
    broad ``except Exception:`` in a task must not swallow it.  Let it
    propagate; the scope that caused it catches it (or, for `cancellable`,
    the task boundary turns it into a REVOKED ending).

    Attributes:
        reason: The `CancelReason`.  When several cancellations race, the
            first one wins and later ones do not change it.
        hook_errors: Exceptions raised by cleanup hooks while the scope
            unwound, in the order the hooks ran.  They are also logged.

    .. versionadded:: 0.1.0
    """

    reason: CancelReason
    hook_errors: tuple[BaseException, ...]

    def __init__(self, reason: CancelReason | None = None) -> None:
        if reason is None:
            reason = CancelReason()
        if not isinstance(reason, CancelReason):
            raise TypeError(f"Cancelled needs a CancelReason, got {type(reason).__name__}")
        super().__init__(reason)
        self.reason = reason
        self.hook_errors = ()

    def __str__(self) -> str:
        return f"cancelled ({self.reason.describe()})"

    def __repr__(self) -> str:
        return f"Cancelled({self.reason!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep hook errors across pickling when they pickle themselves; the
        # reason alone is what matters on the far side.
        return (_rebuild_cancelled, (self.reason, tuple(map(_portable, self.hook_errors))))


def _portable(error: BaseException) -> BaseException:
    # A hook error that does not survive a pickle round trip (an exception
    # class with a custom __init__ signature, a local class, an unpicklable
    # attribute) would make the whole Cancelled fail to pickle or, worse, to
    # unpickle on the far side.  Replace it with a description.
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any failure means "not portable"
        return RuntimeError(f"unpicklable cleanup hook error: {error!r:.500}")
    return error


def _rebuild_cancelled(reason: CancelReason, hook_errors: tuple[BaseException, ...]) -> Cancelled:
    exc = Cancelled(reason)
    exc.hook_errors = hook_errors
    return exc


class TooSlowError(Exception):
    """Raised by `fail_after` (and `fail_at`) when the deadline expires.

    .. versionadded:: 0.1.0
    """


class HookTimeoutError(BaseException):
    """Recorded for a cleanup hook that overran its time budget and was stopped.

    The hook is stopped at its next checkpoint, `cancellable.sleep` or
    `cancellable.wait` (where it sees `Cancelled`); in a Celery prefork
    child, which is then retired, this exception is injected into a hook
    still running shortly after its budget, wherever it is (see
    docs/cleanup.md).  A `BaseException` so that the hook's own ``except
    Exception:`` does not absorb it.  It never leaves the hook runner: it is
    logged and recorded in `Cancelled.hook_errors`.

    .. versionadded:: 0.1.0
    """
