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
as Celery is imported) installs the worker-side machinery; no worker flags
are needed.
See :doc:`/celery` for how it works in each pool and broker.
"""

from __future__ import annotations

try:  # The integration needs Celery, an optional dependency of the package.
    import celery as _celery  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f"cancellable.celery needs Celery ({exc}): pip install 'cancellable[celery]'"
    ) from exc

from ._api import BrokerUnavailableError, LedgerUnavailableWarning, cancel, configure
from ._ladder import DEFAULT_KILL_AFTER
from ._ledger import DEFAULT_LEDGER_TTL
from ._worker import DEFAULT_POLL_INTERVAL, PreforkDeliveryWarning, install

install()

__all__ = [
    "DEFAULT_KILL_AFTER",
    "DEFAULT_LEDGER_TTL",
    "DEFAULT_POLL_INTERVAL",
    "BrokerUnavailableError",
    "LedgerUnavailableWarning",
    "PreforkDeliveryWarning",
    "cancel",
    "configure",
]
