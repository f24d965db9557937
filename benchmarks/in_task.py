"""``celery.request_revoked``: the tutorial idiom, timed inside a real task.

Measures ``current_task.request.revoked()`` per call, timeit-style, inside a
``@cancellable`` task executing in a real worker, with an empty call and the
harness loop measured in the same task for the ratios.

Until ``cancellable.celery`` exists and exports ``cancel``, `run` returns a
skipped record naming the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, selected, skipped
from _integration import celery_integration

NAMES = ("celery.request_revoked",)


def run(
    mode: str = "full", only: str | None = None, redis_url: str = DEFAULT_REDIS_URL
) -> list[dict[str, Any]]:
    """Result records for ``celery.request_revoked`` (if selected)."""
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    _module, reason = celery_integration()
    if reason is None:
        reason = "the in-task benchmark is not written yet"
    return [skipped(name, reason) for name in names]
