"""The Celery integration's client side and building blocks, in this process.

Real Redis (DB 12, flushed per test) and a real broker: the broadcast that
`cancel` sends is read back from the broker's fanout exchange by a kombu
consumer, not assumed.  Worker behaviour is proven in ``tests/integration``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Exchange, Queue
from structlog.testing import capture_logs

import cancellable.celery as cc
from cancellable import MAX_MESSAGE_LENGTH, CancelReason, CancelScope
from cancellable.celery import _delivery, _ledger

REDIS_URL = "redis://127.0.0.1:6379/12"


@pytest.fixture(name="rdb")
def rdb_fixture() -> Iterator[redis.Redis]:
    """This module's Redis database, flushed before and after each test."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"Redis is not answering on {REDIS_URL}: {exc}. Start redis-server.")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(name="app")
def app_fixture(rdb: redis.Redis) -> Iterator[Celery]:
    """A Celery app on Redis with a private name and control exchange."""
    name = f"capi-{uuid.uuid4().hex[:8]}"
    app = Celery(name, broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    app.conf.control_exchange = name
    app.conf.broker_connection_retry_on_startup = False
    _ledger.reset()
    yield app
    _ledger.reset()
    app.close()


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


class TestCancel:
    """`cancellable.celery.cancel`: what it records and what it sends."""

    def test_records_and_broadcasts_the_reason(self, app: Celery, broadcasts: Broadcasts) -> None:
        """The ledger holds the reason and a standard revoke carries it."""
        task_id = str(uuid.uuid4())

        reason = cc.cancel(task_id, "user pressed stop", requested_by="alice", app=app)
        body = broadcasts.get()

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
        assert {task_id: reason} == _ledger.ledger_for(app).lookup([task_id])

    def test_accepts_results_groups_and_lists(self, app: Celery, broadcasts: Broadcasts) -> None:
        """AsyncResult, GroupResult and lists flatten to ids, duplicates dropped."""
        from celery.result import GroupResult

        ids = [str(uuid.uuid4()) for _ in range(3)]
        group = GroupResult(str(uuid.uuid4()), [app.AsyncResult(i) for i in ids[1:]], app=app)

        cc.cancel([app.AsyncResult(ids[0]), group, ids[0]], app=app)
        body = broadcasts.get()

        assert ids == body["arguments"]["task_id"]

    def test_takes_the_app_from_the_result(self, app: Celery, broadcasts: Broadcasts) -> None:
        """Without ``app=``, the AsyncResult's own app is used."""
        task_id = str(uuid.uuid4())

        cc.cancel(app.AsyncResult(task_id))

        assert [task_id] == broadcasts.get()["arguments"]["task_id"]

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

        assert [] == _ledger.ledger_for(app).all_ids()

    @pytest.mark.parametrize(
        ("reason", "error"),
        [(42, TypeError), (b"x", TypeError), ({"message": "x"}, TypeError)],
    )
    def test_bad_reason_types(self, app: Celery, reason: Any, error: type[Exception]) -> None:
        """A reason must be None, a str or a CancelReason."""
        with pytest.raises(error, match="reason must be"):
            cc.cancel("some-id", reason, app=app)

    def test_huge_reason(self, app: Celery) -> None:
        """A message over MAX_MESSAGE_LENGTH is refused and nothing is recorded."""
        with pytest.raises(ValueError, match="limit"):
            cc.cancel("some-id", "x" * (MAX_MESSAGE_LENGTH + 1), app=app)

        assert [] == _ledger.ledger_for(app).all_ids()

    def test_broker_down(self, rdb: redis.Redis) -> None:
        """An unreachable broker raises quickly and leaves the ledger untouched."""
        app = Celery("down", broker="redis://127.0.0.1:1/0", backend=REDIS_URL)
        app.conf.broker_transport_options = {"max_retries": 1, "interval_start": 0}
        started = time.monotonic()

        with pytest.raises(cc.BrokerUnavailableError, match="nothing was cancelled"):
            cc.cancel("task-1", "stop", app=app)

        assert time.monotonic() - started < 10
        assert [] == rdb.keys("cancellable:*")

    def test_ledger_down_still_broadcasts(self, app: Celery, broadcasts: Broadcasts) -> None:
        """With the ledger unreachable, the revoke is still sent, with a warning."""
        app.conf.cancellable_ledger_url = "redis://127.0.0.1:1/0"
        task_id = str(uuid.uuid4())

        with capture_logs() as logs, pytest.warns(cc.LedgerUnavailableWarning):
            cc.cancel(task_id, "stop", app=app)
        body = broadcasts.get()

        assert [task_id] == body["arguments"]["task_id"]
        assert ["ledger.unavailable"] == [e["event"] for e in logs]


class TestLedgers:
    """The ledger implementations and how one is chosen."""

    @pytest.fixture(name="ledger", params=["redis", "file"])
    def ledger_fixture(
        self, request: pytest.FixtureRequest, rdb: redis.Redis, tmp_path: Path
    ) -> Any:
        """Each durable ledger, empty."""
        if request.param == "redis":
            return _ledger.RedisLedger(rdb, "cancellable:test:", 60)
        return _ledger.FileLedger(tmp_path / "ledger", 60)

    def test_round_trip_and_first_reason_wins(self, ledger: Any) -> None:
        """Recorded reasons come back; a second record does not replace the first."""
        first = CancelReason(source="revoked", message="first")
        ledger.record(["a", "b/with:odd chars"], first)
        ledger.record(["a"], CancelReason(source="revoked", message="second"))

        assert {"a": first, "b/with:odd chars": first} == ledger.lookup(
            ["a", "b/with:odd chars", "missing"]
        )
        assert {"a", "b/with:odd chars"} == set(ledger.all_ids())
        assert {} == ledger.lookup([])

    def test_since_returns_each_new_id_once(self, ledger: Any) -> None:
        """A cursor from since() yields only what was recorded after it."""
        ledger.record(["one"], CancelReason())
        first, cursor = ledger.since(0.0)
        time.sleep(0.02)  # file modification times must differ
        ledger.record(["two"], CancelReason())
        second, cursor = ledger.since(cursor)
        third, _ = ledger.since(cursor)

        assert (["one"], ["two"], []) == (first, second, third)

    def test_redis_entries_expire(self, rdb: redis.Redis) -> None:
        """Entries carry the TTL and leave the index when it passes."""
        ledger = _ledger.RedisLedger(rdb, "cancellable:ttl:", 1)
        ledger.record(["x"], CancelReason())

        assert 0 < rdb.ttl("cancellable:ttl:task:x") <= 1
        time.sleep(1.2)
        assert [] == ledger.all_ids()
        assert {} == ledger.lookup(["x"])

    def test_file_entries_expire(self, tmp_path: Path) -> None:
        """Files older than the TTL are ignored and removed."""
        ledger = _ledger.FileLedger(tmp_path, 10)
        ledger.record(["old"], CancelReason())
        path = next(tmp_path.glob("*.json"))
        os.utime(path, (time.time() - 60, time.time() - 60))

        assert {} == ledger.lookup(["old"])
        assert [] == ledger.all_ids()
        assert not path.exists()

    def test_file_ledger_faults_raise_ledger_error(self, tmp_path: Path) -> None:
        """An unwritable directory or a corrupt entry raises LedgerError."""
        ledger = _ledger.FileLedger(tmp_path / "ledger", 60)
        (tmp_path / "ledger" / "bad.json").write_text("{not json", encoding="utf-8")

        with pytest.raises(_ledger.LedgerError, match="read"):
            ledger.lookup(["bad"])

        (tmp_path / "ledger").chmod(0o500)
        try:
            if os.access(tmp_path / "ledger", os.W_OK):  # root ignores permissions
                (tmp_path / "ledger" / "bad.json").unlink()
                (tmp_path / "ledger").rmdir()
                (tmp_path / "ledger").write_text("a file where the directory was")
            with pytest.raises(_ledger.LedgerError, match="write"):
                ledger.record(["new"], CancelReason())
        finally:
            if (tmp_path / "ledger").is_dir():
                (tmp_path / "ledger").chmod(0o700)

    def test_redis_down_raises_ledger_error(self) -> None:
        """Every operation on an unreachable Redis raises LedgerError."""
        ledger = _ledger.RedisLedger(redis.Redis(port=1), "p:", 60)

        for call in (
            lambda: ledger.record(["x"], CancelReason()),
            lambda: ledger.lookup(["x"]),
            ledger.all_ids,
        ):
            with pytest.raises(_ledger.LedgerError):
                call()

    def test_selection(self, app: Celery, tmp_path: Path) -> None:
        """URL setting first, then a Redis or file backend, then a Redis broker."""
        assert isinstance(_ledger.ledger_for(app), _ledger.RedisLedger)

        files = Celery("f", broker="memory://", backend=f"file://{tmp_path}")
        assert isinstance(_ledger.ledger_for(files), _ledger.FileLedger)

        broker_only = Celery("b", broker=REDIS_URL, backend="rpc://")
        assert isinstance(_ledger.ledger_for(broker_only), _ledger.RedisLedger)

        explicit = Celery("e", broker="memory://", backend="rpc://")
        explicit.conf.cancellable_ledger_url = f"file://{tmp_path / 'x'}"
        assert isinstance(_ledger.ledger_for(explicit), _ledger.FileLedger)

        disabled = Celery("d", broker=REDIS_URL, backend=REDIS_URL)
        disabled.conf.cancellable_ledger_url = "none"
        assert isinstance(_ledger.ledger_for(disabled), _ledger.NullLedger)

        bad = Celery("x", broker="memory://", backend="rpc://")
        bad.conf.cancellable_ledger_url = "http://example.invalid/"
        with pytest.raises(ValueError, match="ledger_url"):
            _ledger.ledger_for(bad)

    def test_no_durable_store_warns_once(self) -> None:
        """With nothing durable available, one ledger.not_durable event says so."""
        with capture_logs() as logs:
            first = _ledger.ledger_for(Celery("n1", broker="memory://", backend="rpc://"))
            _ledger.ledger_for(Celery("n2", broker="memory://", backend="rpc://"))

        assert isinstance(first, _ledger.NullLedger)
        assert ["ledger.not_durable"] == [e["event"] for e in logs]
        assert [] == first.all_ids()
        assert ([], 1.5) == first.since(1.5)
        assert {} == first.lookup(["x"])
        first.record(["x"], CancelReason())


class TestConfigure:
    """`cancellable.celery.configure` validates and stores options."""

    def test_sets_options(self, app: Celery) -> None:
        """Valid options land in the app's configuration."""
        cc.configure(app, ledger_url="redis://h:1/2", ledger_ttl=60, poll_interval=0.5)

        assert "redis://h:1/2" == app.conf.cancellable_ledger_url
        assert 60.0 == app.conf.cancellable_ledger_ttl
        assert 0.5 == app.conf.cancellable_poll_interval

    @pytest.mark.parametrize(
        ("options", "error"),
        [
            ({"ledger_url": 5}, TypeError),
            ({"ledger_url": "http://x"}, ValueError),
            ({"ledger_ttl": -1}, ValueError),
            ({"ledger_ttl": 0}, ValueError),
            ({"ledger_ttl": "1"}, TypeError),
            ({"poll_interval": 0}, ValueError),
            ({"poll_interval": float("nan")}, ValueError),
            ({"signal": "SIGUSR1"}, ValueError),
            ({"signal": "SIGUSR2"}, ValueError),
            ({"signal": "SIGKILL"}, ValueError),
            ({"signal": "NOPE"}, ValueError),
            ({"signal": 1.5}, TypeError),
        ],
    )
    def test_bad_options(
        self, app: Celery, options: dict[str, Any], error: type[Exception]
    ) -> None:
        """Each invalid option raises a clear TypeError or ValueError."""
        with pytest.raises(error):
            cc.configure(app, **options)

    def test_signal_by_name_or_number(self, app: Celery) -> None:
        """A catchable, unused signal can be chosen by name or number."""
        try:
            cc.configure(app, signal="winch")
            assert signal.SIGWINCH == _delivery._signum
            cc.configure(app, signal=int(signal.SIGURG))
            assert signal.SIGURG == _delivery._signum
        finally:
            _delivery.set_signal(signal.SIGURG)


class TestMailbox:
    """The shared-memory mailbox between a worker's main process and children."""

    def test_round_trip(self) -> None:
        """A written cancellation is found by id, with its reason."""
        task_id = f"mb-{uuid.uuid4()}"
        reason = CancelReason(source="revoked", message="m", requested_by="me")

        _delivery._write_slot(task_id, reason, 123.0)

        assert {task_id: (reason, 123.0)} == _delivery._read_mailbox({task_id, "other"})
        assert {} == _delivery._read_mailbox({"not-there"})
        assert {} == _delivery._read_mailbox(set())

    def test_prefixes_and_long_ids_do_not_collide(self) -> None:
        """An id that is a prefix of another is not matched; very long ids work."""
        base = f"pre-{uuid.uuid4()}"
        long_id = "L" * 500 + base
        _delivery._write_slot(base + "-longer", CancelReason(message="other"), 1.0)
        _delivery._write_slot(long_id, CancelReason(message="long"), 2.0)

        assert {} == _delivery._read_mailbox({base})
        assert "long" == _delivery._read_mailbox({long_id})[long_id][0].message
        assert {} == _delivery._read_mailbox({long_id[:-1]})

    def test_huge_message_is_trimmed_not_lost(self) -> None:
        """A message too large for a slot is shortened; the id still matches."""
        task_id = f"big-{uuid.uuid4()}"
        reason = CancelReason(message="é" * MAX_MESSAGE_LENGTH)

        _delivery._write_slot(task_id, reason, 1.0)
        found, _ = _delivery._read_mailbox({task_id})[task_id]

        assert "é" * 1000 == found.message

    def test_oldest_slots_are_reused(self) -> None:
        """After a full turn of the ring, the oldest entry is gone."""
        first = f"old-{uuid.uuid4()}"
        _delivery._write_slot(first, CancelReason(), 1.0)
        for n in range(_delivery._SLOTS):
            _delivery._write_slot(f"filler-{n}-{uuid.uuid4()}", CancelReason(), 1.0)

        assert {} == _delivery._read_mailbox({first})

    def test_a_signal_cancels_only_the_named_task(self) -> None:
        """A wake-up signal cancels the running task named in the mailbox, not others."""
        named = _delivery.RunningTask("named-task", "t", CancelScope())
        other = _delivery.RunningTask("other-task", "t", CancelScope())
        _delivery.register(named)
        _delivery.register(other)
        previous = signal.getsignal(_delivery._signum)
        try:
            _delivery.install_child_handler()
            _delivery._write_slot("named-task", CancelReason(message="bye"), time.time())
            os.kill(os.getpid(), _delivery._signum)
            deadline = time.monotonic() + 5
            while not named.revoked() and time.monotonic() < deadline:
                time.sleep(0.001)

            assert named.scope.cancel_called
            assert "bye" == named.scope.cancel_reason.message  # type: ignore[union-attr]
            assert not other.revoked()
        finally:
            signal.signal(_delivery._signum, previous)
            _delivery.unregister(named)
            _delivery.unregister(other)

    def test_a_slot_being_rewritten_is_skipped(self) -> None:
        """A key whose slot holds garbage (caught mid-rewrite) is not a match."""
        task_id = f"torn-{uuid.uuid4()}"
        _delivery._write_slot(task_id, CancelReason(), 1.0)
        with _delivery._write_lock:
            (count,) = _delivery._HEADER.unpack_from(_delivery._mailbox, 0)
            slot_at = _delivery._KEYS_END + ((count - 1) % _delivery._SLOTS) * _delivery._SLOT_SIZE
            _delivery._mailbox[slot_at + 4 : slot_at + 8] = b"\xff\xfe{{"

        assert {} == _delivery._read_mailbox({task_id})

    def test_signal_to_a_process_that_is_gone(self) -> None:
        """Delivering to a pid that has exited leaves it in the mailbox, no error."""
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        task_id = f"gone-{uuid.uuid4()}"

        assert "mailbox" == _delivery.deliver(task_id, CancelReason(), child.pid)
        assert task_id in _delivery._read_mailbox({task_id})
        _delivery._early.pop(task_id, None)

    def test_deliver_local_and_early(self) -> None:
        """A task in this process is cancelled directly; one not running is remembered."""
        entry = _delivery.RunningTask("here", "t", CancelScope())
        _delivery.register(entry)
        try:
            assert "local" == _delivery.deliver("here", CancelReason(), os.getpid())
            assert entry.revoked()
            assert "mailbox" == _delivery.deliver("later", CancelReason(message="x"), None)
            early = _delivery.pending_reason("later")
            assert early is not None
            assert "x" == early[0].message
        finally:
            _delivery.unregister(entry)
            _delivery._early.pop("later", None)


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
        """Ids no worker knows are 'unknown'; finished ones are left alone."""
        finished = str(uuid.uuid4())
        app.backend.store_result(finished, 42, "SUCCESS")
        retrying = str(uuid.uuid4())
        app.backend.store_result(retrying, None, "RETRY")
        unknown = str(uuid.uuid4())

        run = celery_cancel(
            tmp_path, same_app_source(app), unknown, finished, retrying,
            "--reason", "tidy up", "--by", "ops", "--timeout", "0.3", "--wait", "0",
        )  # fmt: skip

        assert 0 == run.returncode, run.stderr
        lines = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
        assert lines[unknown].startswith("unknown")
        assert lines[finished].startswith("finished (SUCCESS)")
        assert lines[retrying].startswith("queued (RETRY); will not run")
        assert "SUCCESS" == app.AsyncResult(finished).state
        recorded = _ledger.ledger_for(app).lookup([unknown])[unknown]
        assert ("tidy up", "ops") == (recorded.message, recorded.requested_by)

    def test_empty_id_is_a_usage_error(self, app: Celery, tmp_path: Path) -> None:
        """An empty id is refused with a usage error (exit 2), nothing recorded."""
        run = celery_cancel(tmp_path, same_app_source(app), "", "--timeout", "0.2")

        assert 2 == run.returncode
        assert "non-empty" in run.stderr
        assert [] == _ledger.ledger_for(app).all_ids()

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
