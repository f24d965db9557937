"""Durability on every Redis spelling Celery accepts: TLS Redis and Sentinel.

Each deployment runs on servers this module starts on free ports
(`tests.redis_servers`): a redis-server that speaks TLS only, with a test CA
and server certificate made here with ``openssl``; and a password-protected
master watched by two password-protected ``redis-server --sentinel``.

Deployments (the ledger comes from a different place in each):

``tls-url``
    RabbitMQ broker; ``cancellable_ledger_url = "rediss://...?ssl_cert_reqs=
    CERT_REQUIRED&ssl_ca_certs=..."``, the spelling Celery's docs give (it
    failed in redis-py before).
``tls-settings``
    Redis over TLS as broker (``broker_use_ssl``) and result backend
    (``redis_backend_use_ssl``, upper-case ``CERT_REQUIRED``), with
    ``result_backend_transport_options.global_keyprefix``: the ledger is the
    result backend's, its stream under the prefix.
``sentinel-url``
    RabbitMQ broker; ``cancellable_ledger_url = "sentinel://...;sentinel://..."``
    with ``master_name`` and the sentinels' password from
    ``result_backend_transport_options``.
``sentinel-backend``
    RabbitMQ broker; Celery's Sentinel result backend (``sentinel://``): the
    ledger is on its master.

(Task bodies still report that they started to the harness's Redis: that is
the test's observation channel, not part of the app.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.redis_servers import (
    SentinelDeployment,
    TlsServer,
    make_ca,
    sentinel_deployment,
    tls_server,
)

from .conftest import APP_NAME, Keys, Worker, assert_revoked, wait_for, wait_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

DEPLOYMENTS = ["tls-url", "tls-settings", "sentinel-url", "sentinel-backend"]
KEYPREFIX = "tenant-a:"
LEDGER_KEY = f"cancellable:{APP_NAME}:ledger"


@pytest.fixture(name="tls", scope="module")
def tls_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A private TLS-only redis-server for this module."""
    with tls_server(tmp_path_factory.mktemp("tls-redis")) as server:
        yield server


@pytest.fixture(name="sentinel", scope="module")
def sentinel_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    """A private master and two sentinels for this module."""
    with sentinel_deployment(tmp_path_factory.mktemp("sentinel")) as deployment:
        yield deployment


def _ledger_reader(request: pytest.FixtureRequest, name: str) -> redis.Redis:
    if name.startswith("tls"):
        tls: TlsServer = request.getfixturevalue("tls")
        return tls.client(2)
    sentinel: SentinelDeployment = request.getfixturevalue("sentinel")
    return sentinel.master(3)


@pytest.fixture(name="deployment")
def deployment_fixture(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``make_worker`` keyword arguments for the deployment, plus ``ledger`` (a
    test-side client of the ledger's database) and ``key`` (its stream)."""
    name = request.param
    ledger = _ledger_reader(request, name)
    ledger.flushdb()
    key = LEDGER_KEY
    if name == "tls-url":
        tls: TlsServer = request.getfixturevalue("tls")
        url = tls.url(2, ssl_cert_reqs="CERT_REQUIRED", ssl_ca_certs=str(tls.ca))
        config: dict[str, Any] = {
            "broker": "rabbitmq",
            "settings": {"cancellable_ledger_url": url},
        }
    elif name == "tls-settings":
        tls = request.getfixturevalue("tls")
        tls.client(1).flushdb()
        config = {
            "broker": "redis",
            "broker_url": tls.url(1),
            "backend_url": tls.url(2),
            "settings": {
                "broker_use_ssl": {"ssl_cert_reqs": "required", "ssl_ca_certs": str(tls.ca)},
                "redis_backend_use_ssl": {
                    "ssl_cert_reqs": "CERT_REQUIRED",
                    "ssl_ca_certs": str(tls.ca),
                },
                "result_backend_transport_options": {"global_keyprefix": KEYPREFIX},
            },
        }
        key = KEYPREFIX + LEDGER_KEY
    elif name == "sentinel-url":
        sentinel: SentinelDeployment = request.getfixturevalue("sentinel")
        config = {
            "broker": "rabbitmq",
            "settings": {
                "cancellable_ledger_url": sentinel.url(3),
                "result_backend_transport_options": sentinel.transport_options(),
            },
        }
    else:
        sentinel = request.getfixturevalue("sentinel")
        config = {
            "broker": "rabbitmq",
            "backend_url": sentinel.url(3),
            "settings": {"result_backend_transport_options": sentinel.transport_options()},
        }
    return {**config, "ledger": ledger, "key": key}


def make(make_worker: Any, deployment: dict[str, Any], **kwargs: Any) -> Worker:
    """A worker of the deployment (not started)."""
    options = {k: v for k, v in deployment.items() if k not in ("ledger", "key")}
    return make_worker(start=False, **options, **kwargs)


def wait_queued(worker: Worker, count: int) -> None:
    """On RabbitMQ, wait until ``count`` messages wait in the worker's queue."""
    if worker.broker == "rabbitmq":
        wait_for(lambda: worker.queue_length() == count, 10, message=f"{count} queued tasks")


def cancel_quietly(task_id: str, reason: str, worker: Worker) -> None:
    """`cancel` and assert it issued no warning (not durable, ledger unavailable ...)."""
    from cancellable.celery import cancel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cancel(task_id, reason=reason, app=worker.app)

    # (A ResourceWarning is the garbage collector closing another test's socket.)
    assert [] == [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)]


def ledger_naming(deployment: dict[str, Any], task_id: str) -> int:
    """How many entries of the ledger stream (at its key, prefix included) name ``task_id``."""
    rows = deployment["ledger"].xrange(deployment["key"])
    return sum(f"task:{task_id}".encode() in fields[b"targets"].split(b"\n") for _, fields in rows)


def assert_durable_start(worker: Worker, deployment: dict[str, Any]) -> None:
    """The worker said where its cancellations are kept (the stream, durable), and
    logged no not-durable or ledger-unavailable event."""
    log = worker.log_path.read_text(errors="replace")
    for event in ("ledger.not_durable", "ledger.unavailable", "ledger.poll_failed"):
        assert event not in log, f"{event} in {worker.name}'s log\n{worker.tail()}"
    lines = [line for line in log.splitlines() if "ledger.in_use" in line]
    assert 1 == len(lines), worker.tail()
    assert deployment["key"] in lines[0], lines[0]
    assert "durable=True" in lines[0], lines[0]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
def test_cancelled_while_no_worker_is_online_never_runs(
    make_worker: Any, keys: Keys, deployment: dict[str, Any]
) -> None:
    """A task sent and cancelled (with a reason) while no worker is online: the
    worker that starts later never runs it, and it ends REVOKED with the reason.
    A second, uncancelled task in the same queue proves the worker consumed it;
    the cancellation is an entry of the stream on the TLS or Sentinel server (at
    the prefixed key where a global_keyprefix is set), and nobody warned."""
    worker = make(make_worker, deployment)
    cancelled = worker.send("cit.loop", keys.key("cancelled"), 1.0)
    control = worker.send("cit.loop", keys.key("control"), 1.0)
    wait_queued(worker, 2)

    cancel_quietly(cancelled.id, "cancelled while offline", worker)
    entries = ledger_naming(deployment, cancelled.id)
    worker.start()

    assert 1 == entries
    assert "done" == control.get(timeout=40)
    assert_revoked(cancelled, "cancelled while offline", timeout=30)
    assert [] == keys.started("cancelled"), "the cancelled task ran"
    assert_durable_start(worker, deployment)


# The restart case on the two spellings the ledger's own parser reads (the
# other two are Celery's result backend client, exercised above): 4 workers
# fewer in a suite near its time budget.
@pytest.mark.parametrize("deployment", ["tls-url", "sentinel-url"], indirect=True)
def test_cancelled_between_worker_restarts_never_runs(
    make_worker: Any, keys: Keys, deployment: dict[str, Any]
) -> None:
    """A worker runs a task and stops; a task is sent and cancelled while it is
    down; a new worker on the same queue starts: the cancelled task never runs
    and ends REVOKED with the reason, while the task sent beside it runs."""
    first = make(make_worker, deployment)
    first.start()
    assert "done" == first.send("cit.loop", keys.key("before"), 0.1).get(timeout=40)
    first.stop()

    cancelled = first.send("cit.loop", keys.key("cancelled"), 1.0)
    control = first.send("cit.loop", keys.key("control"), 1.0)
    wait_queued(first, 2)
    cancel_quietly(cancelled.id, "cancelled between restarts", first)
    second = make(make_worker, deployment, queue=first.queue)
    second.start()

    assert "done" == control.get(timeout=40)
    assert_revoked(cancelled, "cancelled between restarts", timeout=30)
    assert "REVOKED" == wait_state(cancelled, "REVOKED", 1)
    assert [] == keys.started("cancelled"), "the cancelled task ran"
    assert_durable_start(first, deployment)
    assert_durable_start(second, deployment)


def test_cert_required_with_a_wrong_ca_is_refused_with_one_message_naming_the_setting(
    make_worker: Any, tls: TlsServer, tmp_path: Path
) -> None:
    """``ssl_cert_reqs=CERT_REQUIRED`` with a CA that did not sign the server's
    certificate: the TLS handshake is refused.  The worker's log says so once
    at start (``ledger.unavailable``) and ``cancel()`` warns
    (`LedgerUnavailableWarning`), both naming ``cancellable_ledger_url``, the
    server and the TLS options to check.  (The poller repeats the log line,
    throttled, while it lasts.)"""
    from cancellable.celery import LedgerUnavailableWarning, cancel

    wrong = make_ca(tmp_path / "wrong-ca", "wrong")
    url = tls.url(2, ssl_cert_reqs="CERT_REQUIRED", ssl_ca_certs=str(wrong))
    worker = make_worker(broker="rabbitmq", settings={"cancellable_ledger_url": url})

    with pytest.warns(LedgerUnavailableWarning) as caught:
        cancel("some-task-id", reason="r", app=worker.app)

    message = str(caught[0].message)
    for text in ("cancellable_ledger_url", f"127.0.0.1:{tls.port}", "CERTIFICATE_VERIFY_FAILED"):
        assert text in message, message
    assert "ssl_ca_certs" in message, message
    log = worker.log_path.read_text(errors="replace")
    at_start = [
        line
        for line in log.splitlines()
        if "ledger.unavailable" in line and "during='worker start'" in line
    ]
    assert 1 == len(at_start), worker.tail()
    assert "cancellable_ledger_url" in at_start[0], at_start[0]
    assert "ssl_ca_certs" in at_start[0], at_start[0]
    assert "CERTIFICATE_VERIFY_FAILED" in at_start[0], at_start[0]


def test_a_worker_without_a_durable_store_says_so_in_one_line_at_start(make_worker: Any) -> None:
    """A worker on RabbitMQ with the ``rpc://`` result backend and no
    ``cancellable_ledger_url`` has nowhere durable to keep cancellations: its
    log says so in one WARNING line at start (``ledger.in_use``, "not durable:
    online workers only" and why), never silently."""
    worker = make_worker(broker="rabbitmq", backend_url="rpc://")
    worker.stop()

    log = worker.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "ledger.in_use" in line]
    assert 1 == len(lines), worker.tail()
    assert "WARNING" in lines[0].upper(), lines[0]
    assert "durable=False" in lines[0], lines[0]
    assert "not durable: online workers only" in lines[0], lines[0]
    assert "RPCBackend" in lines[0], lines[0]
