"""The SQL ledger's store: cancellations in two tables, through SQLAlchemy Core.

For deployments whose only durable store is a database: PostgreSQL,
MySQL/MariaDB or SQLite (Celery's ``db+...`` result backend, or a
``cancellable_ledger_url`` such as ``postgresql://...``).  `SqlStore` keeps
rows of text; `cancellable.celery._ledger.SqlLedger` turns them into the
entries of the ledger contract, as `~cancellable.celery._ledger.RedisLedger`
does with a Redis client's stream entries.  (This module imports nothing of
the ledger's: the ledger imports it.)

Tables (created on first use, ``CREATE TABLE IF NOT EXISTS``; the DDL is in
docs/ledgers.md for teams that manage schemas by migration)::

    cancellable_ledger_head  (name, seq)           one row per app: the last seq given
    cancellable_ledger       (name, seq, recorded_at, reason, targets, grace)
    cancellable_ledger_once  (name, key, expires_at)  the keys of plain revokes written

``name`` is the app's main name, so several apps can share one database.

Why a cursor never skips a committed entry
    Auto-increment ids (and sequences) are handed out when a row is
    inserted, not when it commits: under concurrent writers id 7 can commit
    and be read before id 6 commits, and a reader at cursor 7 never sees 6.
    So writers are serialised: `SqlStore.append` first increments its app's
    row of ``cancellable_ledger_head`` (``UPDATE ... SET seq = seq + n``),
    which locks that row until the transaction ends, and inserts its entries
    with the numbers it took, in the same transaction.  The next writer's
    ``UPDATE`` waits for the lock and reads the committed value, so a number
    is given only after every smaller number has committed (or rolled back
    and been given again): the committed numbers are always a gap-free
    prefix ``1..head``.  A reader reads ``head`` and then the entries in
    ``(cursor, head]``; whatever commits later gets a number above ``head``.
    SQLite has one writer at a time anyway; the same statements run there.
    Cancellations are rare next to tasks, so waiting on the lock costs little
    (docs/ledgers.md has the measured figures).

Plain revokes are written once
    A plain revoke reaches every worker, and each records it under the same
    key (`~cancellable.celery._ledger.revoke_key`).  `SqlStore.append` with
    ``once=key`` inserts the key into ``cancellable_ledger_once`` in the same
    transaction as the rows, before it takes the head row: a second writer
    of the key waits for the first one's transaction and then finds the key
    (PostgreSQL: ``INSERT ... ON CONFLICT``; elsewhere the duplicate key
    error), and writes nothing.  A key lives as long as its entries (the
    TTL: an expired key is taken over, and pruned with the entries).

Expiry
    Entries are aged by their writer's clock (``recorded_at``, seconds since
    the epoch): readers skip entries older than the TTL, and a writer deletes
    them, at most every `PRUNE_EVERY` seconds, oldest first in batches of
    `PRUNE_BATCH` rows, at most `PRUNE_BATCHES` batches at a time.  Clocks
    decide expiry only, never order.

Bounded time
    Every connection gets a connect timeout, a statement timeout and a lock
    timeout in the dialect's own terms (`timeout_connect_args`,
    `_on_connect`), and waiting for a pooled connection is bounded too.

Processes
    The engine is made when the ledger is (which imports SQLAlchemy and the
    driver, so a missing one is reported at once), but it connects only on
    the first `record` or `read`: a process that never cancels and runs no
    worker opens no connection.  In a forked child the pool is replaced
    without closing the parent's connections (``dispose(close=False)``),
    before the child uses it.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from ._settings import SettingError, sql_url

__all__ = [
    "CONNECT_TIMEOUT",
    "ENTRIES_TABLE",
    "HEAD_TABLE",
    "LOCK_TIMEOUT",
    "ONCE_TABLE",
    "READ_TIMEOUT",
    "STATEMENT_TIMEOUT",
    "Row",
    "SqlStore",
    "StoreError",
    "django_database",
    "timeout_connect_args",
]

#: Table names.
ENTRIES_TABLE: Final = "cancellable_ledger"
HEAD_TABLE: Final = "cancellable_ledger_head"
ONCE_TABLE: Final = "cancellable_ledger_once"

# Every bound is the ledger's 2 s (docs/reliability.md, "Time bounds"): a
# cancel() gives the ledger write at most that, and a worker's poll too.

#: Seconds to open a connection (libpq's smallest: it rounds to whole seconds, at least 2).
CONNECT_TIMEOUT: Final = 2
#: Seconds one statement may run (PostgreSQL ``statement_timeout``).
STATEMENT_TIMEOUT: Final = 2
#: Seconds the MySQL drivers wait for each reply (client side: a stopped
#: server too), a little more than a statement may run.
READ_TIMEOUT: Final = 3
#: Seconds to wait for a row lock (PostgreSQL ``lock_timeout``, InnoDB
#: ``innodb_lock_wait_timeout``, SQLite's busy timeout).
LOCK_TIMEOUT: Final = 2
#: Seconds to wait for a free connection of the pool.
POOL_TIMEOUT: Final = 2
#: libpq TCP keepalives: a connection whose peer is gone (a partition, a
#: host that died) fails after about ``idle + interval * count`` seconds.
_PG_KEEPALIVES: Final = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 2,
}

#: Entries read per round trip.
PAGE: Final = 500
#: Delete expired entries at most this often per process (seconds) ...
PRUNE_EVERY: Final = 60.0
#: ... in batches of this many rows ...
PRUNE_BATCH: Final = 500
#: ... at most this many batches at a time.
PRUNE_BATCHES: Final = 20

#: A live entry as stored: ``(recorded_at, reason JSON, targets text, grace)``.
Row = tuple[float, str, str, "float | None"]


class StoreError(Exception):
    """The database could not be read or written (the message says which and why)."""


#: The longest ``name`` (an app's main name; longer ones are shortened with a hash).
NAME_LENGTH: Final = 200

_SQL_EXTRA_HINT: Final = "pip install 'cancellable[sql]' (SQLAlchemy 2.0 or newer)"
_DRIVER_HINTS: Final = {
    "postgresql": "psycopg2 (pip install psycopg2-binary), or name psycopg 3 as postgresql+psycopg://",
    "mysql": "mysqlclient (pip install mysqlclient), or name PyMySQL as mysql+pymysql://",
    "mariadb": "mysqlclient (pip install mysqlclient), or name PyMySQL as mariadb+pymysql://",
}


#: `SqlStore.append` on PostgreSQL: take the numbers and insert, in one statement.
_POSTGRESQL_APPEND: Final = f"""
WITH head AS (
    UPDATE {HEAD_TABLE} SET seq = seq + :n WHERE name = :name RETURNING seq
)
INSERT INTO {ENTRIES_TABLE} (name, seq, recorded_at, reason, targets, grace)
SELECT :name, head.seq - :n + chunk.ord, :at, :reason, chunk.targets, :grace
FROM head, unnest(CAST(:targets AS TEXT[])) WITH ORDINALITY AS chunk(targets, ord)
RETURNING seq
"""


def _ledger_name(app_name: str) -> str:
    if len(app_name) <= NAME_LENGTH:
        return app_name
    digest = hashlib.sha256(app_name.encode()).hexdigest()[:16]
    return f"{app_name[: NAME_LENGTH - 17]}~{digest}"


def timeout_connect_args(
    dialect: str, driver: str, lock_timeout: float = LOCK_TIMEOUT
) -> dict[str, Any]:
    """The DBAPI ``connect()`` arguments that bound time, for the drivers that take them."""
    if dialect == "postgresql" and driver in ("psycopg2", "psycopg", "psycopg2cffi"):
        return {"connect_timeout": CONNECT_TIMEOUT, **_PG_KEEPALIVES}
    if dialect in ("mysql", "mariadb") and driver in ("pymysql", "mysqldb"):
        return {
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "write_timeout": READ_TIMEOUT,
        }
    if dialect == "sqlite" and driver == "pysqlite":
        return {"timeout": float(lock_timeout)}
    return {}


def _session_statements(dialect: str, lock_timeout: float = LOCK_TIMEOUT) -> list[str]:
    """What each new connection runs first: the server-side time bounds."""
    if dialect == "postgresql":
        return [
            f"SET statement_timeout = {STATEMENT_TIMEOUT * 1000}",
            f"SET lock_timeout = {max(1, round(lock_timeout * 1000))}",
        ]
    if dialect in ("mysql", "mariadb"):
        # Whole seconds, at least one.
        return [f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(lock_timeout))}"]
    return []


def _safe_url(url: Any) -> str:
    try:
        return str(url.render_as_string(hide_password=True))
    except AttributeError:
        return str(url)


#: Keys of Django's ``OPTIONS`` that are Django's own, not the driver's.
_DJANGO_ONLY_OPTIONS: Final = frozenset(
    {"isolation_level", "assume_role", "server_side_binding", "pool", "transaction_mode"}
)


def django_database(settings: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A SQLAlchemy URL and engine options for a Django ``DATABASES`` entry.

    The same server, database, user and driver as Django's (psycopg 3 when it
    is installed, else psycopg2; mysqlclient; sqlite3), and the entry's
    ``OPTIONS`` as the driver's connect arguments.

    Raises:
        SettingError: Not a PostgreSQL, MySQL/MariaDB or SQLite database.
    """
    import importlib.util

    setting = f"DATABASES[{settings.get('alias', 'default')!r}]"
    vendor = str(settings.get("ENGINE", "")).rsplit(".", 1)[-1]
    if vendor in ("postgresql", "postgresql_psycopg2", "postgis"):
        psycopg3 = importlib.util.find_spec("psycopg") is not None
        scheme = "postgresql+psycopg" if psycopg3 else "postgresql+psycopg2"
    elif vendor == "mysql":
        scheme = "mysql+mysqldb"
    elif vendor in ("sqlite3", "spatialite"):
        scheme = "sqlite+pysqlite"
    else:
        raise SettingError(
            [
                (
                    setting,
                    f"{setting}: the SQL ledger keeps cancellations in PostgreSQL, "
                    f"MySQL/MariaDB or SQLite, not {settings.get('ENGINE')!r}; set "
                    "cancellable_ledger_url",
                )
            ]
        )
    from sqlalchemy.engine import URL

    port = settings.get("PORT")
    url = URL.create(
        scheme,
        username=settings.get("USER") or None,
        password=settings.get("PASSWORD") or None,
        host=settings.get("HOST") or None,
        port=int(port) if port else None,
        database=str(settings.get("NAME") or "") or None,
    )
    options = {
        key: value
        for key, value in (settings.get("OPTIONS") or {}).items()
        if key not in _DJANGO_ONLY_OPTIONS
    }
    return url.render_as_string(hide_password=False), {"connect_args": options}


class SqlStore:
    """Cancellation rows in SQL tables (see the module docstring).

    Args:
        url: A SQLAlchemy URL (``postgresql://``, ``mysql+pymysql://``,
            ``sqlite:///path`` ...; ``db+`` and ``postgres://`` are accepted).
        app_name: The app's main name (each app has its own sequence).
        ttl: Seconds an entry is kept.
        engine_options: Keyword arguments for ``create_engine`` (Celery's
            ``database_engine_options``); ours are added where not given.
        engine_callback: Called with the new engine (Celery's
            ``database_engine_callback``).
        setting: The setting the URL came from, for error messages.
        lock_timeout: Seconds a writer waits for another one's lock.

    Raises:
        SettingError: SQLAlchemy, the dialect or its driver is missing, or
            the URL or an engine option is invalid.
    """

    durable = True

    def __init__(
        self,
        url: str,
        app_name: str,
        ttl: float,
        *,
        engine_options: Mapping[str, Any] | None = None,
        engine_callback: Callable[[Any], Any] | None = None,
        setting: str = "cancellable_ledger_url",
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self._name = _ledger_name(app_name)
        self._ttl = ttl
        self._setting = setting
        self._lock = threading.Lock()
        self._ready = False
        self._last_prune = 0.0
        self._pid = os.getpid()
        self._lock_timeout = lock_timeout
        self._engine = self._make_engine(url, dict(engine_options or {}), engine_callback)
        self.dialect: str = self._engine.dialect.name
        #: Where the entries are: for log lines and messages (no password).
        self.where = (
            f"{self.dialect} table {ENTRIES_TABLE} at {_safe_url(self._engine.url)}, from {setting}"
        )

    # ------------------------------------------------------------------ setup

    def _make_engine(
        self, url: str, options: dict[str, Any], callback: Callable[[Any], Any] | None
    ) -> Any:
        try:
            import sqlalchemy as sa
        except ImportError as exc:
            raise SettingError(
                [
                    (
                        self._setting,
                        f"{self._setting}: the SQL ledger needs SQLAlchemy: {exc}; "
                        f"{_SQL_EXTRA_HINT}",
                    )
                ]
            ) from exc
        normalised = sql_url(url)
        try:
            parsed = sa.engine.make_url(normalised or url)
        except (sa.exc.ArgumentError, ValueError) as exc:
            raise SettingError(
                [(self._setting, f"{self._setting}: not a database URL: {exc}")]
            ) from exc
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise SettingError(
                [
                    (
                        self._setting,
                        f"{self._setting}: an in-memory SQLite database cannot keep "
                        "cancellations; name a file (sqlite:////absolute/path.db)",
                    )
                ]
            )
        self._tables(sa)
        try:
            dialect_cls = parsed.get_dialect()
        except Exception as exc:
            raise SettingError(
                [
                    (
                        self._setting,
                        f"{self._setting}: SQLAlchemy has no dialect for "
                        f"{parsed.drivername!r}: {exc}",
                    )
                ]
            ) from exc
        connect_args = dict(
            timeout_connect_args(dialect_cls.name, dialect_cls.driver, self._lock_timeout)
        )
        connect_args.update(options.pop("connect_args", None) or {})
        if "poolclass" not in options and "pool" not in options:
            options.setdefault("pool_pre_ping", True)
            options.setdefault("pool_timeout", POOL_TIMEOUT)
        if dialect_cls.name in ("postgresql", "mysql", "mariadb"):
            # The head-row lock orders writers under READ COMMITTED (and under
            # InnoDB's REPEATABLE READ); PostgreSQL's REPEATABLE READ or
            # SERIALIZABLE would fail concurrent writers instead of queueing them.
            options["isolation_level"] = "READ COMMITTED"
        try:
            engine = sa.create_engine(parsed, connect_args=connect_args, **options)
        except ImportError as exc:
            hint = _DRIVER_HINTS.get(dialect_cls.name, "its DBAPI driver")
            raise SettingError(
                [
                    (
                        self._setting,
                        f"{self._setting}: the database driver for "
                        f"{parsed.drivername!r} is not installed ({exc}); install {hint}",
                    )
                ]
            ) from exc
        except Exception as exc:
            raise SettingError(
                [
                    (
                        self._setting,
                        f"{self._setting}: cannot make a database engine for "
                        f"{_safe_url(parsed)}: {exc}",
                    )
                ]
            ) from exc
        statements = _session_statements(engine.dialect.name, self._lock_timeout)
        if statements:
            sa.event.listen(engine, "connect", _SessionSetup(statements))
        if callback is not None:
            callback(engine)
        return engine

    def _tables(self, sa: Any) -> None:
        from sqlalchemy.dialects import mysql

        metadata = sa.MetaData()
        # MySQL/MariaDB: any text, and names compared byte for byte.
        mysql_options = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
        # MySQL's TEXT holds 64 KiB; a chunk of 1,000 long ids can be more.
        long_text = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
        self._head = sa.Table(
            HEAD_TABLE,
            metadata,
            sa.Column("name", sa.String(NAME_LENGTH), primary_key=True),
            sa.Column("seq", sa.BigInteger, nullable=False),
            **mysql_options,
        )
        self._entries = sa.Table(
            ENTRIES_TABLE,
            metadata,
            sa.Column("name", sa.String(NAME_LENGTH), primary_key=True),
            sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("recorded_at", sa.Double, nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("targets", long_text, nullable=False),
            sa.Column("grace", sa.Double, nullable=True),
            **mysql_options,
        )
        self._once = sa.Table(
            ONCE_TABLE,
            metadata,
            sa.Column("name", sa.String(NAME_LENGTH), primary_key=True),
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("expires_at", sa.Double, nullable=False),
            **mysql_options,
        )

    def _engine_here(self) -> Any:
        """The engine, its pool replaced first if this is a forked child."""
        pid = os.getpid()
        if pid != self._pid:
            with self._lock:
                if pid != self._pid:
                    # The parent's connections are its own: drop them unclosed.
                    self._engine.dispose(close=False)
                    self._pid = pid
                    self._ready = False
        return self._engine

    def _ensure(self, engine: Any) -> None:
        """Create the tables (if missing) and this app's head row (if missing)."""
        if self._ready:
            return
        import sqlalchemy as sa
        from sqlalchemy.schema import CreateTable

        for attempt in range(3):
            try:
                with engine.connect() as conn:
                    inspector = sa.inspect(conn)
                    missing = [
                        t
                        for t in (self._head, self._entries, self._once)
                        if not inspector.has_table(t.name)
                    ]
                if missing:
                    with engine.begin() as conn:
                        for table in missing:
                            conn.execute(CreateTable(table, if_not_exists=True))
                break
            except sa.exc.DBAPIError:
                # Two processes creating the same table at once: PostgreSQL may
                # fail one of them (a duplicate in its catalog) even with IF
                # NOT EXISTS.  The next look finds the table.
                if attempt == 2:
                    raise
                time.sleep(0.05 * (attempt + 1))
        with engine.connect() as conn:
            found = conn.execute(
                sa.select(self._head.c.seq).where(self._head.c.name == self._name)
            ).first()
        if found is None:
            # Start above any entry left behind (a head row deleted by hand).
            highest = (
                sa.select(sa.func.coalesce(sa.func.max(self._entries.c.seq), 0))
                .where(self._entries.c.name == self._name)
                .scalar_subquery()
            )
            try:
                with engine.begin() as conn:
                    conn.execute(sa.insert(self._head).values(name=self._name, seq=highest))
            except sa.exc.IntegrityError:
                pass  # another process made it first
        self._ready = True

    # ----------------------------------------------------------------- writes

    def append(
        self,
        chunks: Sequence[str],
        reason: str,
        grace: float | None,
        now: float | None = None,
        *,
        once: str | None = None,
    ) -> bool:
        """One transaction: take the next numbers from the head row, insert one row per chunk.

        ``chunks`` are the targets' texts (one row each), ``reason`` the
        reason's JSON, ``now`` the time to record (default: this clock's).
        With ``once`` (a plain revoke's key), nothing is written if the key
        was written within the TTL (see the module docstring).  True if
        this call wrote the rows.
        """
        if not chunks:
            return False
        import sqlalchemy as sa

        now = time.time() if now is None else now
        try:
            engine = self._engine_here()
            self._ensure(engine)
            rows = [{"targets": text, "reason": reason, "grace": grace} for text in chunks]
            for _attempt in range(2):
                try:
                    if self.dialect == "postgresql" and once is None:
                        written = self._append_postgresql(engine, sa, rows, now)
                    else:
                        written = self._append(engine, sa, rows, now, once)
                except _KeySeen:
                    return False
                if written:
                    break
                # The head row is gone (deleted by hand?): make it again, retry once.
                self._ready = False
                self._ensure(engine)
            else:
                raise StoreError(f"the row of {HEAD_TABLE} for {self._name!r} could not be made")
        except StoreError:
            raise
        except Exception as exc:
            self._ready = False
            raise StoreError(
                f"could not write the cancellation ledger ({self.where}): {exc}"
            ) from exc
        self._maybe_prune(now)
        return True

    def _append(
        self, engine: Any, sa: Any, rows: list[dict[str, Any]], now: float, once: str | None
    ) -> bool:
        """Take numbers and insert, in one transaction; False if there is no head row.

        With ``once``, the key first (raises `_KeySeen`, rolling back, if it is there).
        """
        try:
            with engine.begin() as conn:
                if once is not None and not self._claim(conn, sa, once, now):
                    raise _KeySeen
                if self.dialect == "postgresql":
                    written = conn.execute(
                        sa.text(_POSTGRESQL_APPEND), self._append_parameters(rows, now)
                    ).all()
                    if len(written) != len(rows):
                        raise _NoHead
                    return True
                last = self._take(conn, sa, len(rows))
                if last is None:
                    raise _NoHead  # and roll the key back
                first = last - len(rows) + 1
                conn.execute(
                    sa.insert(self._entries),
                    [
                        {"name": self._name, "seq": first + i, "recorded_at": now, **row}
                        for i, row in enumerate(rows)
                    ],
                )
        except _NoHead:
            return False
        return True

    def _claim(self, conn: Any, sa: Any, key: str, now: float) -> bool:
        """Insert the plain revoke's ``key``; False if a live one is there."""
        once = self._once
        values = {"name": self._name, "key": key, "expires_at": now + self._ttl}
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert

            statement = insert(once).values(**values)
            upsert = statement.on_conflict_do_update(
                index_elements=[once.c.name, once.c.key],
                set_={"expires_at": statement.excluded.expires_at},
                where=once.c.expires_at < now,  # an expired key is taken over
            )
            return conn.execute(upsert.returning(once.c.key)).first() is not None
        conn.execute(
            sa.delete(once).where(
                once.c.name == self._name, once.c.key == key, once.c.expires_at < now
            )
        )
        try:
            conn.execute(sa.insert(once).values(**values))
        except sa.exc.IntegrityError:
            return False  # the caller rolls back
        return True

    def _append_parameters(self, rows: list[dict[str, Any]], now: float) -> dict[str, Any]:
        return {
            "name": self._name,
            "n": len(rows),
            "at": now,
            "reason": rows[0]["reason"],
            "grace": rows[0]["grace"],
            "targets": [row["targets"] for row in rows],
        }

    def _append_postgresql(
        self, engine: Any, sa: Any, rows: list[dict[str, Any]], now: float
    ) -> bool:
        """The same as one statement in autocommit: the head row is locked only
        while the server runs it and flushes the commit, never across a round
        trip to this process (which a busy machine may not run for a while)."""
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            written = conn.execute(
                sa.text(_POSTGRESQL_APPEND), self._append_parameters(rows, now)
            ).all()
        return len(written) == len(rows)

    def _take(self, conn: Any, sa: Any, count: int) -> int | None:
        """Add ``count`` to the head row (locking it); the new value, or None without a row."""
        head = self._head
        where = head.c.name == self._name
        if conn.dialect.update_returning:  # SQLite 3.35 and newer
            update = sa.update(head).where(where).values(seq=head.c.seq + count)
            row = conn.execute(update.returning(head.c.seq)).first()
            return None if row is None else int(row[0])
        if conn.dialect.name in ("mysql", "mariadb"):
            # LAST_INSERT_ID(expr) hands the new value back with the UPDATE's reply.
            update = (
                sa.update(head).where(where).values(seq=sa.func.last_insert_id(head.c.seq + count))
            )
            result = conn.execute(update)
            return None if result.rowcount == 0 else int(result.lastrowid)
        if conn.execute(sa.update(head).where(where).values(seq=head.c.seq + count)).rowcount == 0:
            return None
        # Our own update is visible to us, and the row stays locked until commit.
        return int(conn.execute(sa.select(head.c.seq).where(where)).scalar_one())

    def _maybe_prune(self, now: float) -> None:
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            self.prune(now)
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping
            from .._log import logger
            from ..events import LEDGER_UNAVAILABLE

            logger.warning(LEDGER_UNAVAILABLE, error=f"could not prune expired entries: {exc}")

    def prune(self, now: float | None = None) -> int:
        """Delete expired entries, oldest first, in bounded batches; return how many."""
        import sqlalchemy as sa

        cutoff = (time.time() if now is None else now) - self._ttl
        entries = self._entries
        engine = self._engine_here()
        deleted = 0
        for _ in range(PRUNE_BATCHES):
            with engine.begin() as conn:
                rows = conn.execute(
                    sa.select(entries.c.seq, entries.c.recorded_at)
                    .where(entries.c.name == self._name)
                    .order_by(entries.c.seq)
                    .limit(PRUNE_BATCH)
                ).all()
                expired = 0
                for _seq, recorded_at in rows:
                    if recorded_at >= cutoff:
                        break
                    expired += 1
                if expired:
                    last = rows[expired - 1][0]
                    conn.execute(
                        sa.delete(entries).where(
                            entries.c.name == self._name, entries.c.seq <= last
                        )
                    )
                    deleted += expired
            if expired < PRUNE_BATCH:
                break
        once = self._once
        with engine.begin() as conn:
            # The keys of plain revokes whose entries have expired.
            conn.execute(
                sa.delete(once).where(
                    once.c.name == self._name, once.c.expires_at < cutoff + self._ttl
                )
            )
        return deleted

    # ------------------------------------------------------------------ reads

    def read(self, cursor: str | None) -> tuple[list[Row], str | None]:
        """The head, then the live rows in ``(cursor, head]``; the cursor is the head.

        Returns ``cursor`` itself when nothing is new.
        """
        import sqlalchemy as sa

        start = 0
        if cursor is not None:
            try:
                start = int(cursor)
            except ValueError:
                start = 0  # a cursor of another store: read everything once
        found: list[Row] = []
        try:
            engine = self._engine_here()
            self._ensure(engine)
            table = self._entries
            with engine.connect() as conn:
                if self.dialect == "postgresql":
                    # No BEGIN and ROLLBACK round trips around the reads:
                    # each statement sees everything committed before it.
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                head = conn.execute(
                    sa.select(self._head.c.seq).where(self._head.c.name == self._name)
                ).scalar()
                if head is None:
                    self._ready = False
                    return [], cursor
                head = int(head)
                if head == start:
                    return [], cursor  # nothing new: one primary-key lookup
                if head < start:
                    start = 0  # the head row was made anew: read it all again
                oldest = time.time() - self._ttl
                while start < head:
                    rows = conn.execute(
                        sa.select(
                            table.c.seq,
                            table.c.recorded_at,
                            table.c.reason,
                            table.c.targets,
                            table.c.grace,
                        )
                        .where(table.c.name == self._name, table.c.seq > start, table.c.seq <= head)
                        .order_by(table.c.seq)
                        .limit(PAGE)
                    ).all()
                    for seq, recorded_at, reason, targets, grace in rows:
                        if recorded_at is not None and float(recorded_at) >= oldest:
                            found.append(
                                (
                                    float(recorded_at),
                                    str(reason),
                                    str(targets),
                                    None if grace is None else float(grace),
                                )
                            )
                        start = int(seq)
                    if len(rows) < PAGE:
                        break
        except Exception as exc:
            self._ready = False
            raise StoreError(
                f"could not read the cancellation ledger ({self.where}): {exc}"
            ) from exc
        return found, str(head)

    def close(self) -> None:
        """Close the pool's connections (this process's own)."""
        self._engine_here().dispose()


class _KeySeen(Exception):
    """`SqlStore.append`: the plain revoke's key is there; nothing written."""


class _NoHead(Exception):
    """`SqlStore._append`: the app's head row is gone; roll back, make it, retry."""


class _SessionSetup:
    """A ``connect`` listener: run the session's time bounds on a new connection."""

    def __init__(self, statements: list[str]) -> None:
        self.statements = statements

    def __call__(self, dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for statement in self.statements:
                cursor.execute(statement)
        finally:
            cursor.close()
        # A SET in an open transaction is undone by a rollback: commit it.
        dbapi_connection.commit()
