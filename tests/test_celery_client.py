"""The client side (`cancellable.celery._client`): `cancel`, `configure`, the ledger, the CLI.

Real Redis (DB 12, flushed per test) and a real broker: the broadcast that
`cancel` sends is read back from the broker's fanout exchange by a kombu
consumer, not assumed.  The broker-outage test starts its own private
``redis-server`` and kills it; the shared server is never touched.  Worker
behaviour is proven in ``tests/integration``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Exchange, Queue
from structlog.testing import capture_logs
from tests import redis_dbs
from tests.helpers import run_python

import cancellable.celery as cc
from cancellable import CancelReason
from cancellable.celery import _client, _ledger
from cancellable.celery._runtime import WorkerRuntime, runtime

REDIS_URL = redis_dbs.url(redis_dbs.UNIT_DB)


def private_app(broker: str, backend: str = REDIS_URL) -> Celery:
    """A Celery app with a private name and control exchange."""
    name = f"capi-{uuid.uuid4().hex[:8]}"
    app = Celery(name, broker=broker, backend=backend, set_as_current=False)
    app.conf.control_exchange = name
    app.conf.broker_connection_retry_on_startup = False
    return app


@pytest.fixture(name="app")
def app_fixture(rdb: redis.Redis) -> Iterator[Celery]:
    """A Celery app on Redis DB 12 (broker, backend and so ledger)."""
    app = private_app(REDIS_URL)
    yield app
    app.close()


def recorded(app: Celery) -> list[_ledger.Entry]:
    """Everything the app's ledger holds, read from the start."""
    entries, _ = runtime().ledgers.get(app).read(None)
    return entries


class Broadcasts:
    """Reads what was broadcast on an app's control (pidbox) exchange.

    Redis implements fanout with pub/sub, so the listener must be subscribed
    before the broadcast is sent: the constructor drains once to subscribe.
    """

    def __init__(self, app: Celery) -> None:
        self._conn = Connection(app.conf.broker_url)
        exchange = Exchange(f"{app.conf.control_exchange}.pidbox", type="fanout")
        queue = Queue(f"listener-{uuid.uuid4().hex}", exchange, auto_delete=True)
        self._bodies: list[dict[str, Any]] = []
        self._consumer = Consumer(
            self._conn, [queue], callbacks=[self._on_message], accept=["json"]
        )
        self._consumer.consume()
        self._drain(0.2)

    def _on_message(self, body: dict[str, Any], message: Any) -> None:
        self._bodies.append(body)

    def _drain(self, timeout: float) -> None:
        with contextlib.suppress(socket.timeout, TimeoutError):
            self._conn.drain_events(timeout=timeout)

    def get(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next broadcast body; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._bodies and time.monotonic() < deadline:
            self._drain(0.1)
        assert self._bodies, "no broadcast arrived"
        return self._bodies.pop(0)

    def everything(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Every broadcast body that arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain(0.1)
        bodies, self._bodies = self._bodies, []
        return bodies

    def close(self) -> None:
        """Stop consuming and drop the connection."""
        with contextlib.suppress(Exception):
            self._consumer.cancel()
        self._conn.close()


@pytest.fixture(name="broadcasts")
def broadcasts_fixture(app: Celery) -> Iterator[Broadcasts]:
    """A listener bound to the app's control exchange before the test acts."""
    listener = Broadcasts(app)
    yield listener
    listener.close()


class PrivateRedis:
    """A ``redis-server`` of this test's own, on a free port, that the test may kill."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # pragma: no cover - depends on the machine
            pytest.fail("redis-server is not on PATH")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.kill()
                    pytest.fail(f"private redis-server on port {self.port} did not start")
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        """Kill the server and wait until it is gone."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture(name="private_redis")
def private_redis_fixture() -> Iterator[PrivateRedis]:
    """A private redis-server, killed at teardown if the test has not killed it."""
    server = PrivateRedis()
    yield server
    server.kill()


def counting(calls: list[Any], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, recording the arguments of each call in ``calls``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return function(*args, **kwargs)

    return wrapper


class TestCancel:
    """`cancellable.celery.cancel`: what it records and what it sends."""

    def test_records_and_broadcasts_the_reason(self, app: Celery, broadcasts: Broadcasts) -> None:
        """The ledger holds the reason and a standard revoke carries it."""
        task_id = str(uuid.uuid4())

        reason = cc.cancel(task_id, "user pressed stop", requested_by="alice", app=app).reason
        body = broadcasts.get()
        entries = recorded(app)

        assert (
            CancelReason(
                source="revoked",
                message="user pressed stop",
                requested_by="alice",
                requested_at=reason.requested_at,
            )
            == reason
        )
        assert "revoke" == body["method"]
        assert [task_id] == body["arguments"]["task_id"]
        assert False is body["arguments"]["terminate"]
        assert reason.to_dict() == body["arguments"]["cancellable"]
        assert [((("task", task_id),), reason)] == [(e.targets, e.reason) for e in entries]

    def test_a_running_task_goes_to_its_workers_queue_only(
        self, app: Celery, rdb: redis.Redis, broadcasts: Broadcasts
    ) -> None:
        """With ``task_track_started``, a task stored STARTED on ``w1@h`` is sent to
        w1's own queue (a Redis list with a TTL of at most 60 s, the revoke's
        arguments inside) and nothing goes on the control exchange; a task whose
        state names no worker is broadcast; with ``cancellable_direct_running``
        off, the running one is broadcast too."""
        from cancellable.celery._direct import TTL, queue_name

        app.conf.task_track_started = True
        running, queued = str(uuid.uuid4()), str(uuid.uuid4())
        app.backend.store_result(running, {"pid": 1, "hostname": "w1@h"}, "STARTED")

        reason = cc.cancel(running, "direct", app=app).reason
        key = queue_name(app, "w1@h")
        assert [] == broadcasts.everything(0.5)
        assert 0 < rdb.pttl(key) <= TTL * 1000
        with Connection(app.conf.broker_url) as conn:
            message = conn.SimpleQueue(key, no_ack=True).get(timeout=1)
            body = message.decode()
        assert [running] == body["task_id"]
        assert reason.to_dict() == body["cancellable"]

        cc.cancel(queued, "queued", app=app)
        assert [[queued]] == [b["arguments"]["task_id"] for b in broadcasts.everything(0.5)]

        cc.configure(app, direct_running=False)
        cc.cancel(running, "broadcast", app=app)
        assert [[running]] == [b["arguments"]["task_id"] for b in broadcasts.everything(0.5)]
        assert 0 == rdb.llen(key)

    def test_accepts_results_groups_and_lists(self, app: Celery, broadcasts: Broadcasts) -> None:
        """AsyncResults and lists flatten to ids (duplicates dropped); a GroupResult is one target.

        The group's members are not named one by one: the group id is
        recorded and broadcast once, and workers match members by it.
        """
        from celery.result import GroupResult

        ids = [str(uuid.uuid4()) for _ in range(3)]
        group = GroupResult(str(uuid.uuid4()), [app.AsyncResult(i) for i in ids[1:]], app=app)

        cc.cancel([app.AsyncResult(ids[0]), group, ids[0]], app=app)
        body = broadcasts.get()

        assert [ids[0]] == body["arguments"]["task_id"]
        assert [["group", group.id]] == body["arguments"]["cancellable_targets"]
        assert [("task", ids[0]), ("group", group.id)] == [
            t for e in recorded(app) for t in e.targets
        ]

    def test_takes_the_app_from_the_result(self, app: Celery, broadcasts: Broadcasts) -> None:
        """Without ``app=``, the AsyncResult's own app is used."""
        task_id = str(uuid.uuid4())

        cc.cancel(app.AsyncResult(task_id))

        assert [task_id] == broadcasts.get()["arguments"]["task_id"]

    def test_a_large_batch_is_one_broadcast_and_chunked_entries(
        self, app: Celery, broadcasts: Broadcasts
    ) -> None:
        """2,500 ids: one revoke naming all of them, three ledger entries."""
        ids = [f"bulk-{n}" for n in range(2500)]

        cc.cancel(ids, "bulk", app=app)
        body = broadcasts.get()
        entries = recorded(app)

        assert ids == body["arguments"]["task_id"]
        assert [1000, 1000, 500] == [len(e.targets) for e in entries]

    @pytest.mark.parametrize(
        ("bad", "error"),
        [
            (None, TypeError),
            (123, TypeError),
            (b"bytes-id", TypeError),
            ("", ValueError),
            ("   ", ValueError),
            ([], ValueError),
            ([None], TypeError),
        ],
    )
    def test_bad_ids(self, app: Celery, bad: Any, error: type[Exception]) -> None:
        """Ids that are not non-empty strings are refused before anything is sent."""
        with pytest.raises(error):
            cc.cancel(bad, app=app)

        assert [] == recorded(app)

    @pytest.mark.parametrize(
        ("reason", "error"),
        [(42, TypeError), (b"x", TypeError), ({"message": "x"}, TypeError)],
    )
    def test_bad_reason_types(self, app: Celery, reason: Any, error: type[Exception]) -> None:
        """A reason must be None, a str or a CancelReason."""
        with pytest.raises(error, match="reason must be"):
            cc.cancel("some-id", reason, app=app)

        assert [] == recorded(app)

    def test_a_result_set_cancels_its_members(self, app: Celery, broadcasts: Broadcasts) -> None:
        """Issue 18, point 10: a `ResultSet` (no group id) is cancelled member by
        member, each as a task target, instead of raising AttributeError."""
        from celery.result import ResultSet

        ids = [str(uuid.uuid4()) for _ in range(2)]
        results = ResultSet([app.AsyncResult(i) for i in ids], app=app)

        cc.cancel(results, "the whole set")
        body = broadcasts.get()

        assert ids == body["arguments"]["task_id"]
        assert "cancellable_targets" not in body["arguments"]
        assert [("task", i) for i in ids] == [t for e in recorded(app) for t in e.targets]

    @pytest.mark.parametrize("grace", [86_400.5, 1e12])
    def test_a_grace_above_the_maximum_is_refused(self, app: Celery, grace: float) -> None:
        """Issue 18, point 11: ``grace`` above `MAX_GRACE` (one day) is refused at
        ``cancel()`` time, and nothing is recorded; one day itself is accepted."""
        with pytest.raises(ValueError, match="at most 86400 seconds"):
            cc.cancel("some-id", "too long", app=app, grace=grace)
        assert [] == recorded(app)

        cc.cancel("some-id", "one day", app=app, grace=cc.MAX_GRACE)
        assert [cc.MAX_GRACE] == [e.grace for e in recorded(app)]

    def test_from_a_thread_without_a_current_app_refuses_the_fallback(self) -> None:
        """Issue 18, point 10: ``cancel(id)`` on a thread where no app is current
        raises a RuntimeError naming ``app=`` instead of using Celery's fallback
        ``amqp://localhost`` app; with ``app=`` it works; after
        ``app.set_default()`` the default app is used.  A fresh interpreter, so
        no other test's default app is around."""
        done = run_python(
            f"""
            import threading
            from celery import Celery
            import cancellable.celery as cc

            app = Celery("fallback-check", broker={REDIS_URL!r}, backend={REDIS_URL!r})
            app.conf.cancellable_ledger_url = "none"
            outcome = []

            def run():
                try:
                    cc.cancel("some-id", "from a thread")
                except RuntimeError as exc:
                    outcome.append(str(exc))
                cc.cancel("some-id", "from a thread", app=app)
                outcome.append("with app= ok")
                app.set_default()
                cc.cancel("some-id", "from a thread")
                outcome.append("default ok")

            thread = threading.Thread(target=run)
            thread.start()
            thread.join(30)
            print("|".join(outcome))
            """
        )

        first, *rest = done.stdout.strip().split("|")
        assert "app=" in first
        assert "amqp://localhost" in first
        assert ["with app= ok", "default ok"] == rest

    def test_the_first_cancel_of_a_fresh_process_never_deadlocks_on_imports(self) -> None:
        """The first ``cancel()`` of a process, on a Redis broker and backend, imports
        redis-py on the calling thread before its state read's thread starts: redis-py 8
        imported on two threads at once raised ``_DeadlockError`` (its modules import
        each other) in 15 of 30 fresh interpreters under Celery 5.3, and that cancel()
        failed with BrokerUnavailableError.  Nine fresh interpreters, three at a time."""
        code = textwrap.dedent(
            f"""
            from celery import Celery
            import cancellable.celery as cc

            app = Celery("import-race", broker={REDIS_URL!r}, backend={REDIS_URL!r})
            app.conf.cancellable_ledger_url = "none"
            # The imports count against the deadline: room for a loaded machine.
            app.conf.cancellable_cancel_timeout = 60
            cc.cancel("some-id", "first cancel", app=app)
            print("ok")
            """
        )
        outputs: list[str] = []
        for _ in range(3):
            runs = [
                subprocess.Popen(
                    [sys.executable, "-W", "ignore", "-c", code],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for _ in range(3)
            ]
            outputs += [run.communicate(timeout=90)[0] for run in runs]

        failed = [out for out in outputs if out.strip().splitlines()[-1:] != ["ok"]]
        assert [] == failed

    def test_huge_reason(self, app: Celery) -> None:
        """A message over CancelReason.MAX_MESSAGE_LENGTH is refused and nothing is recorded."""
        with pytest.raises(ValueError, match="limit"):
            cc.cancel("some-id", "x" * (CancelReason.MAX_MESSAGE_LENGTH + 1), app=app)

        assert [] == recorded(app)

    def test_broker_never_reachable(self, rdb: redis.Redis) -> None:
        """A broker that refuses connections raises within about 2 s, nothing recorded."""
        app = private_app("redis://127.0.0.1:1/0")
        try:
            started = time.monotonic()
            with pytest.raises(cc.BrokerUnavailableError, match="nothing was cancelled"):
                cc.cancel("task-1", "stop", app=app)
            elapsed = time.monotonic() - started
        finally:
            app.close()

        assert elapsed < 2.5
        assert [] == rdb.keys("cancellable:*")

    def test_broker_lost_after_a_successful_cancel(
        self, rdb: redis.Redis, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a pooled connection to a broker that has since died, cancel() raises
        BrokerUnavailableError within 2.5 s and records and broadcasts nothing."""
        app = private_app(private_redis.url)
        broadcasts: list[Any] = []
        publish = runtime().broadcasts.publish
        monkeypatch.setattr(runtime().broadcasts, "publish", counting(broadcasts, publish))
        try:
            cc.cancel("first", "while the broker is up", app=app)
            before = (len(broadcasts), len(recorded(app)))
            private_redis.kill()

            started = time.monotonic()
            with pytest.raises(cc.BrokerUnavailableError, match="nothing was cancelled"):
                cc.cancel("second", "after the broker died", app=app)
            elapsed = time.monotonic() - started
            entries = recorded(app)
        finally:
            app.close()

        assert (1, 1) == before
        assert elapsed < 2.5
        assert 1 == len(broadcasts)
        assert [(("task", "first"),)] == [e.targets for e in entries]

    def test_ledger_down_still_broadcasts(self, app: Celery, broadcasts: Broadcasts) -> None:
        """With the ledger unreachable, the revoke is still sent, with a warning."""
        app.conf.cancellable_ledger_url = "redis://127.0.0.1:1/0"
        task_id = str(uuid.uuid4())
        # A socket an earlier test left for the garbage collector is closed
        # now, not inside pytest.warns, which re-raises its ResourceWarning
        # (seen once in a whole CI run: a connection to another test's
        # private redis-server).
        gc.collect()

        with capture_logs() as logs, pytest.warns(cc.LedgerUnavailableWarning):
            cc.cancel(task_id, "stop", app=app)
        body = broadcasts.get()

        assert [task_id] == body["arguments"]["task_id"]
        assert ["ledger.unavailable"] == [e["event"] for e in logs]


class TestLedgerSelection:
    """Which ledger an app gets."""

    def test_selection(self, app: Celery, tmp_path: Path) -> None:
        """URL setting first, then a Redis or file backend, then a Redis broker."""
        assert isinstance(runtime().ledgers.get(app), _ledger.RedisLedger)

        files = Celery("f", broker="memory://", backend=f"file://{tmp_path}")
        assert isinstance(runtime().ledgers.get(files), _ledger.FileLedger)

        broker_only = Celery("b", broker=REDIS_URL, backend="rpc://")
        assert isinstance(runtime().ledgers.get(broker_only), _ledger.RedisLedger)

        explicit = Celery("e", broker="memory://", backend="rpc://")
        explicit.conf.cancellable_ledger_url = f"file://{tmp_path / 'x'}"
        assert isinstance(runtime().ledgers.get(explicit), _ledger.FileLedger)

        disabled = Celery("d", broker=REDIS_URL, backend=REDIS_URL)
        disabled.conf.cancellable_ledger_url = "none"
        assert isinstance(runtime().ledgers.get(disabled), _ledger.NullLedger)

        bad = Celery("x", broker="memory://", backend="rpc://")
        bad.conf.cancellable_ledger_url = "http://example.invalid/"
        with pytest.raises(ValueError, match="ledger_url"):
            runtime().ledgers.get(bad)

    def test_one_ledger_per_app_and_process(self, app: Celery) -> None:
        """The process's ledgers give the same object for the same app, another for
        another app; a forked child would make its own (`Ledgers` is per process)."""
        first = runtime().ledgers.get(app)
        again = runtime().ledgers.get(app)
        other = private_app(REDIS_URL)

        assert first is again
        assert first is not runtime().ledgers.get(other)
        assert first is not _ledger.Ledgers().get(app)
        other.close()

    def test_the_ledger_is_shared_with_other_clients(self, app: Celery) -> None:
        """Another app object with the same name and Redis reads what this one recorded."""
        reason = cc.cancel("shared-id", "seen elsewhere", app=app).reason
        other = private_app(REDIS_URL)
        other.main = app.main
        try:
            entries, _ = runtime().ledgers.get(other).read(None)
        finally:
            other.close()

        assert [reason] == [e.reason for e in entries]

    def test_no_durable_store_warns_once(self) -> None:
        """With nothing durable available, one ledger.not_durable event says so."""
        ledgers = _ledger.Ledgers()
        with capture_logs() as logs:
            first = ledgers.get(Celery("n1", broker="memory://", backend="rpc://"))
            ledgers.get(Celery("n2", broker="memory://", backend="rpc://"))
        first.record([("task", "x")], CancelReason())

        assert isinstance(first, _ledger.NullLedger)
        assert ["ledger.not_durable"] == [e["event"] for e in logs]
        assert ([], None) == first.read(None)
        assert ([], "1-0") == first.read("1-0")


class TestConfigure:
    """`cancellable.celery.configure` validates every setting and stores them."""

    def test_sets_options(self, app: Celery) -> None:
        """Valid options land in the app's configuration; the settings are returned."""
        settings = cc.configure(
            app, ledger_url="redis://h:1/2", ledger_ttl=60, poll_interval=0.5, grace=0
        )

        assert "redis://h:1/2" == app.conf.cancellable_ledger_url
        assert 60 == app.conf.cancellable_ledger_ttl
        assert 0.5 == app.conf.cancellable_poll_interval
        assert (60.0, 0.5, 0.0) == (settings.ledger_ttl, settings.poll_interval, settings.grace)
        assert isinstance(settings, cc.Settings)

    def test_covers_every_setting(self) -> None:
        """One keyword per ``cancellable_*`` setting, named as the setting."""
        import inspect

        from cancellable.celery._settings import SETTINGS

        options = list(inspect.signature(cc.configure).parameters)[1:]

        assert sorted(SETTINGS) == sorted("cancellable_" + option for option in options)

    @pytest.mark.parametrize(
        ("options", "setting"),
        [
            ({"ledger_url": 5}, "cancellable_ledger_url"),
            ({"ledger_url": "http://x"}, "cancellable_ledger_url"),
            ({"ledger_ttl": -1}, "cancellable_ledger_ttl"),
            ({"ledger_ttl": 0}, "cancellable_ledger_ttl"),
            ({"ledger_ttl": "1"}, "cancellable_ledger_ttl"),
            ({"poll_interval": 0}, "cancellable_poll_interval"),
            ({"poll_interval": float("nan")}, "cancellable_poll_interval"),
            ({"grace": -1}, "cancellable_grace"),
            ({"kill_after": "7d"}, "cancellable_kill_after"),
            ({"kill_process_group": "yes"}, "cancellable_kill_process_group"),
            ({"cancel_siblings_on_failure": 1}, "cancellable_cancel_siblings_on_failure"),
            ({"wakeup_signal": "SIGUSR1"}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": "SIGUSR2"}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": "SIGKILL"}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": "NOPE"}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": 1.5}, "cancellable_wakeup_signal"),
            # Issue 18, point 10: 0, a number that is no signal, and signals
            # whose default action kills or stops a child without our handler.
            ({"wakeup_signal": 0}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": 999}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": int(signal.SIGRTMIN)}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": "SIGIO"}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": "SIGTSTP"}, "cancellable_wakeup_signal"),
            ({"wakeup_signal": "SIGCHLD"}, "cancellable_wakeup_signal"),
            ({"ledger_url": "file://dir"}, "cancellable_ledger_url"),
            ({"grace": 86_401}, "cancellable_grace"),
            ({"cancel_timeout": 0}, "cancellable_cancel_timeout"),
        ],
    )
    def test_bad_options(self, app: Celery, options: dict[str, Any], setting: str) -> None:
        """Each invalid option raises a SettingError naming the setting; nothing is stored."""
        with pytest.raises(cc.SettingError) as caught:
            cc.configure(app, **options)

        assert (setting,) == caught.value.settings
        assert setting not in app.conf

    def test_a_later_configure_is_what_this_process_reads_next(self, app: Celery) -> None:
        """configure() after the settings were read (a cancel(), a worker built) is
        seen by the next read: the settings and the ledger follow the new values."""
        from cancellable.celery._settings import settings_for

        cc.configure(app, grace=1, ledger_url="none")
        first = (settings_for(app).grace, type(runtime().ledgers.get(app)).__name__)
        cc.configure(app, grace=5, ledger_url=REDIS_URL)
        second = (settings_for(app).grace, type(runtime().ledgers.get(app)).__name__)

        assert ((1.0, "NullLedger"), (5.0, "RedisLedger")) == (first, second)

    def test_signal_by_name_or_number(self, app: Celery) -> None:
        """A catchable, unused signal can be chosen by name or number; the app's worker
        then wakes its children with it."""
        cc.configure(app, wakeup_signal="winch")
        by_name = WorkerRuntime(app).tasks.wakeup.signum
        other = private_app(REDIS_URL)
        cc.configure(other, wakeup_signal=int(signal.SIGURG))
        by_number = WorkerRuntime(other).tasks.wakeup.signum
        other.close()

        assert (signal.SIGWINCH, signal.SIGURG) == (by_name, by_number)


def celery_cancel(tmp_path: Path, app_source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A cli_app cancel ARGS`` in a subprocess, ``cli_app`` being
    a module written from ``app_source``."""
    (tmp_path / "cli_app.py").write_text("from celery import Celery\n" + app_source)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "cli_app", "cancel", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )


def same_app_source(app: Celery) -> str:
    """Module source for an app that talks to the same broker, backend and ledger."""
    return (
        f"app = Celery({app.main!r}, broker={REDIS_URL!r}, backend={REDIS_URL!r})\n"
        f"app.conf.control_exchange = {app.conf.control_exchange!r}\n"
    )


class TestCli:
    """``celery cancel`` as a real subprocess, against Redis, with no worker online."""

    def test_reports_unknown_and_finished(self, app: Celery, tmp_path: Path) -> None:
        """Ids no worker knows are 'unknown' (recorded; exit 1); finished ones are
        neither recorded nor broadcast."""
        finished = str(uuid.uuid4())
        app.backend.store_result(finished, 42, "SUCCESS")
        retrying = str(uuid.uuid4())
        app.backend.store_result(retrying, None, "RETRY")
        unknown = str(uuid.uuid4())

        run = celery_cancel(
            tmp_path, same_app_source(app), unknown, finished, retrying,
            "--reason", "tidy up", "--by", "ops", "--timeout", "0.3", "--wait", "0",
        )  # fmt: skip

        assert 1 == run.returncode, run.stderr
        assert "1 of 3 task id(s) unknown" in run.stderr
        lines = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
        assert lines[unknown].startswith("unknown")
        assert lines[finished].startswith("finished (SUCCESS)")
        assert lines[retrying].startswith("queued (RETRY); will not run")
        assert "SUCCESS" == app.AsyncResult(finished).state
        entries = recorded(app)
        assert [("task", unknown), ("task", retrying)] == list(entries[0].targets)
        assert ("tidy up", "ops") == (entries[0].reason.message, entries[0].reason.requested_by)

    def test_only_finished_ids_record_and_send_nothing(
        self, app: Celery, tmp_path: Path, broadcasts: Broadcasts
    ) -> None:
        """Cancelling only finished tasks records nothing, broadcasts nothing, exits 0."""
        finished = str(uuid.uuid4())
        app.backend.store_result(finished, 42, "SUCCESS")

        run = celery_cancel(tmp_path, same_app_source(app), finished, "--timeout", "0.3")

        assert 0 == run.returncode, run.stderr
        assert run.stdout.strip().endswith("finished (SUCCESS); nothing to cancel")
        assert [] == recorded(app)
        app.control.broadcast("ping")  # the listener hears broadcasts sent after the run
        methods = [body.get("method") for body in broadcasts.everything()]
        assert ["ping"] == methods

    def test_empty_id_is_a_usage_error(self, app: Celery, tmp_path: Path) -> None:
        """An empty id is refused with a usage error (exit 2), nothing recorded."""
        run = celery_cancel(tmp_path, same_app_source(app), "", "--timeout", "0.2")

        assert 2 == run.returncode
        assert "non-empty" in run.stderr
        assert [] == recorded(app)

    def test_broker_down_is_a_clean_error(self, tmp_path: Path) -> None:
        """With the broker unreachable the command fails with a one-line message."""
        run = celery_cancel(
            tmp_path,
            "app = Celery('down', broker='redis://127.0.0.1:1/0', backend='rpc://')\n"
            "app.conf.broker_transport_options = {'max_retries': 1, 'interval_start': 0}\n",
            "x",
            "--timeout",
            "0.2",
        )

        assert 0 != run.returncode
        assert "cannot reach the broker" in run.stderr
        assert "nothing was cancelled" in run.stderr
        assert "Traceback" not in run.stderr


def test_warnings_are_user_warnings() -> None:
    """LedgerUnavailableWarning can be filtered like any UserWarning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("x", cc.LedgerUnavailableWarning, stacklevel=1)

    assert [cc.LedgerUnavailableWarning] == [w.category for w in caught]
    assert issubclass(cc.LedgerUnavailableWarning, UserWarning)


class TestPlainRevokeIsDurable:
    """Celery's own ``Control.revoke`` records in the ledger once the process has cancelled."""

    @pytest.fixture(autouse=True)
    def _recorder(self) -> None:
        """What the first `cancel` (or a worker's start) installs."""
        _client.install_revoke_recorder()

    def test_importing_patches_nothing_and_cancel_patches_control_revoke(self) -> None:
        """A fresh process that imports ``cancellable.celery`` has Celery untouched; its
        first `cancel` patches ``Control.revoke`` and nothing of the worker."""
        done = run_python(
            f"""
            import warnings
            from celery import Celery
            from celery.app.control import Control
            from celery.worker.control import Panel
            from celery.worker.request import Request
            import cancellable.celery as cc

            def patched():
                return [
                    name
                    for name, thing in [
                        ("Control.revoke", Control.revoke),
                        ("Request.revoked", Request.revoked),
                        ("Request._announce_revoked", Request._announce_revoked),
                        ("Panel revoke", Panel.data["revoke"]),
                    ]
                    if hasattr(thing, "_cancellable_original")
                ]

            print("imported", patched(), "cancellable_members" in Panel.data)
            app = Celery("fresh", broker={REDIS_URL!r}, backend={REDIS_URL!r})
            app.conf.control_exchange = "fresh-unit-exchange"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cc.cancel("fresh-id", app=app)
            print("cancelled", patched(), "cancellable_members" in Panel.data)
            """
        )

        assert [
            "imported [] False",
            "cancelled ['Control.revoke'] False",
        ] == done.stdout.splitlines()

    def test_plain_revokes_are_recorded(self, app: Celery, broadcasts: Broadcasts) -> None:
        """``AsyncResult.revoke()`` and ``app.control.revoke([...])`` record their ids
        with source "revoked", after Celery's own broadcast went out."""
        one, two, three = (str(uuid.uuid4()) for _ in range(3))

        app.AsyncResult(one).revoke()
        app.control.revoke([two, three])

        assert "revoke" == broadcasts.get()["method"]
        entries = recorded(app)
        assert [[("task", one)], [("task", two), ("task", three)]] == [
            list(e.targets) for e in entries
        ]
        assert {"revoked"} == {e.reason.source for e in entries}

    def test_targeted_and_terminating_revokes_are_not_recorded(self, app: Celery) -> None:
        """A revoke meant for some workers only, or one that terminates, stays Celery's."""
        app.control.revoke(str(uuid.uuid4()), destination=["someone@nowhere"])
        app.control.revoke(str(uuid.uuid4()), terminate=True)

        assert [] == recorded(app)

    def test_a_ledger_failure_never_fails_celerys_call(self, app: Celery) -> None:
        """With the ledger down, the revoke is still sent and the call returns normally."""
        app.conf.cancellable_ledger_url = "redis://127.0.0.1:1/0"

        with capture_logs() as logs:
            app.control.revoke(str(uuid.uuid4()))

        assert "ledger.unavailable" in [e["event"] for e in logs]


class TestCommandLine:
    """``celery cancel`` (`cancellable.celery._cli.cancel`) run in-process with click's runner.

    A real app on Redis DB 12; no worker is online, so every id is unknown.
    """

    @staticmethod
    def invoke(app: Celery, *args: str) -> Any:
        """Run the command with ``app`` as Celery's CLI would hand it over."""
        from celery.bin.base import CLIContext
        from click.testing import CliRunner

        from cancellable.celery._cli import cancel as command

        context = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
        return CliRunner().invoke(command, list(args), obj=context, catch_exceptions=False)

    def test_a_negative_grace_is_a_usage_error(self, app: Celery) -> None:
        """``--grace -1``: a clear error and a non-zero exit, nothing recorded."""
        outcome = self.invoke(app, "some-id", "--grace", "-1", "--wait", "0", "--timeout", "0.2")

        assert outcome.exit_code != 0
        assert "grace" in outcome.output
        assert [] == recorded(app)

    def test_an_unknown_id_is_recorded_and_exits_1(self, app: Celery) -> None:
        """No worker knows the id: reported unknown, recorded with the grace, exit status 1."""
        outcome = self.invoke(
            app, "queued-id", "--reason", "typo", "--grace", "2", "--wait", "0", "--timeout", "0.2"
        )

        assert 1 == outcome.exit_code, outcome.output
        assert "unknown" in outcome.output
        (entry,) = recorded(app)
        assert [("task", "queued-id")] == list(entry.targets)
        assert 2.0 == entry.grace

    def test_an_unreachable_broker_is_one_clear_line(self) -> None:
        """A broker that does not answer: a ClickException naming it, nothing else."""
        app = private_app("redis://127.0.0.1:1/0")
        try:
            outcome = self.invoke(app, "any-id", "--wait", "0", "--timeout", "0.2")
        finally:
            app.close()

        assert outcome.exit_code != 0
        assert "Traceback" not in outcome.output

    def test_without_an_app_the_current_one_is_used(self, app: Celery) -> None:
        """``cancel(id)`` with no app and no result object: Celery's current app records it."""
        from celery import _state

        previous = _state.get_current_app()
        app.set_current()
        try:
            cc.cancel("current-app-id", reason="no app given")
        finally:
            previous.set_current()

        (entry,) = recorded(app)
        assert [("task", "current-app-id")] == list(entry.targets)
