"""Task throughput through a real prefork worker, plain vs @cancellable (extension point).

Names: ``throughput.plain_tasks_per_s``, ``throughput.cancellable_tasks_per_s``
(5,000 no-op tasks through ``celery worker --pool=prefork -c 2``) and
``throughput.per_task_overhead_us`` (the difference per task).

Until ``cancellable.celery`` exists and exports ``cancel``, `run` returns
skipped records naming the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, selected, skipped
from _integration import celery_integration

NAMES = (
    "throughput.plain_tasks_per_s",
    "throughput.cancellable_tasks_per_s",
    "throughput.per_task_overhead_us",
)


def run(
    mode: str = "full", only: str | None = None, redis_url: str = DEFAULT_REDIS_URL
) -> list[dict[str, Any]]:
    """Result records for the selected throughput names."""
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    _module, reason = celery_integration()
    if reason is None:
        reason = "the throughput benchmark is not written yet"
    return [skipped(name, reason) for name in names]
