"""`cancel()` returns or raises within its bound, whatever the broker or ledger does.

Issue 18, point 1.

A hung server is a private ``redis-server`` of the test's own that the test
``SIGSTOP`` s: it keeps its port and its connections and answers nothing, as
a paused VM or a partition after the connection was made.  The shared
servers are never touched.  Each call runs on a thread the test joins with a
generous bound, so a call that hangs (as on main) fails the test instead of
hanging the suite.  The ledger and the result backend live on the unit
tests' Redis (DB 12) unless a test says otherwise.  What a worker does with
a cancellation that was recorded but not broadcast is shown on a real
worker in ``tests/integration/test_cancel_bounds.py``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from tests.test_celery_client import REDIS_URL, Broadcasts, PrivateRedis, private_app, recorded

import cancellable.celery as cc
from cancellable.celery._runtime import runtime

#: What the machine's load may add to a bound (2 cores shared by parallel suites).
SLACK = 1.5


class StoppableRedis(PrivateRedis):
    """A private redis-server that the test can SIGSTOP and SIGCONT."""

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.resume()
        super().kill()


@pytest.fixture(name="server")
def server_fixture() -> Iterator[StoppableRedis]:
    """A private redis-server, resumed and killed at teardown."""
    server = StoppableRedis()
    yield server
    server.kill()


class Outcome:
    """What one `cancel` call on a thread did: its result or error, warnings, and time."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.warnings: list[warnings.WarningMessage] = []
        self.seconds: float | None = None

    def warned(self, category: type[Warning]) -> bool:
        return any(issubclass(w.category, category) for w in self.warnings)


def timed_cancel(call: Callable[[], Any], bound: float = 30.0) -> Outcome:
    """Run ``call`` on a thread; fail if it has not returned within ``bound`` seconds."""
    outcome = Outcome()

    def run() -> None:
        began = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
            except BaseException as exc:
                outcome.error = exc
        outcome.warnings = list(caught)
        outcome.seconds = time.monotonic() - began

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"cancel() was still blocked after {bound} s"
    return outcome


@pytest.fixture(name="app_on")
def app_on_fixture(rdb: redis.Redis) -> Iterator[Callable[..., Celery]]:
    """``app_on(broker_url, **conf)``: a private app on that broker, closed at teardown."""
    apps: list[Celery] = []

    def make(broker: str, **conf: Any) -> Celery:
        app = private_app(broker)
        app.conf.update(conf)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


class TestAStoppedBroker:
    """The broker stops answering: `BrokerUnavailableError` within one broker wait, nothing done."""

    @pytest.mark.parametrize("connection", ["cold", "warm", "after an error"])
    def test_raises_within_the_bound_and_records_nothing(
        self, app_on: Callable[..., Celery], server: StoppableRedis, connection: str
    ) -> None:
        """With the broker stopped, ``cancel()`` raises `BrokerUnavailableError`
        (``maybe_sent`` False) in about 2 s (a third of the default 6 s bound),
        and nothing is recorded: on a connection never opened ("cold": on main,
        kombu's channel ``PING`` blocked until the server answered), on a pooled
        one that worked before ("warm"), and on the call after a
        `BrokerUnavailableError` ("after an error": on main, always the cold
        path).  Once the server answers again, the next call succeeds."""
        app = app_on(server.url)
        if connection == "warm":
            cc.cancel("before", "warm the pool", app=app)
        server.pause()
        if connection == "after an error":
            first = timed_cancel(lambda: cc.cancel("first", "stopped", app=app))
            assert isinstance(first.error, cc.BrokerUnavailableError)

        outcome = timed_cancel(lambda: cc.cancel("stopped", "while the broker is stopped", app=app))
        server.resume()
        after = timed_cancel(lambda: cc.cancel("resumed", "after it resumed", app=app))

        assert isinstance(outcome.error, cc.BrokerUnavailableError), outcome.error
        assert outcome.error.maybe_sent is False
        assert "nothing was cancelled" in str(outcome.error)
        assert outcome.seconds is not None
        assert outcome.seconds < 2.0 + SLACK, outcome.seconds
        ids = [t for e in recorded(app) for _, t in e.targets]
        assert "stopped" not in ids
        assert after.error is None, after.error
        assert "resumed" in [t for e in recorded(app) for _, t in e.targets]

    def test_a_shorter_cancel_timeout_is_honoured(
        self, app_on: Callable[..., Celery], server: StoppableRedis
    ) -> None:
        """``cancellable_cancel_timeout=0.9``: each broker wait is 0.3 s, and a
        stopped broker makes ``cancel()`` raise well within the 0.9 s."""
        app = app_on(server.url, cancellable_cancel_timeout=0.9)
        cc.cancel("before", "warm the pool", app=app)
        server.pause()

        outcome = timed_cancel(lambda: cc.cancel("stopped", "short bound", app=app))

        assert isinstance(outcome.error, cc.BrokerUnavailableError), outcome.error
        assert outcome.seconds is not None
        assert outcome.seconds < 0.9 + SLACK / 2, outcome.seconds


class TestAStoppedLedger:
    """The ledger stops answering: the broadcast still goes out, with a warning, in time."""

    def test_broadcasts_and_warns_within_the_bound(
        self, app_on: Callable[..., Celery], server: StoppableRedis
    ) -> None:
        """Broker up, ledger on a stopped server: ``cancel()`` returns within the
        ledger's wait plus the broadcast, warns `LedgerUnavailableWarning`, and
        the revoke reaches the control exchange."""
        app = app_on(REDIS_URL, cancellable_ledger_url=server.url)
        listener = Broadcasts(app)
        try:
            server.pause()
            outcome = timed_cancel(lambda: cc.cancel("ledger-stopped", "stop", app=app))
            body = listener.get()
        finally:
            listener.close()

        assert outcome.error is None, outcome.error
        assert outcome.warned(cc.LedgerUnavailableWarning)
        assert outcome.seconds is not None
        assert outcome.seconds < 6.0 + SLACK, outcome.seconds
        assert ["ledger-stopped"] == body["arguments"]["task_id"]


class TestAStoppedResultBackend:
    """The result backend stops answering: the state reads cost at most one broker wait."""

    def test_cancels_within_the_bound(
        self, app_on: Callable[..., Celery], server: StoppableRedis
    ) -> None:
        """Broker and ledger up, result backend on a stopped server: the reads
        of the given tasks' states (which tell a finished task) are abandoned
        after one broker wait, and ``cancel()`` records and broadcasts the
        cancellation within its bound (before the reads were bounded, it
        waited for Celery's backend client, 120 s)."""
        app = app_on(REDIS_URL, cancellable_ledger_url=REDIS_URL)
        app.conf.result_backend = server.url
        app.conf.redis_socket_timeout = 120
        listener = Broadcasts(app)
        try:
            server.pause()
            outcome = timed_cancel(lambda: cc.cancel("backend-stopped", "stop", app=app))
            body = listener.get()
        finally:
            listener.close()

        assert outcome.error is None, outcome.error
        assert outcome.seconds is not None
        assert outcome.seconds < 6.0 + SLACK, outcome.seconds
        assert ["backend-stopped"] == body["arguments"]["task_id"]
        assert "backend-stopped" in [t for e in recorded(app) for _, t in e.targets]


class TestTheBrokerStopsBetweenTheCheckAndTheBroadcast:
    """The check passed, then the broker stopped: the broadcast's own publish is bounded."""

    @staticmethod
    def stop_after_recording(app: Celery, server: StoppableRedis) -> None:
        # The ledger is real; the broker is stopped right after it recorded,
        # which is the window between the broker check and the broadcast.
        ledger = runtime().ledgers.get(app)
        original = ledger.record

        def record(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            server.pause()

        ledger.record = record  # type: ignore[method-assign]

    def test_recorded_but_not_broadcast_warns(
        self, app_on: Callable[..., Celery], server: StoppableRedis
    ) -> None:
        """With the cancellation recorded in the ledger, a broadcast that times out
        is a `BroadcastFailedWarning` (workers apply it at their next ledger
        read), within the bound, and the entry is in the ledger.  On main the
        publish retried for ever (kombu's ``retry=True`` without a policy)."""
        app = app_on(server.url)
        cc.cancel("before", "warm the pool", app=app)
        self.stop_after_recording(app, server)
        task_id = str(uuid.uuid4())

        outcome = timed_cancel(lambda: cc.cancel(task_id, "recorded, not sent", app=app))
        server.resume()

        assert outcome.error is None, outcome.error
        assert outcome.warned(cc.BroadcastFailedWarning)
        assert outcome.seconds is not None
        assert outcome.seconds < 6.0 + SLACK, outcome.seconds
        assert task_id in [t for e in recorded(app) for _, t in e.targets]

    def test_neither_recorded_nor_broadcast_raises(
        self, app_on: Callable[..., Celery], server: StoppableRedis
    ) -> None:
        """With no durable ledger (``"none"``) there is nothing to fall back on: a
        broadcast that times out raises `BrokerUnavailableError` with
        ``maybe_sent`` True, within the bound."""
        app = app_on(server.url, cancellable_ledger_url="none")
        cc.cancel("before", "warm the pool", app=app)
        self.stop_after_recording(app, server)

        outcome = timed_cancel(lambda: cc.cancel("lost", "not durable, not sent", app=app))
        server.resume()

        assert isinstance(outcome.error, cc.BrokerUnavailableError), outcome.error
        assert outcome.error.maybe_sent is True
        assert "may or may not" in str(outcome.error)
        assert outcome.seconds is not None
        assert outcome.seconds < 6.0 + SLACK, outcome.seconds


_PROXY = """
import socket, sys, threading
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        a.close(); b.close()
while True:
    client, _ = listener.accept()
    upstream = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
"""


@pytest.fixture(name="rabbit_proxy")
def rabbit_proxy_fixture() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A TCP proxy process of the test's own to the shared RabbitMQ (5672), on a free port.

    ``SIGSTOP`` of the proxy makes a hung broker without touching the shared one.
    """
    proxy = subprocess.Popen(
        [sys.executable, "-c", _PROXY, "5672"], stdout=subprocess.PIPE, text=True
    )
    assert proxy.stdout is not None
    port = int(proxy.stdout.readline())
    try:
        yield proxy, port
    finally:
        proxy.send_signal(signal.SIGCONT)
        proxy.kill()
        proxy.wait(10)


class TestAStoppedRabbitMQ:
    """RabbitMQ (through a proxy the test stops) stops answering after ``cancel()`` used it."""

    def test_a_warm_connection_raises_within_the_bound(
        self,
        app_on: Callable[..., Celery],
        rabbit_proxy: tuple[subprocess.Popen[str], int],
    ) -> None:
        """With the pool's AMQP connection already open and the broker then hung,
        ``cancel()`` raises `BrokerUnavailableError` (``maybe_sent`` False) in about
        2 s and records nothing; once it answers again the next call succeeds.
        (Before: the check made no round trip on a pooled AMQP connection and the
        publish only filled the socket's buffer, so ``cancel()`` returned at once,
        without a warning, while the broker answered nothing.)"""
        proxy, port = rabbit_proxy
        app = app_on(f"amqp://guest:guest@127.0.0.1:{port}//")
        cc.cancel("before", "warm the pool", app=app)
        proxy.send_signal(signal.SIGSTOP)
        try:
            outcome = timed_cancel(lambda: cc.cancel("stopped", "broker hung", app=app))
        finally:
            proxy.send_signal(signal.SIGCONT)
        after = timed_cancel(lambda: cc.cancel("resumed", "after it resumed", app=app))

        assert isinstance(outcome.error, cc.BrokerUnavailableError), outcome.error
        assert outcome.error.maybe_sent is False
        assert outcome.seconds is not None
        assert outcome.seconds < 2.0 + SLACK, outcome.seconds
        ids = [t for e in recorded(app) for _, t in e.targets]
        assert "stopped" not in ids
        assert after.error is None, after.error
        assert "resumed" in [t for e in recorded(app) for _, t in e.targets]
