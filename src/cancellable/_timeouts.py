"""Timeouts: scopes that cancel themselves at a deadline, trio's names.

`move_on_after` and `move_on_at` give a `CancelScope` with a deadline: the
block is abandoned at its first checkpoint after the deadline and execution
continues after it.  `fail_after` and `fail_at` do the same but turn an
expired deadline into `TooSlowError`.  The deadline machinery itself (one
timer thread per process, nothing read at a checkpoint) is the scope's: see
``_scope`` and ``_timer``.
"""

from __future__ import annotations

import time
from types import TracebackType

from . import _config
from ._exceptions import TooSlowError
from ._scope import CancelScope

__all__ = ["fail_after", "fail_at", "move_on_after", "move_on_at"]


def _seconds_from_now(seconds: float) -> float:
    seconds_f = _config.validate_seconds(seconds, "seconds", allow_none=False)
    assert seconds_f is not None
    return time.monotonic() + seconds_f


def move_on_at(deadline: float) -> CancelScope:
    """A scope that cancels itself at ``deadline`` (`time.monotonic` time).

    .. versionadded:: 0.1.0
    """
    return CancelScope(deadline=deadline)


def move_on_after(seconds: float) -> CancelScope:
    """A scope that cancels itself ``seconds`` from now.

    The block is abandoned at the first checkpoint after the deadline and
    execution continues after it; check ``scope.cancelled_caught`` to tell.

    Raises:
        TypeError: ``seconds`` is not a number.
        ValueError: ``seconds`` is negative, NaN or infinite.

    .. versionadded:: 0.1.0
    """
    return CancelScope(deadline=_seconds_from_now(seconds))


class _FailScope:
    """Context manager behind `fail_after`: a scope that raises if its deadline fired."""

    __slots__ = ("_scope",)

    def __init__(self, deadline: float) -> None:
        self._scope = CancelScope(deadline=deadline)

    def __enter__(self) -> CancelScope:
        return self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        caught = self._scope.__exit__(exc_type, exc, tb)
        reason = self._scope.cancel_reason
        if caught and reason is not None and reason.source == "deadline":
            raise TooSlowError("the deadline expired") from exc
        return caught


def fail_at(deadline: float) -> _FailScope:
    """Like `move_on_at`, but raise `TooSlowError` if the deadline cancels the block.

    .. versionadded:: 0.1.0
    """
    return _FailScope(deadline)


def fail_after(seconds: float) -> _FailScope:
    """Like `move_on_after`, but raise `TooSlowError` if the deadline cancels the block.

    Raises:
        TypeError: ``seconds`` is not a number.
        ValueError: ``seconds`` is negative, NaN or infinite.
        TooSlowError: On exit, when the deadline cancelled the block.

    .. versionadded:: 0.1.0
    """
    return _FailScope(_seconds_from_now(seconds))
