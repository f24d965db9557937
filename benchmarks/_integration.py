"""Whether the Celery integration (``cancellable.celery``) is there to measure.

The Celery benchmarks (``celery.request_revoked``, ``latency.*``,
``throughput.*``) need ``cancellable.celery`` and its ``cancel`` function.
Until they exist, those benchmarks report *skipped* records with the reason
returned here instead of numbers.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def celery_integration() -> tuple[ModuleType | None, str | None]:
    """``(module, None)`` if ``cancellable.celery`` exports ``cancel``, else ``(None, reason)``."""
    try:
        module = importlib.import_module("cancellable.celery")
    except ImportError as exc:
        why = f"cannot import cancellable.celery ({exc})"
        return None, f"the Celery integration is not available yet: {why}"
    if not callable(getattr(module, "cancel", None)):
        return None, (
            "the Celery integration is not complete yet: "
            "cancellable.celery does not export cancel()"
        )
    return module, None
