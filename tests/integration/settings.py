"""One place that turns harness settings into a configured Celery app.

The worker subprocesses (`tests.integration.app`, configured through ``CIT_*``
environment variables) and the test process (which builds one app per broker)
both call `make_app`, so the two sides always agree on the broker, the result
backend, the control exchange and the app's main name (which is part of the
ledger's key prefix).

This module must not import `cancellable`: the harness self-tests run plain
Celery tasks, and must keep working whatever state the integration is in.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery
from tests import redis_dbs

__all__ = ["AMQP_URL", "ENV_PREFIX", "REDIS_URL", "app_from_env", "make_app"]

ENV_PREFIX = "CIT_"

#: Redis database reserved for these tests: broker, results, ledger and
#: observations.  The session flushes it at start.
REDIS_URL = os.environ.get("CIT_REDIS_URL") or redis_dbs.url(redis_dbs.INTEGRATION_DB)
AMQP_URL = os.environ.get("CIT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def make_app(
    *,
    main: str,
    broker_url: str,
    backend_url: str,
    queue: str,
    control_exchange: str,
    poll_interval: float | None = None,
    prefetch_multiplier: int | None = None,
    visibility_timeout: float | None = None,
    fast_fail: bool = False,
) -> Celery:
    """A Celery app configured the way the integration tests need it.

    ``fast_fail`` gives the app a short connection timeout and retry policy,
    for tests that point it at a closed port.
    """
    app = Celery(main, broker=broker_url, backend=backend_url, set_as_current=False)
    transport_options: dict[str, Any] = {}
    if visibility_timeout is not None:
        transport_options.update(
            visibility_timeout=visibility_timeout,
            # Sweep for unacked messages every second instead of every ~100 s.
            unacked_restore_interval=1,
            unacked_restore_throttle=1,
        )
    if fast_fail:
        transport_options.update(
            max_retries=1, interval_start=0, interval_step=0.1, interval_max=0.2
        )
    conf: dict[str, Any] = {
        "task_default_queue": queue,
        "control_exchange": control_exchange,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "result_expires": 3600,
        "broker_transport_options": transport_options,
    }
    if prefetch_multiplier is not None:
        conf["worker_prefetch_multiplier"] = prefetch_multiplier
    if poll_interval is not None:
        conf["cancellable_poll_interval"] = poll_interval
    if fast_fail:
        conf.update(
            broker_connection_timeout=1.0,
            broker_connection_retry=False,
            broker_connection_max_retries=1,
            redis_socket_connect_timeout=1.0,
            redis_socket_timeout=1.0,
            redis_retry_on_timeout=False,
            result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        )
    app.conf.update(conf)
    return app


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def app_from_env() -> Celery:
    """The app described by the ``CIT_*`` environment (see the conftest)."""
    missing = [n for n in ("APP_NAME", "BROKER_URL", "QUEUE", "CONTROL_EXCHANGE") if not _env(n)]
    if missing:
        raise RuntimeError(
            "tests.integration.app is configured through environment variables; missing: "
            + ", ".join(ENV_PREFIX + n for n in missing)
        )
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        # A django-db result backend (django-celery-results) needs Django set up.
        import django

        django.setup()
    poll = _env("POLL_INTERVAL")
    prefetch = _env("PREFETCH")
    visibility = _env("VISIBILITY_TIMEOUT")
    app = make_app(
        main=str(_env("APP_NAME")),
        broker_url=str(_env("BROKER_URL")),
        backend_url=str(_env("BACKEND_URL", REDIS_URL)),
        queue=str(_env("QUEUE")),
        control_exchange=str(_env("CONTROL_EXCHANGE")),
        poll_interval=float(poll) if poll else None,
        prefetch_multiplier=int(prefetch) if prefetch else None,
        visibility_timeout=float(visibility) if visibility else None,
    )
    # Extra app settings, as JSON (e.g. a cancellable_* setting under test).
    app.conf.update(json.loads(_env("SETTINGS") or "{}"))
    return app
