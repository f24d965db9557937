"""Every store, bounded and written once (issue 18, points 1 and 7) on real workers.

A frozen PostgreSQL server: a private cluster of this test's own (``initdb``
and ``postgres`` on a free port, its socket in its own directory; run as
the ``postgres`` user when the tests run as root), whose processes the test
``SIGSTOP`` s and ``SIGCONT`` s. Its host's kernel still acknowledges TCP,
so neither the server's ``statement_timeout`` nor TCP keepalives fire, and
psycopg has no client-side read timeout. The shared PostgreSQL on 5432 is
never stopped: the write-once tests use a database of their own on it
(`tests.sql_dbs`).

Plain revokes are sent with ``Control.broadcast("revoke", ...)``, as a
client that does not run this library sends them, so only the workers write
the ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests import sql_dbs
from tests.soak.harness import free_port

from .conftest import Keys, Worker, assert_revoked, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("PostgreSQL's server binaries (initdb, postgres) are not installed")
    return Path(initdb).parent


class PrivatePostgres:
    """A PostgreSQL cluster of one test's own, which the test can freeze."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="cancellable-pg-"))
        self.data = self.directory / "data"
        self.port = free_port(random.Random())
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.directory, "postgres", "postgres")
            self.user = {"user": "postgres", "group": "postgres"}

    def start(self) -> None:
        """initdb (trust, no fsync), then ``postgres`` in a session of its own."""
        bin_dir = _pg_bin()
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "--no-sync", "--no-instructions"],
            check=True, capture_output=True, **self.user,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.directory), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "max_connections=40"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "postgres.log", "wb"),  # noqa: SIM115
            **self.user,
        )  # fmt: skip

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}")
            engine = sa.create_engine(
                self.url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 2}
            )
            try:
                with engine.connect() as conn:
                    return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() is not None
            except sa.exc.OperationalError:
                return False
            finally:
                engine.dispose()

        wait_for(up, 30, interval=0.1, message=f"a private postgres on port {self.port}")

    def pause(self) -> None:
        """SIGSTOP the server, then each of its processes (every backend is a
        process group of its own)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)  # first: it forks no more
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT them."""
        assert self.proc is not None
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        os.kill(self.proc.pid, signal.SIGCONT)

    def children(self) -> list[int]:
        """The server's child processes (its backends and helpers)."""
        assert self.proc is not None
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # "pid (comm) state ppid ...": comm may hold spaces.
                if int(stat.read_text().rpartition(")")[2].split()[1]) == self.proc.pid:
                    found.append(int(stat.parent.name))
        return found

    def stop(self) -> None:
        """Resume, then an immediate shutdown; remove the cluster."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def rows_naming(self, task_id: str) -> int:
        """Rows of the ledger that name ``task_id``."""
        return rows_naming(self.url, task_id)


def rows_naming(db_url: str, task_id: str) -> int:
    """How many rows of the SQL ledger at ``db_url`` name ``task_id``."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT targets FROM cancellable_ledger")).all()
    finally:
        engine.dispose()
    return sum(f"task:{task_id}" in targets.split("\n") for (targets,) in rows)


@pytest.fixture(name="private_postgres")
def private_postgres_fixture() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster, resumed and removed at teardown."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def plain_revoke(worker: Worker, task_ids: list[str]) -> None:
    """A plain revoke broadcast, as a client without this library sends it (no reply)."""
    worker.app.control.broadcast(
        "revoke",
        arguments={"task_id": task_ids, "terminate": False, "signal": "SIGTERM"},
        reply=False,
    )


def test_cancel_returns_within_its_bound_while_the_postgresql_ledger_is_frozen(
    make_worker: Callable[..., Worker], private_postgres: PrivatePostgres, keys: Keys
) -> None:
    """The SQL ledger is a private PostgreSQL whose processes are stopped (SIGSTOP)
    after a first ``cancel()`` left a pooled connection to it: ``cancel()`` of a
    running task returns within ``cancellable_cancel_timeout`` (6 s) with a
    ``LedgerUnavailableWarning``, the broadcast still stops the task (REVOKED), and
    a worker stops within its bound while the server stays frozen. Once the server
    runs again the abandoned write completes (the row is there) and the next
    ``cancel()`` is durable without a warning. (On main ``cancel()`` waited for
    the frozen server for ever.)"""
    from cancellable.celery import LedgerUnavailableWarning, cancel

    worker = make_worker(pool="prefork", settings={"cancellable_ledger_url": private_postgres.url})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cancel(f"warm-{uuid.uuid4()}", "warm up", app=worker.app)  # tables, a pooled connection
    assert [] == [str(w.message) for w in caught]
    result = worker.send("cit.loop", keys.key("t"), 60.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")

    private_postgres.pause()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.monotonic()
            cancel(result, "frozen store", app=worker.app)
            took = time.monotonic() - began
        assert took < 6.5, f"cancel() took {took:.1f} s with the ledger frozen"
        assert [LedgerUnavailableWarning] == [w.category for w in caught], [
            str(w.message) for w in caught
        ]
        assert "did not answer" in str(caught[0].message)
        assert_revoked(result, "frozen store")

        began = time.monotonic()
        worker.stop(timeout=30)
        stopped = time.monotonic() - began
        assert stopped < 20.0, f"the worker took {stopped:.1f} s to stop"
        assert worker.proc is not None
        assert 0 == worker.proc.returncode, worker.tail()
        print(f"cancel() took {took:.2f} s; the worker stopped in {stopped:.2f} s")
    finally:
        private_postgres.resume()

    wait_for(
        lambda: private_postgres.rows_naming(result.id) == 1,
        20,
        message="the abandoned write to complete once the server runs again",
    )
    other = f"after-{uuid.uuid4()}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cancel(other, "thawed", app=worker.app)
    assert [] == [str(w.message) for w in caught]
    assert 1 == private_postgres.rows_naming(other)


@pytest.fixture(name="postgres_db", scope="module")
def postgres_db_fixture() -> Iterator[str]:
    """A database of this module's own on the shared PostgreSQL (never stopped)."""
    with sql_dbs.temporary_database("postgresql") as name:
        yield sql_dbs.url("postgresql", name, driver="psycopg2")


def two_workers(make_worker: Callable[..., Worker], ledger_url: str) -> tuple[Worker, Worker]:
    """Two prefork workers on one control exchange, one ledger."""
    settings = {"cancellable_ledger_url": ledger_url}
    first = make_worker(pool="prefork", settings=settings)
    second = make_worker(pool="prefork", settings=settings, control_exchange=first.control_exchange)
    return first, second


def test_one_plain_revoke_to_two_workers_is_one_sql_ledger_record(
    make_worker: Callable[..., Worker], postgres_db: str
) -> None:
    """A plain revoke of 1,500 ids reaches two workers whose ledger is PostgreSQL: the
    ledger holds it once (2 rows, each id once), not once per worker. (On main each
    worker wrote it: 4 rows, each id twice.)"""
    first, second = two_workers(make_worker, postgres_db)
    ids = [f"bulk-{uuid.uuid4()}" for _ in range(1500)]

    plain_revoke(first, ids)
    first.barrier(timeout=20)
    second.barrier(timeout=20)
    wait_for(lambda: rows_naming(postgres_db, ids[0]) >= 1, 15, message="the revoke recorded")
    time.sleep(2.0)  # both ledger threads have written, or skipped, by now

    engine = sa.create_engine(postgres_db, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT targets FROM cancellable_ledger WHERE name = :n ORDER BY seq"),
                {"n": first.app.main},
            ).all()
    finally:
        engine.dispose()
    assert [1000, 500] == [len(targets.split("\n")) for (targets,) in rows]
    assert sorted(f"task:{i}" for i in ids) == sorted(
        t for (targets,) in rows for t in targets.split("\n")
    )


def test_one_plain_revoke_to_two_workers_is_one_file_ledger_record(
    make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """A plain revoke of 1,500 ids reaches two workers whose ledger is one file: the
    file holds it once (2 lines, each id once), not once per worker. (On main each
    worker wrote it: 4 lines, each id twice.)"""
    directory = tmp_path / "ledger"
    first, second = two_workers(make_worker, f"file://{directory}")
    ids = [f"bulk-{uuid.uuid4()}" for _ in range(1500)]

    plain_revoke(first, ids)
    first.barrier(timeout=20)
    second.barrier(timeout=20)
    log = directory / "ledger.jsonl"
    wait_for(lambda: log.exists() and ids[0] in log.read_text(), 15, message="the revoke")
    time.sleep(2.0)  # both ledger threads have written, or skipped, by now

    entries = [json.loads(line) for line in log.read_text().splitlines() if '"targets"' in line]
    assert [1000, 500] == [len(entry["targets"]) for entry in entries]
    assert sorted(ids) == sorted(target for e in entries for _kind, target in e["targets"])
