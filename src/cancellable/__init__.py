"""Cooperative cancellation for Celery tasks and plain threads.

Put `checkpoint` in your loops, decorate the work with `cancellable`, and
register cleanup with `on_cancel`.  A cancelled scope raises `Cancelled` at
its next checkpoint; the scope (or, for Celery, the task boundary) catches it.

Everything public is re-exported here; the modules whose names start with an
underscore are private.  Celery-specific names live in `cancellable.celery`,
test helpers in `cancellable.testing`, event names in `cancellable.events`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._config import DEFAULT, configure
from ._decorator import cancellable
from ._exceptions import (
    Cancelled,
    CancelReason,
    CancelSource,
    HookTimeoutError,
    TooSlowError,
)
from ._hooks import HookHandle
from ._integrations import register_all as _register_integrations
from ._scope import (
    CancelScope,
    checkpoint,
    current_scope,
    is_cancelled,
    on_cancel,
)
from ._sleep import sleep, wait
from ._timeouts import fail_after, fail_at, move_on_after, move_on_at

_register_integrations()

try:
    __version__ = version("cancellable")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT",
    "CancelReason",
    "CancelScope",
    "CancelSource",
    "Cancelled",
    "HookHandle",
    "HookTimeoutError",
    "TooSlowError",
    "__version__",
    "cancellable",
    "checkpoint",
    "configure",
    "current_scope",
    "fail_after",
    "fail_at",
    "is_cancelled",
    "move_on_after",
    "move_on_at",
    "on_cancel",
    "sleep",
    "wait",
]
