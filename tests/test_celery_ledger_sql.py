"""The SQL ledger (`SqlLedger` on a `SqlStore`) on real PostgreSQL, MariaDB and SQLite.

Each server test runs in a database of its own, created for this module and
dropped after it (`tests.sql_dbs`); each test uses its own app name, so its
rows are its own.  SQLite lives in pytest's ``tmp_path``.  The contract
tests of every durable ledger (`tests.test_celery_ledger.TestContract`) run
here on each database too.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from tests import sql_dbs
from tests import test_celery_ledger as base

from cancellable import CancelReason
from cancellable.celery import _ledger, _ledger_sql
from cancellable.celery._ledger import SqlLedger
from cancellable.celery._ledger_sql import SqlStore
from cancellable.celery._settings import SettingError, settings_for, sql_url

KINDS = ["postgresql", "mysql", "sqlite"]


def sql_ledger(db_url: str, name: str, ttl: float, **options: Any) -> SqlLedger:
    """A `SqlLedger` on a new `SqlStore` (``options``: the store's keyword arguments)."""
    return SqlLedger(SqlStore(db_url, name, ttl, **options))


@pytest.fixture(name="server_db", scope="module")
def server_db_fixture() -> Iterator[dict[str, str]]:
    """One database of this module's own on each server: kind -> name."""
    with sql_dbs.temporary_database("postgresql") as pg, sql_dbs.temporary_database("mysql") as my:
        yield {"postgresql": pg, "mysql": my}


@pytest.fixture(name="kind", params=KINDS)
def kind_fixture(request: pytest.FixtureRequest) -> str:
    """Which database the test runs against."""
    return str(request.param)


@pytest.fixture(name="db_url")
def db_url_fixture(kind: str, server_db: dict[str, str], tmp_path: Path) -> str:
    """The URL of the test's database."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return sql_dbs.url(kind, server_db[kind])


@pytest.fixture(name="make")
def make_fixture(db_url: str) -> Iterator[Any]:
    """``make(ttl=..., name=...)``: a `SqlLedger` on the test's database (disposed after)."""
    made: list[SqlLedger] = []

    def make(ttl: float = _ledger.DEFAULT_LEDGER_TTL, name: str | None = None, **kw: Any) -> Any:
        ledger = sql_ledger(db_url, name or f"test-{uuid.uuid4().hex[:8]}", ttl, **kw)
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        ledger.store.close()


@pytest.fixture(name="ledger")
def ledger_fixture(make: Any) -> Any:
    """A `SqlLedger` of its own app name, empty, with a one-week TTL."""
    return make()


class TestSqlContract(base.TestContract):
    """What every durable ledger promises, on PostgreSQL, MariaDB and SQLite."""

    def test_many_entries_are_read_across_pages(
        self, ledger: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """More entries than one read page all come back, in order (a page of 7 here)."""
        monkeypatch.setattr(_ledger_sql, "PAGE", 7)
        for n in range(23):
            ledger.record([("task", f"p-{n}")], CancelReason())

        entries, cursor = ledger.read(None)
        again, _ = ledger.read(cursor)

        assert [("task", f"p-{n}") for n in range(23)] == base.targets_of(entries)
        assert [] == again


def _engine(db_url: str) -> sa.Engine:
    return sa.create_engine(db_url, poolclass=sa.pool.NullPool)


def _write_slowly(db_url: str, name: str, started: threading.Event, go: threading.Event) -> None:
    """A writer that takes its number and inserts, but commits only when told."""
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE cancellable_ledger_head SET seq = seq + 1 WHERE name = :n"),
                {"n": name},
            )
            seq = conn.execute(
                sa.text("SELECT seq FROM cancellable_ledger_head WHERE name = :n"), {"n": name}
            ).scalar_one()
            conn.execute(
                sa.text(
                    "INSERT INTO cancellable_ledger (name, seq, recorded_at, reason, targets) "
                    "VALUES (:n, :s, :at, :r, :t)"
                ),
                {"n": name, "s": seq, "at": time.time(), "r": "{}", "t": "task:slow"},
            )
            started.set()
            go.wait(30)
    finally:
        engine.dispose()


class TestOrdering:
    """The cursor never skips a committed entry, whatever order writers commit in."""

    def test_a_writer_that_has_not_committed_holds_back_the_next(
        self, make: Any, db_url: str
    ) -> None:
        """A writer took number n and has not committed: a second writer waits for it,
        and a reader meanwhile neither sees n nor moves its cursor past it.  After
        the commit the reader gets both entries, in commit order.  (With ids given
        at insert, the second writer would commit n+1 first and a reader at n+1
        would never see n.)"""
        ledger = make(lock_timeout=20)
        ledger.record([("task", "first")], CancelReason())
        _, cursor = ledger.read(None)
        started, go = threading.Event(), threading.Event()
        name = ledger.store._name
        slow = threading.Thread(target=_write_slowly, args=(db_url, name, started, go))
        slow.start()
        assert started.wait(20)
        fast = threading.Thread(target=ledger.record, args=([("task", "fast")], CancelReason()))
        fast.start()
        time.sleep(0.5)
        fast_waited = fast.is_alive()
        reader = make(name=name)
        during, cursor_during = reader.read(cursor)
        go.set()
        slow.join(20)
        fast.join(20)
        after, _ = reader.read(cursor_during)

        assert fast_waited
        assert [] == during
        assert cursor == cursor_during
        assert [("task", "slow"), ("task", "fast")] == base.targets_of(after)

    def test_concurrent_writers_against_a_reader(self, db_url: str) -> None:
        """Four writer processes record 600 entries (one target each) while a reader
        polls: the reader sees every committed entry exactly once, and nothing else."""
        name = f"race-{uuid.uuid4().hex[:8]}"
        sql_ledger(db_url, name, 3600).read(None)  # the tables exist before the race
        writers, per_writer = 4, 150
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_writer, args=(db_url, name, w, per_writer)) for w in range(writers)
        ]
        reader = sql_ledger(db_url, name, 3600, lock_timeout=30)  # SQLite: readers wait too
        seen: list[str] = []
        cursor = None
        for proc in procs:
            proc.start()
        reads = 0
        while any(proc.is_alive() for proc in procs):
            entries, cursor = reader.read(cursor)
            reads += 1
            seen.extend(target_id for _kind, target_id in base.targets_of(entries))
        entries, cursor = reader.read(cursor)
        seen.extend(target_id for _kind, target_id in base.targets_of(entries))

        expected = {f"w{w}-{i}" for w in range(writers) for i in range(per_writer)}
        assert [0] * writers == [proc.exitcode for proc in procs]
        assert len(seen) == len(set(seen)), "an entry was read twice"
        assert expected == set(seen)
        assert reads > 10, "the reader did not read while the writers wrote"


def _writer(db_url: str, name: str, number: int, count: int) -> None:
    ledger = sql_ledger(db_url, name, 3600, lock_timeout=30)
    for i in range(count):
        ledger.record([("task", f"w{number}-{i}")], CancelReason())
    ledger.store.close()


class TestExpiry:
    """Entries older than the TTL are skipped, and pruned in bounded batches."""

    def test_expired_entries_are_skipped_and_pruned_in_batches(
        self, make: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """50 entries an hour old and one new, TTL one minute: a read returns the new
        one only; a prune of at most 3 batches of 10 deletes 30 rows, the next 20,
        and neither touches the live entry."""
        ledger = make(ttl=60)
        ledger.store._last_prune = time.time()  # no prune from record() in this test
        hour_ago = time.time() - 3600
        with monkeypatch.context() as patched:
            patched.setattr(time, "time", lambda: hour_ago)
            for n in range(50):
                ledger.record([("task", f"old-{n}")], CancelReason())
        ledger.record([("task", "new")], CancelReason())
        monkeypatch.setattr(_ledger_sql, "PRUNE_BATCH", 10)
        monkeypatch.setattr(_ledger_sql, "PRUNE_BATCHES", 3)

        entries, _ = ledger.read(None)
        first = ledger.store.prune()
        second = ledger.store.prune()
        third = ledger.store.prune()
        after, _ = ledger.read(None)

        assert [("task", "new")] == base.targets_of(entries)
        assert (30, 20, 0) == (first, second, third)
        assert [("task", "new")] == base.targets_of(after)

    def test_a_pruned_ledger_keeps_numbering_upwards(self, make: Any) -> None:
        """After every entry expired and was pruned, new entries get higher numbers:
        a reader's cursor from before still finds them."""
        ledger = make(ttl=0.2)
        ledger.record([("task", "a")], CancelReason())
        _, cursor = ledger.read(None)
        time.sleep(0.3)
        assert 1 == ledger.store.prune()
        ledger.record([("task", "b")], CancelReason())

        entries, _ = ledger.read(cursor)

        assert [("task", "b")] == base.targets_of(entries)


class TestSchema:
    """Tables made on first use, by one process or several at once."""

    def test_tables_are_created_by_many_processes_at_once(self, kind: str) -> None:
        """Four processes write their first entry to a fresh database at the same time:
        all succeed (CREATE TABLE IF NOT EXISTS races are survived), four entries."""
        if kind == "sqlite":
            with contextlib_tmpdir() as tmp:
                _race_first_use(f"sqlite:///{tmp}/fresh.db")
            return
        with sql_dbs.temporary_database(kind) as database:
            _race_first_use(sql_dbs.url(kind, database))

    def test_the_documented_ddl_is_what_the_ledger_creates(self, kind: str, tmp_path: Path) -> None:
        """A ledger on tables made by the DDL in docs/ledgers.md (the migration path)
        records and reads, on a fresh database."""
        if kind == "sqlite":
            _use_documented_ddl("sqlite", f"sqlite:///{tmp_path / 'ddl.db'}")
            return
        with sql_dbs.temporary_database(kind) as database:
            _use_documented_ddl(kind, sql_dbs.url(kind, database))


def _use_documented_ddl(dialect: str, db_url: str) -> None:
    engine = _engine(db_url)
    with engine.begin() as conn:
        for statement in documented_ddl(dialect):
            conn.execute(sa.text(statement))
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    ledger = sql_ledger(db_url, "ddl", 3600)
    ledger.record([("task", "via-ddl")], CancelReason(), 1.5)
    entries, _ = ledger.read(None)
    ledger.store.close()

    assert {"cancellable_ledger", "cancellable_ledger_head", "cancellable_ledger_once"} == tables
    assert [("task", "via-ddl")] == base.targets_of(entries)
    assert 1.5 == entries[0].grace


class contextlib_tmpdir:
    """A temporary directory (a context manager), for tests without ``tmp_path``."""

    def __enter__(self) -> str:
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        return self._dir.name

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()


def _first_use(db_url: str, name: str, number: int, barrier: Any) -> None:
    ledger = sql_ledger(db_url, name, 3600, lock_timeout=30)
    barrier.wait(30)
    ledger.record([("task", f"first-{number}")], CancelReason())
    ledger.store.close()


def _race_first_use(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    name = "race"
    procs = [ctx.Process(target=_first_use, args=(db_url, name, n, barrier)) for n in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    entries, _ = sql_ledger(db_url, name, 3600).read(None)

    assert [0] * 4 == [proc.exitcode for proc in procs]
    assert {f"first-{n}" for n in range(4)} == {t for _k, t in base.targets_of(entries)}


def documented_ddl(dialect: str) -> list[str]:
    """The ``CREATE TABLE`` statements for ``dialect`` from docs/ledgers.md."""
    text = (Path(__file__).parents[1] / "docs" / "ledgers.md").read_text()
    marker = f"```sql\n-- {dialect}\n"
    start = text.index(marker) + len(marker)
    block = text[start : text.index("```", start)]
    return [s.strip() for s in block.split(";") if s.strip()]


class TestTimeBounds:
    """Every call ends in bounded time; a refused connection is a clear LedgerError."""

    def test_a_held_lock_fails_the_writer_after_the_lock_timeout(
        self, make: Any, db_url: str
    ) -> None:
        """Another transaction holds the head row: record() raises LedgerError after
        about its lock timeout (1 s here), never waits on."""
        ledger = make(lock_timeout=1)
        ledger.record([("task", "a")], CancelReason())
        started, go = threading.Event(), threading.Event()
        name = ledger.store._name
        holder = threading.Thread(target=_write_slowly, args=(db_url, name, started, go))
        holder.start()
        assert started.wait(20)
        began = time.monotonic()
        try:
            with pytest.raises(_ledger.LedgerError, match="could not write"):
                ledger.record([("task", "b")], CancelReason())
            waited = time.monotonic() - began
        finally:
            go.set()
            holder.join(20)

        assert 0.5 < waited < 8

    @pytest.mark.parametrize(
        "url",
        [
            "postgresql+psycopg://postgres@127.0.0.1:1/none",
            "postgresql+psycopg2://postgres@127.0.0.1:1/none",
            "mysql+pymysql://root@127.0.0.1:1/none",
        ],
    )
    def test_a_server_that_refuses_is_a_ledger_error_naming_it(self, url: str) -> None:
        """Nothing listens on the port: record() and read() raise LedgerError at
        once, naming the URL and the setting it came from."""
        ledger = sql_ledger(url, "refused", 3600)
        began = time.monotonic()

        with pytest.raises(
            _ledger.LedgerError, match=re.escape("127.0.0.1:1/none, from cancellable_ledger_url")
        ):
            ledger.record([("task", "a")], CancelReason())
        with pytest.raises(_ledger.LedgerError, match="could not read"):
            ledger.read(None)
        assert time.monotonic() - began < _ledger_sql.CONNECT_TIMEOUT * 2


class TestProcesses:
    """No connection before first use; a forked child gets its own."""

    def test_making_the_ledger_opens_no_connection(self, server_db: dict[str, str]) -> None:
        """An app whose result backend is db+postgresql: getting its ledger (as
        cancel() and a worker do before they use it) opens no connection."""
        database = server_db["postgresql"]
        app = Celery(
            "lazy", backend="db+" + sql_dbs.url("postgresql", database), set_as_current=False
        )

        before = _connections(database)
        ledger = _ledger.Ledgers().get(app)
        after = _connections(database)

        assert isinstance(ledger, SqlLedger)
        assert before == after

    def test_a_forked_child_uses_its_own_connections(self, make: Any, kind: str) -> None:
        """The parent has a pooled connection; a forked child records through the
        same ledger object (a new pool) and the parent's connection still works."""
        ledger = make()
        ledger.record([("task", "parent")], CancelReason())
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                ledger.record([("task", "child")], CancelReason())
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        ledger.record([("task", "parent-again")], CancelReason())

        entries, _ = ledger.read(None)

        assert 0 == os.waitstatus_to_exitcode(status)
        assert [("task", "parent"), ("task", "child"), ("task", "parent-again")] == (
            base.targets_of(entries)
        )


def _connections(database: str) -> int:
    engine = _engine(sql_dbs.url("postgresql", "postgres"))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": database},
                ).scalar_one()
            )
    finally:
        engine.dispose()


class TestChoice:
    """Which ledger an app gets, and the messages for a bad configuration."""

    def test_a_database_result_backend_gets_a_sql_ledger_with_its_options(
        self, server_db: dict[str, str]
    ) -> None:
        """``db+postgresql://`` result backend: a SQL ledger on the same URL, built
        with ``database_engine_options`` (a pool of 3 here) and Celery's engine
        callback where Celery has one."""
        called: list[Any] = []
        app = Celery(
            "choice",
            backend="db+" + sql_dbs.url("postgresql", server_db["postgresql"]),
            set_as_current=False,
        )
        app.conf.database_engine_options = {"pool_size": 3}
        app.conf.database_engine_callback = called.append

        ledger = _ledger.Ledgers().get(app)

        assert isinstance(ledger, SqlLedger)
        assert 3 == ledger.store._engine.pool.size()
        assert server_db["postgresql"] == ledger.store._engine.url.database
        if hasattr(getattr(app.backend, "session_manager", None), "engine_callback"):
            assert any(engine is ledger.store._engine for engine in called)
        ledger.store.close()

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("postgresql://u@h/d", "postgresql://u@h/d"),
            ("postgres://u@h/d", "postgresql://u@h/d"),
            ("db+postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
            ("mysql+pymysql://u@h/d", "mysql+pymysql://u@h/d"),
            ("mariadb://u@h/d", "mariadb://u@h/d"),
            ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
            ("redis://h/0", None),
            ("file:///tmp/x", None),
        ],
    )
    def test_database_urls(self, url: str, expected: str | None) -> None:
        """Which ledger URLs name a database, as SQLAlchemy spells them."""
        assert expected == sql_url(url)

    def test_a_database_ledger_url_is_a_valid_setting(self) -> None:
        """``cancellable_ledger_url`` accepts database URLs."""
        app = Celery("setting", set_as_current=False)
        app.conf.cancellable_ledger_url = "postgresql+psycopg://u@h/d"

        assert "postgresql+psycopg://u@h/d" == settings_for(app).ledger_url

    def test_a_missing_driver_names_the_setting_and_the_package(self) -> None:
        """``mysql://`` means mysqlclient, which is not installed here: getting the
        ledger raises SettingError naming the setting and what to install."""
        app = Celery("driver", set_as_current=False)
        app.conf.cancellable_ledger_url = "mysql://root@127.0.0.1/x"

        with pytest.raises(SettingError, match="cancellable_ledger_url") as caught:
            _ledger.Ledgers().get(app)

        assert "mysqlclient" in str(caught.value)

    def test_an_in_memory_sqlite_ledger_url_is_refused(self) -> None:
        """``sqlite://`` is a database per connection: not a place to keep cancellations."""
        app = Celery("memory", set_as_current=False)
        app.conf.cancellable_ledger_url = "sqlite://"

        with pytest.raises(SettingError, match="in-memory SQLite"):
            _ledger.Ledgers().get(app)


class TestDjango:
    """django-db (django-celery-results): the ledger in the Django database."""

    @pytest.mark.parametrize(
        ("settings", "expected_url", "expected_args"),
        [
            (
                {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": "app",
                    "USER": "u",
                    "PASSWORD": "p@ss:/w",
                    "HOST": "db",
                    "PORT": "6432",
                    "OPTIONS": {"sslmode": "require", "isolation_level": 1},
                },
                "postgresql+psycopg://u:p%40ss%3A%2Fw@db:6432/app",
                {"sslmode": "require"},
            ),
            (
                {"ENGINE": "django.db.backends.mysql", "NAME": "app", "USER": "root", "HOST": ""},
                "mysql+mysqldb://root@/app",
                {},
            ),
            (
                {"ENGINE": "django.db.backends.sqlite3", "NAME": Path("/srv/app.db")},
                "sqlite+pysqlite:////srv/app.db",
                {},
            ),
        ],
    )
    def test_django_database_settings_become_a_url(
        self, settings: dict[str, Any], expected_url: str, expected_args: dict[str, Any]
    ) -> None:
        """A ``DATABASES`` entry becomes a SQLAlchemy URL on the same server,
        database, user and driver, its ``OPTIONS`` (less Django's own) the
        driver's connect arguments."""
        url, options = _ledger_sql.django_database(settings)

        assert expected_url == url
        assert settings.get("PASSWORD") == sa.engine.make_url(url).password
        assert {"connect_args": expected_args} == options

    def test_another_database_engine_is_a_setting_error(self) -> None:
        """Oracle is not a database the ledger keeps cancellations in: a
        SettingError names the ``DATABASES`` entry and the way out."""
        with pytest.raises(SettingError, match=r"DATABASES\['default'\].*cancellable_ledger_url"):
            _ledger_sql.django_database(
                {"alias": "default", "ENGINE": "django.db.backends.oracle", "NAME": "x"}
            )


class TestWriteOnce:
    """A plain revoke is written once per key on each database (issue 18, point 7)."""

    def test_concurrent_writers_of_one_plain_revoke_write_it_once(self, make: Any) -> None:
        """Six threads, each with a ledger (and pool) of its own, record the same plain
        revoke at once: one writes it, the others nothing; one key row."""
        name = f"test-{uuid.uuid4().hex[:8]}"
        ledgers = [make(name=name, lock_timeout=30) for _ in range(6)]
        targets: list[_ledger.Target] = [("task", f"c-{n}") for n in range(50)]
        key = _ledger.revoke_key(targets)
        ledgers[0].read(None)  # the tables exist before the race
        barrier = threading.Barrier(len(ledgers))
        wrote: list[bool] = []

        def write(ledger: SqlLedger) -> None:
            barrier.wait(10)
            wrote.append(ledger.record_once(targets, CancelReason(source="revoked"), key))

        threads = [threading.Thread(target=write, args=(ledger,)) for ledger in ledgers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        entries, _ = ledgers[0].read(None)

        assert [False] * 5 + [True] == sorted(wrote)
        assert targets == base.targets_of(entries)

    def test_an_expired_key_is_taken_over_and_pruned(self, make: Any, db_url: str) -> None:
        """Once its entries have expired (TTL 0.5 s), the same plain revoke is written
        again; pruning deletes expired keys with the entries."""
        ledger = make(ttl=0.5)
        targets: list[_ledger.Target] = [("task", "expiring")]
        key = _ledger.revoke_key(targets)

        first = ledger.record_once(targets, CancelReason(source="revoked"), key)
        time.sleep(0.7)
        second = ledger.record_once(targets, CancelReason(source="revoked"), key)
        time.sleep(0.7)
        ledger.store.prune()
        engine = _engine(db_url)
        with engine.connect() as conn:
            keys = conn.execute(
                sa.text("SELECT count(*) FROM cancellable_ledger_once WHERE name = :n"),
                {"n": ledger.store._name},
            ).scalar()
        engine.dispose()

        assert (True, True) == (first, second)
        assert 0 == keys

    def test_a_head_row_deleted_by_hand_does_not_lose_a_plain_revoke(
        self, make: Any, db_url: str
    ) -> None:
        """A plain revoke written after its app's head row was deleted is still
        recorded (the key is rolled back with the failed attempt, then written)."""
        ledger = make()
        ledger.record([("task", "before")], CancelReason())
        engine = _engine(db_url)
        with engine.begin() as conn:
            conn.execute(
                sa.text("DELETE FROM cancellable_ledger_head WHERE name = :n"),
                {"n": ledger.store._name},
            )
        engine.dispose()
        targets: list[_ledger.Target] = [("task", "after")]

        wrote = ledger.record_once(targets, CancelReason(), _ledger.revoke_key(targets))
        entries, _ = ledger.read(None)

        assert wrote
        assert [("task", "before"), ("task", "after")] == base.targets_of(entries)


class TestEdges:
    """What the ledger does with odd states and odd input."""

    def test_a_head_row_deleted_by_hand_is_made_again_and_readers_catch_up(
        self, make: Any, db_url: str
    ) -> None:
        """Someone deletes the head row and every entry: the next record makes the
        head row again (numbering from the entries left, none), and a reader whose
        cursor is above the new head reads the ledger from its start again."""
        ledger = make()
        for n in range(3):
            ledger.record([("task", f"old-{n}")], CancelReason())
        _, cursor = ledger.read(None)
        engine = _engine(db_url)
        with engine.begin() as conn:
            for table in ("cancellable_ledger_head", "cancellable_ledger"):
                conn.execute(
                    sa.text(f"DELETE FROM {table} WHERE name = :n"), {"n": ledger.store._name}
                )
        engine.dispose()

        ledger.record([("task", "after")], CancelReason())
        entries, new_cursor = ledger.read(cursor)

        assert "3" == cursor
        assert [("task", "after")] == base.targets_of(entries)
        assert "1" == new_cursor

    def test_a_cursor_of_another_store_reads_everything(self, ledger: Any) -> None:
        """A Redis stream id as cursor (the ledger URL changed under a running
        worker): the SQL ledger reads from its start rather than fail."""
        ledger.record([("task", "a")], CancelReason())

        entries, cursor = ledger.read("1700000000000-0")

        assert [("task", "a")] == base.targets_of(entries)
        assert "1" == cursor

    def test_a_long_app_name_is_shortened_but_kept_apart(self, make: Any) -> None:
        """App names longer than the column are shortened with a hash: two such
        names that differ only at the end keep their own entries."""
        first = make(name="a" * 300 + "1")
        second = make(name="a" * 300 + "2")
        first.record([("task", "one")], CancelReason())
        second.record([("task", "two")], CancelReason())

        assert [("task", "one")] == base.targets_of(first.read(None)[0])
        assert [("task", "two")] == base.targets_of(second.read(None)[0])

    def test_sqlite_without_returning_takes_numbers_with_a_select(self, tmp_path: Path) -> None:
        """SQLite older than 3.35 has no UPDATE ... RETURNING: the number is read
        back with a SELECT inside the same transaction, and entries round-trip."""
        ledger = sql_ledger(f"sqlite:///{tmp_path / 'old.db'}", "old", 3600)
        ledger.store._engine.dialect.update_returning = False
        ledger.record([("task", "a")], CancelReason())
        ledger.record([("task", "b"), ("task", "c")], CancelReason())

        entries, cursor = ledger.read(None)

        assert [("task", "a"), ("task", "b"), ("task", "c")] == base.targets_of(entries)
        assert "2" == cursor
        ledger.store.close()
