"""The Redis ledger on every Redis spelling Celery accepts (issue 19), against real servers.

A private TLS redis-server (test CA made with ``openssl``) and a private
Sentinel deployment (a master and two sentinels, all with passwords) are
started once for the module (`tests.redis_servers`).  Each test builds the
app's ledger as a worker or `cancel` would (``Ledgers().get(app)``),
records and reads through it, and looks at the server with a client of its
own.  Workers on these deployments: ``tests/integration/test_redis_spellings.py``.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from tests.redis_servers import SentinelDeployment, TlsServer, sentinel_deployment, tls_server

from cancellable import CancelReason
from cancellable.celery import SettingError, _ledger

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(name="tls", scope="module")
def tls_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A private TLS-only redis-server."""
    with tls_server(tmp_path_factory.mktemp("tls")) as server:
        yield server


@pytest.fixture(name="sentinel", scope="module")
def sentinel_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    """A private master and two sentinels."""
    with sentinel_deployment(tmp_path_factory.mktemp("sentinel")) as deployment:
        yield deployment


def app_with(broker: str, backend: str, **conf: Any) -> Celery:
    """An app with a private name and ``conf``."""
    app = Celery(f"spell-{uuid.uuid4().hex[:8]}", broker=broker, backend=backend)
    app.conf.update(conf)
    return app


def round_trip(app: Celery) -> _ledger.Ledger:
    """The app's ledger, after one record read back through it."""
    ledger = _ledger.Ledgers().get(app)
    ledger.record([("task", "t1")], CancelReason("manual", "spelled"))
    entries, _ = ledger.read(None)
    assert [(("task", "t1"),)] == [e.targets for e in entries]
    assert ledger.durable
    return ledger


@pytest.mark.parametrize(
    "reqs", ["CERT_REQUIRED", "CERT_OPTIONAL", "CERT_NONE", "required", "optional", "none"]
)
def test_every_ssl_cert_reqs_spelling_in_a_rediss_url(tls: TlsServer, reqs: str) -> None:
    """``cancellable_ledger_url = "rediss://...?ssl_cert_reqs=<reqs>&ssl_ca_certs=..."``
    in each of Celery's six spellings records and reads on the TLS server (the
    upper-case ones failed in redis-py before: "Invalid SSL Certificate
    Requirements Flag")."""
    url = tls.url(4, ssl_cert_reqs=reqs, ssl_ca_certs=str(tls.ca))
    app = app_with(AMQP_URL, "rpc://", cancellable_ledger_url=url)

    round_trip(app)

    assert tls.client(4).xlen(f"cancellable:{app.main}:ledger") == 1


def test_a_rediss_broker_with_broker_use_ssl_and_a_global_keyprefix(tls: TlsServer) -> None:
    """The ledger found on the broker (``rediss://`` with ``broker_use_ssl`` as an
    ``ssl.CERT_REQUIRED`` dict, no ledger in the result backend) keeps its
    stream under ``broker_transport_options.global_keyprefix``, as kombu keeps
    the broker's keys; ``socket_timeout`` of 30 s there is bounded to 2 s."""
    app = app_with(
        tls.url(5),
        "rpc://",
        broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tls.ca)},
        broker_transport_options={"global_keyprefix": "tenant-b:", "socket_timeout": 30},
    )

    ledger = round_trip(app)

    assert 1 == tls.client(5).xlen(f"tenant-b:cancellable:{app.main}:ledger")
    assert f"'tenant-b:cancellable:{app.main}:ledger'" in ledger.where  # type: ignore[attr-defined]
    kwargs = ledger._client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    assert 2.0 == kwargs["socket_timeout"]


def test_a_sentinel_broker_with_master_name_and_passwords(sentinel: SentinelDeployment) -> None:
    """``broker_url = "sentinel://:pw@h:p1/6;sentinel://:pw@h:p2/6"`` with
    ``master_name`` and the sentinels' password in ``broker_transport_options``
    (kombu's spelling): the ledger asks the sentinels for the master and writes
    on it."""
    app = app_with(sentinel.url(6), "rpc://", broker_transport_options=sentinel.transport_options())

    ledger = round_trip(app)

    assert 1 == sentinel.master(6).xlen(f"cancellable:{app.main}:ledger")
    assert "sentinel://127.0.0.1:" in ledger.where  # type: ignore[attr-defined]


def test_a_result_backend_global_keyprefix_is_applied_as_celery_does(tls: TlsServer) -> None:
    """A Redis result backend's ``result_backend_transport_options.global_keyprefix``
    without a separator gets Celery's ``_``: the ledger's stream sits beside the
    backend's own prefixed keys."""
    app = app_with(
        AMQP_URL,
        tls.url(7, ssl_cert_reqs="required", ssl_ca_certs=str(tls.ca)),
        result_backend_transport_options={"global_keyprefix": "tenant-c"},
    )

    round_trip(app)

    assert 1 == tls.client(7).xlen(f"tenant-c_cancellable:{app.main}:ledger")


@pytest.mark.parametrize(
    ("url", "conf", "words"),
    [
        ("rediss://127.0.0.1:1/0?ssl_cert_reqs=CERT_MAYBE", {}, "ssl_cert_reqs must be"),
        ("redis://127.0.0.1:1/0?ssl_ca_certs=/x", {}, "use rediss:// for TLS"),
        ("sentinel://127.0.0.1:1/0", {}, "needs master_name"),
    ],
)
def test_a_bad_redis_spelling_is_one_message_naming_the_setting(
    url: str, conf: dict[str, Any], words: str
) -> None:
    """A ``cancellable_ledger_url`` the ledger cannot use (an unknown
    ``ssl_cert_reqs``, TLS options on ``redis://``, Sentinel without
    ``master_name``) is refused before any connection, with one message that
    names the setting and says what is wrong."""
    app = app_with(AMQP_URL, "rpc://", cancellable_ledger_url=url, **conf)

    with pytest.raises((SettingError, ValueError)) as caught:
        _ledger.Ledgers().get(app)

    assert "cancellable_ledger_url" in str(caught.value)
    assert words in str(caught.value)


def test_several_urls_must_all_be_sentinels(tmp_path: Path) -> None:
    """``redis://a;redis://b`` is refused by the setting's check, naming it."""
    app = app_with(AMQP_URL, "rpc://", cancellable_ledger_url="sentinel://h:1;redis://h:2")

    with pytest.raises(SettingError, match="cancellable_ledger_url"):
        _ledger.Ledgers().get(app)
