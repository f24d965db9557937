"""Cooperative cancellation for Celery tasks.

Decorate a task with ``@cancellable`` (directly under ``@app.task``) and put
`~cancellable.checkpoint` calls in its loops.  Any revoke then stops it at its
next checkpoint: ``AsyncResult.revoke()``, ``app.control.revoke()``,
``GroupResult.revoke()``, ``celery control revoke``, monitoring tools, and
`cancel`, which adds a reason and durability.  The task runs its cleanup
hooks and ends as REVOKED, acknowledged, never retried.  ``cancel(group_result)``
cancels a group of any size as one target, and ``cancel(result,
workflow=True)`` a whole chain, group or chord (see :doc:`/workflows`).

Importing this module (importing `cancellable` arranges it for you as soon
as Celery is imported) patches nothing: a worker installs what it needs
when it starts, and `cancel` at its first call; no worker flags are needed.
See :doc:`/celery` for what is installed, where and when, and how it works
in each pool and broker.
"""

from __future__ import annotations

try:  # The integration needs Celery, an optional dependency of the package.
    import celery as _celery  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f"cancellable.celery needs Celery ({exc}): pip install 'cancellable[celery]'"
    ) from exc

from ._activation import PreforkDeliveryWarning, activate
from ._client import (
    BroadcastFailedWarning,
    BrokerUnavailableError,
    LedgerUnavailableWarning,
    NotDurableWarning,
    cancel,
    configure,
)
from ._receipt import CancelReceipt, Outcome, TaskOutcome
from ._settings import (
    DEFAULT_CANCEL_TIMEOUT,
    DEFAULT_KILL_AFTER,
    DEFAULT_LEDGER_TTL,
    DEFAULT_POLL_INTERVAL,
    MAX_GRACE,
    SettingError,
    Settings,
)

activate()

__all__ = [
    "DEFAULT_CANCEL_TIMEOUT",
    "DEFAULT_KILL_AFTER",
    "DEFAULT_LEDGER_TTL",
    "DEFAULT_POLL_INTERVAL",
    "MAX_GRACE",
    "BroadcastFailedWarning",
    "BrokerUnavailableError",
    "CancelReceipt",
    "LedgerUnavailableWarning",
    "NotDurableWarning",
    "Outcome",
    "PreforkDeliveryWarning",
    "SettingError",
    "Settings",
    "TaskOutcome",
    "cancel",
    "configure",
]
