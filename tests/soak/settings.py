"""One place that turns soak settings into a configured Celery app.

The worker subprocesses (`tests.soak.app`, configured through ``SOAK_*``
environment variables) and the driver in the test process both call
`make_app`, so the two sides agree on the broker, the result backend, the
queue, the control exchange and the app's main name (part of the ledger's
key prefix).

This module must not import `cancellable`: the harness self-test runs plain
Celery workers.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

__all__ = ["ENV_PREFIX", "SHUTDOWN_GRACE", "make_app", "worker_conf"]

ENV_PREFIX = "SOAK_"

#: ``cancellable_shutdown_grace`` of the soak's workers (seconds).
SHUTDOWN_GRACE = 2.0


def worker_conf(*, queue: str, control_exchange: str, visibility_timeout: float) -> dict[str, Any]:
    """The configuration shared by the workers and the driver's client app."""
    return {
        "task_default_queue": queue,
        "control_exchange": control_exchange,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # At-least-once delivery: a killed child's task is requeued at once,
        # a killed worker's unacked tasks come back after the visibility
        # timeout (swept every second instead of every ~100 s).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A warm shutdown sends the running @cancellable tasks back to the
        # broker (docs/shutdown.md): interrupted after this many seconds.
        "cancellable_shutdown_grace": SHUTDOWN_GRACE,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # The sweep holds a Redis lock that expires after 300 s by
            # default: a worker killed (or Redis restarted) while holding it
            # would stop every sweep for longer than the drain waits.  A
            # sweep takes milliseconds, and restoring a message twice is
            # impossible (each restore is a transaction on the unacked hash).
            "unacked_mutex_expire": 5,
        },
        # Survive Redis restarts: the broker connection, the result backend
        # and redis-py all retry.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 1000,
        "redis_socket_connect_timeout": 2.0,
        "redis_socket_timeout": 5.0,
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": 1,
        "result_expires": None,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "cancellable_poll_interval": 0.5,
    }


def make_app(
    *,
    main: str,
    redis_url: str,
    queue: str,
    control_exchange: str,
    visibility_timeout: float,
) -> Celery:
    """A Celery app whose broker, result backend and ledger all live at ``redis_url``."""
    app = Celery(main, broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        worker_conf(
            queue=queue, control_exchange=control_exchange, visibility_timeout=visibility_timeout
        )
    )
    return app


def _env(name: str) -> str:
    value = os.environ.get(ENV_PREFIX + name)
    if not value:
        raise RuntimeError(
            f"tests.soak.app is configured through environment variables; "
            f"missing {ENV_PREFIX}{name}"
        )
    return value


def app_from_env() -> Celery:
    """The app described by the ``SOAK_*`` environment (see harness.worker_env)."""
    return make_app(
        main=_env("APP_NAME"),
        redis_url=_env("REDIS_URL"),
        queue=_env("QUEUE"),
        control_exchange=_env("CONTROL_EXCHANGE"),
        visibility_timeout=float(_env("VISIBILITY_TIMEOUT")),
    )
