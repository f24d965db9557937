"""The database servers the SQL-ledger tests use, and their private databases.

Two settings, each a SQLAlchemy URL of a server without a database name:

* ``CANCELLABLE_TEST_POSTGRES`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432``),
* ``CANCELLABLE_TEST_MARIADB`` (default ``mysql+pymysql://root@127.0.0.1:3306``).

Tests never use an existing database: `temporary_database` creates one with
a unique name (``cancellable_test_<hex>``) and drops it afterwards, so
several test runs can share a server.  When a server does not answer,
`require` fails the test with what to start (never a skip).  This module
must not import `cancellable`: the integration harness and the benchmarks
import it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["MARIADB", "POSTGRES", "require", "temporary_database", "url"]

POSTGRES = os.environ.get(
    "CANCELLABLE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432"
).rstrip("/")
MARIADB = os.environ.get("CANCELLABLE_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306").rstrip(
    "/"
)
_SERVERS = {"postgresql": POSTGRES, "mysql": MARIADB}
_MAINTENANCE_DB = {"postgresql": "postgres", "mysql": "mysql"}
_HOW_TO_START = {
    "postgresql": "PostgreSQL (Debian: `pg_ctlcluster 15 main start`; trust auth, user postgres)",
    "mysql": "MariaDB (Debian: `service mariadb start`; user root without a password)",
}


def url(kind: str, database: str, driver: str | None = None) -> str:
    """The URL of ``database`` on the ``kind`` server ("postgresql" or "mysql").

    ``driver`` replaces the URL's ``+driver`` part (``"psycopg2"``; ``""``
    for none, SQLAlchemy's default driver).
    """
    base = _SERVERS[kind]
    if driver is not None:
        scheme, rest = base.split("://", 1)
        scheme = scheme.split("+", 1)[0] + (f"+{driver}" if driver else "")
        base = f"{scheme}://{rest}"
    return f"{base}/{database}"


def _admin_engine(kind: str):  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    connect_args = {"connect_timeout": 3}
    return sa.create_engine(
        url(kind, _MAINTENANCE_DB[kind]),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
        connect_args=connect_args,
    )


def require(kind: str) -> None:
    """Fail the test (not skip it) if the ``kind`` server does not answer."""
    import sqlalchemy as sa

    engine = _admin_engine(kind)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        pytest.fail(
            f"the SQL-ledger tests need {_HOW_TO_START[kind]} at {_SERVERS[kind]}: {exc}",
            pytrace=False,
        )
    finally:
        engine.dispose()


@contextlib.contextmanager
def temporary_database(kind: str) -> Iterator[str]:
    """A new, empty database on the ``kind`` server; yields its name, drops it at the end."""
    import sqlalchemy as sa

    require(kind)
    name = f"cancellable_test_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine(kind)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        yield name
    finally:
        drop = f"DROP DATABASE IF EXISTS {name}"
        if kind == "postgresql":
            drop += " WITH (FORCE)"  # connections a test left open do not block it
        with engine.connect() as conn:
            conn.execute(sa.text(drop))
        engine.dispose()
