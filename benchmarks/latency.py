"""Delivery latency over real Celery workers (extension point).

Names (milliseconds, with p90/p99): ``latency.revoke_to_checkpoint`` (revoke
sent -> the running task's checkpoint raises), ``latency.revoke_to_cleanup``
(-> its on_cancel hook finished), ``latency.revoke_to_revoked_state`` (->
REVOKED visible in the result backend).

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
    "latency.revoke_to_checkpoint",
    "latency.revoke_to_cleanup",
    "latency.revoke_to_revoked_state",
)


def run(
    mode: str = "full", only: str | None = None, redis_url: str = DEFAULT_REDIS_URL
) -> list[dict[str, Any]]:
    """Result records for the selected latency names."""
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    _module, reason = celery_integration()
    if reason is None:
        reason = "the latency benchmark is not written yet"
    return [skipped(name, reason) for name in names]
