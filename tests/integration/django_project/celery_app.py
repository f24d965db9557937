"""The project's Celery app: results in django-celery-results (PostgreSQL), broker Redis.

Imported by the worker (``celery -A tests.integration.django_project.celery_app``)
and by the test process, which both set Django up first.
"""

from __future__ import annotations

import os
import time
from typing import Any

import django
import redis

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integration.django_project.settings")
django.setup()

from celery import Celery  # noqa: E402

from cancellable import cancellable, checkpoint, on_cancel  # noqa: E402

app = Celery(os.environ.get("CIT_APP_NAME", "cit-django"), set_as_current=False)
app.conf.update(
    broker_url=os.environ["CIT_BROKER_URL"],
    result_backend="django-db",
    result_extended=True,
    task_track_started=True,
    task_default_queue=os.environ["CIT_QUEUE"],
    control_exchange=os.environ["CIT_CONTROL_EXCHANGE"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    cancellable_poll_interval=0.5,
)


def _obs() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CIT_OBS_URL"])


@app.task(bind=True, name="cit.django.export")
@cancellable
def export(self: Any, key: str, seconds: float = 60.0) -> str:
    """Checkpoints in a loop for ``seconds``; says when it loops and when its hook ran."""
    r = _obs()
    on_cancel(r.set, f"{key}:cleaned", 1)
    r.set(f"{key}:looping", 1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        checkpoint()
        time.sleep(0.02)
    return "done"


@app.task(name="cit.django.add")
def add(x: int, y: int) -> int:
    """Finishes at once."""
    return x + y
