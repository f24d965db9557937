"""Global settings department: the few knobs the core has, and their reset.

Everything process-wide and user-settable lives here so tests can put it back
with `reset_defaults` (an autouse fixture does).  The hot path never reads
this module.
"""

from __future__ import annotations

import enum
import math
from typing import Final

__all__ = [
    "DEFAULT",
    "DEFAULT_HOOK_TIMEOUT",
    "UNSET",
    "configure",
    "get_hook_timeout",
    "reset_defaults",
]

#: Seconds each cleanup hook may run before it is stopped (docs/cleanup.md).
DEFAULT_HOOK_TIMEOUT: Final = 30.0

#: The longest grace (seconds) a cancellation may give a task: one day.  A
#: longer one would keep a cancelled task running, and on the worker's
#: cancellation ladder, as good as for ever.
MAX_GRACE: Final = 24 * 3600.0

_hook_timeout: float | None = DEFAULT_HOOK_TIMEOUT


class _Unset:
    """The type of `UNSET`: "this option was not given"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


#: Default of `configure` options: an option left at UNSET keeps its value.
UNSET: Final = _Unset()


class _Default(enum.Enum):
    """The type of `DEFAULT` (an enum of one member, so type checkers narrow it)."""

    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


#: "Use the configured default": the default value of the options that fall
#: back to a setting made elsewhere, such as ``hook_timeout`` (`configure`)
#: and ``grace`` (the Celery app's ``cancellable_grace``).  Pass it to ask for
#: that fallback explicitly; None means "no limit" for those options.
DEFAULT: Final = _Default.DEFAULT


def validate_seconds(value: object, name: str, *, allow_none: bool = True) -> float | None:
    """Check a duration argument and return it as a float.

    Raises `TypeError` for non-numbers (``bool`` included) and `ValueError`
    for negative, NaN or infinite values.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite; pass None for no limit")
    return float(value)


def validate_grace(value: object, name: str = "grace") -> float | None:
    """`validate_seconds` for a grace, which may also not exceed `MAX_GRACE`.

    Raises `TypeError` for non-numbers and `ValueError` for negative, NaN,
    infinite values or values above `MAX_GRACE`.
    """
    seconds = validate_seconds(value, name)
    if seconds is not None and seconds > MAX_GRACE:
        raise ValueError(f"{name} must be at most {MAX_GRACE:.0f} seconds (one day), got {value!r}")
    return seconds


def configure(*, hook_timeout: float | _Unset | None = UNSET) -> None:
    """Set process-wide defaults.

    Only the options you pass change; the others keep their current values
    (``configure()`` with no arguments changes nothing).

    Args:
        hook_timeout: Seconds each cleanup hook may run before it is
            stopped at its next checkpoint (recorded as
            `~cancellable.HookTimeoutError`; ``None``: no limit; see
            docs/cleanup.md).  A scope or ``@cancellable(hook_timeout=...)`` can
            override it.

    Raises:
        TypeError: ``hook_timeout`` is not a number or None.
        ValueError: ``hook_timeout`` is negative, NaN or infinite.

    .. versionadded:: 0.1.0
    """
    global _hook_timeout
    if not isinstance(hook_timeout, _Unset):
        _hook_timeout = validate_seconds(hook_timeout, "hook_timeout")


def get_hook_timeout() -> float | None:
    """The process-wide default hook budget, in seconds (None: unbounded)."""
    return _hook_timeout


def reset_defaults() -> None:
    """Put every setting back to its default (for tests)."""
    global _hook_timeout
    _hook_timeout = DEFAULT_HOOK_TIMEOUT
