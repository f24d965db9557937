"""Never silently not durable: `cancel` warns, ``celery cancel`` prints (issue 19).

An app whose result backend and broker keep no ledger (RabbitMQ and the
``rpc://`` backend, with no ``cancellable_ledger_url``) can only reach the
workers that are online.  `cancel` says so with a `NotDurableWarning`, once
per process and app; ``celery cancel`` prints the same line.  A durable app
(Redis), and an app that set ``cancellable_ledger_url = "none"`` on purpose,
are not warned.  Real RabbitMQ (the loopback server, a private control
exchange per app) and real Redis (DB 12); the CLI runs as a subprocess.  The
worker's start line is shown in ``tests/integration/test_redis_spellings.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from tests import redis_dbs

import cancellable.celery as cc

AMQP_URL = os.environ.get("CIT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = redis_dbs.url(redis_dbs.UNIT_DB)


def private_app(broker: str, backend: str, **conf: object) -> Celery:
    """A Celery app with a private name and control exchange."""
    name = f"nd-{uuid.uuid4().hex[:8]}"
    app = Celery(name, broker=broker, backend=backend, set_as_current=False)
    app.conf.control_exchange = name
    app.conf.broker_connection_retry_on_startup = False
    app.conf.update(conf)
    return app


@pytest.fixture(name="apps")
def apps_fixture() -> Iterator[list[Celery]]:
    """Apps made by the test, closed afterwards."""
    made: list[Celery] = []
    yield made
    for app in made:
        app.close()


def not_durable_warnings(app: Celery, task_id: str) -> list[str]:
    """The `NotDurableWarning` messages one `cancel` call issues."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cc.cancel(task_id, reason="r", app=app)
    return [str(w.message) for w in caught if issubclass(w.category, cc.NotDurableWarning)]


def test_cancel_warns_once_per_process_and_app(apps: list[Celery]) -> None:
    """The first `cancel` on a RabbitMQ + rpc:// app warns that it is not durable,
    and why; a second call on the same app does not; another such app is warned
    once too."""
    first = private_app(AMQP_URL, "rpc://")
    second = private_app(AMQP_URL, "rpc://")
    apps.extend([first, second])

    with pytest.warns(cc.NotDurableWarning) as caught:
        cc.cancel("nd-1", reason="r", app=first)
    again = not_durable_warnings(first, "nd-2")
    other = not_durable_warnings(second, "nd-3")

    assert 1 == len([w for w in caught if issubclass(w.category, cc.NotDurableWarning)])
    message = str(caught[0].message)
    assert f"cancellations of app {first.main!r} are not durable" in message
    assert "only workers online now receive them" in message
    assert "RPCBackend" in message  # why: neither the backend ...
    assert "amqp://" in message  # ... nor the broker keeps a ledger
    assert "cancellable_ledger_url" in message
    assert [] == again
    assert 1 == len(other)


def test_durable_apps_and_an_explicit_none_are_not_warned(
    apps: list[Celery], rdb: redis.Redis
) -> None:
    """A Redis app (durable) is never warned; nor is an app that set
    ``cancellable_ledger_url = "none"`` (it chose online-only cancellation)."""
    durable = private_app(REDIS_URL, REDIS_URL)
    chosen = private_app(AMQP_URL, "rpc://", cancellable_ledger_url="none")
    apps.extend([durable, chosen])

    assert [] == not_durable_warnings(durable, "nd-4")
    assert [] == not_durable_warnings(chosen, "nd-5")


def run_cli(tmp_path: Path, app_source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A cli_app cancel ARGS`` in a subprocess (``cli_app`` from ``app_source``)."""
    (tmp_path / "cli_app.py").write_text("from celery import Celery\n" + app_source)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "cli_app", "cancel", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )


def test_celery_cancel_prints_that_it_is_not_durable(tmp_path: Path) -> None:
    """``celery cancel`` on a RabbitMQ + rpc:// app prints the not-durable line
    (once, on stderr, with why) and still cancels; on a Redis app it prints none."""
    name = f"nd-cli-{uuid.uuid4().hex[:8]}"
    source = (
        f"app = Celery({name!r}, broker={AMQP_URL!r}, backend='rpc://')\n"
        f"app.conf.control_exchange = {name!r}\n"
    )
    durable_source = (
        f"app = Celery({name!r}, broker={REDIS_URL!r}, backend={REDIS_URL!r})\n"
        f"app.conf.control_exchange = {name!r}\n"
    )

    run = run_cli(tmp_path, source, "some-id", "--timeout", "0.3", "--wait", "0")
    durable = run_cli(tmp_path, durable_source, "other-id", "--timeout", "0.3", "--wait", "0")

    lines = [line for line in run.stderr.splitlines() if "not durable" in line]
    assert 1 == len(lines), run.stderr
    assert lines[0].startswith(f"warning: cancellations of app {name!r} are not durable")
    assert "RPCBackend" in lines[0]
    assert "some-id: unknown" in run.stdout, run.stdout + run.stderr
    assert "not durable" not in durable.stderr, durable.stderr
    assert "other-id: unknown" in durable.stdout, durable.stdout + durable.stderr
