"""The ledgers side by side: Redis, PostgreSQL, MariaDB and SQLite, in one run.

For each store it measures what a deployment pays:

* ``record``: one `cancel()`'s write of one task id (the ledger part of the
  cancel path), p50 and p99 of sequential calls;
* ``sustained``: ids per second recorded by several writer processes at once
  for a few seconds (cancels of one id, and cancels of 100 ids), while a
  reader polls; every id written must be read back exactly once ("lost"
  counts those that were not);
* ``start``: a worker's first read of a ledger holding 100,000 live ids
  (1,000 per entry), into a fresh index;
* ``poll``: a read when nothing is new, p50 and p99.

Each run uses its own Redis key, its own PostgreSQL and MariaDB databases
(created and dropped) and a SQLite file in a temporary directory::

    python benchmarks/ledgers.py [--redis redis://127.0.0.1:6379/14]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432]
        [--mariadb mysql+pymysql://root@127.0.0.1:3306] [--smoke]

Prints a Markdown table (docs/ledgers.md keeps the last one measured).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

WRITERS = 4


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def make_ledger(spec: dict[str, str]) -> Any:
    """A ledger from a picklable spec (so writer processes can make their own)."""
    from cancellable.celery import _ledger

    if spec["kind"] == "redis":
        import redis

        return _ledger.RedisLedger(redis.Redis.from_url(spec["url"]), spec["prefix"], 3600)
    from cancellable.celery._ledger_sql import SqlStore

    return _ledger.SqlLedger(SqlStore(spec["url"], spec["name"], 3600, lock_timeout=30))


def timed_calls(call: Callable[[], Any], count: int) -> list[float]:
    """Seconds each of ``count`` sequential calls took."""
    times = []
    for _ in range(count):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return times


def _writer(
    spec: dict[str, str], number: int, batch: int, seconds: float, ready: Any, go: Any, out: Any
) -> None:
    from cancellable import CancelReason

    ledger = make_ledger(spec)
    ledger.read(None)  # connected before the clock starts
    reason = CancelReason(message="bench")
    ready.put(number)
    go.wait(60)
    written = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ledger.record([("task", f"w{number}-{written + i}") for i in range(batch)], reason)
        written += batch
    out.put((number, written))


def sustained(spec: dict[str, str], batch: int, seconds: float) -> tuple[float, int]:
    """Ids/s from `WRITERS` processes recording ``batch`` ids per call; ids not read back once."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    spec = dict(
        spec, prefix=spec.get("prefix", "") + f"{batch}:", name=f"{spec.get('name')}-{batch}"
    )
    reader = make_ledger(spec)
    _, cursor = reader.read(None)
    procs = [
        ctx.Process(target=_writer, args=(spec, n, batch, seconds, ready, go, out))
        for n in range(WRITERS)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    seen: set[str] = set()
    duplicates = 0

    def take(entries: list[Any]) -> None:
        nonlocal duplicates
        for entry in entries:
            for _kind, target_id in entry.targets:
                duplicates += target_id in seen
                seen.add(target_id)

    began = time.monotonic()
    go.set()
    counts: dict[int, int] = {}
    while len(counts) < len(procs):
        entries, cursor = reader.read(cursor)
        take(entries)
        with contextlib.suppress(Exception):
            number, total = out.get(timeout=0.01)
            counts[number] = total
    elapsed = time.monotonic() - began
    entries, cursor = reader.read(cursor)
    take(entries)
    for proc in procs:
        proc.join(30)
    written = {f"w{n}-{i}" for n, total in counts.items() for i in range(total)}
    lost = len(written - seen) + duplicates
    return sum(counts.values()) / elapsed, lost


def measure(spec: dict[str, str], smoke: bool) -> dict[str, Any]:
    """Every figure for one store."""
    from cancellable import CancelReason
    from cancellable.celery._index import TargetIndex

    calls = 30 if smoke else 300
    seconds = 1.0 if smoke else 5.0
    live = 2_000 if smoke else 100_000
    ledger = make_ledger(spec)
    ledger.read(None)  # tables made, connection open
    reason = CancelReason(message="bench")
    record = timed_calls(lambda: ledger.record([("task", uuid.uuid4().hex)], reason), calls)
    single, lost_single = sustained(spec, 1, seconds)
    batched, lost_batched = sustained(spec, 100, seconds)
    # A fresh app name for the start figure: exactly `live` ids.
    start_spec = dict(
        spec, prefix=spec.get("prefix", "") + "start:", name=spec.get("name", "") + "-start"
    )
    filler = make_ledger(start_spec)
    ids = [("task", f"live-{n}") for n in range(live)]
    for chunk in range(0, live, 10_000):
        filler.record(ids[chunk : chunk + 10_000], reason)
    reader = make_ledger(start_spec)
    began = time.perf_counter()
    entries, cursor = reader.read(None)
    index = TargetIndex()
    index.add_entries(entries)
    start = time.perf_counter() - began
    assert sum(len(e.targets) for e in entries) == live
    poll = timed_calls(lambda: reader.read(cursor), calls)
    return {
        "record_p50_ms": percentile(record, 0.5) * 1e3,
        "record_p99_ms": percentile(record, 0.99) * 1e3,
        "ids_per_s_1": single,
        "ids_per_s_100": batched,
        "lost": lost_single + lost_batched,
        "start_s": start,
        "poll_p50_ms": percentile(poll, 0.5) * 1e3,
        "poll_p99_ms": percentile(poll, 0.99) * 1e3,
        "live": live,
    }


@contextlib.contextmanager
def database(server: str) -> Iterator[str]:
    """A new database on ``server`` (a URL without a database); yields its URL."""
    import sqlalchemy as sa

    maintenance = "postgres" if server.startswith("postgres") else "mysql"
    engine = sa.create_engine(
        f"{server}/{maintenance}", isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    name = f"cancellable_bench_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield f"{server}/{name}"
    finally:
        drop = f"DROP DATABASE IF EXISTS {name}"
        if server.startswith("postgres"):
            drop += " WITH (FORCE)"
        with engine.connect() as conn:
            conn.execute(sa.text(drop))
        engine.dispose()


def table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a Markdown table, one column per store."""
    stores = list(results)
    rows = [
        ("`cancel()` record of 1 id, p50 / p99 (ms)", "record_p50_ms", "record_p99_ms", "{:.2f}"),
        (f"sustained, {WRITERS} writers, 1 id per cancel (ids/s)", "ids_per_s_1", None, "{:,.0f}"),
        (
            f"sustained, {WRITERS} writers, 100 ids per cancel (ids/s)",
            "ids_per_s_100",
            None,
            "{:,.0f}",
        ),
        ("ids lost or read twice", "lost", None, "{}"),
        ("worker start: read {live:,} live ids into the index (s)", "start_s", None, "{:.2f}"),
        ("poll when nothing is new, p50 / p99 (ms)", "poll_p50_ms", "poll_p99_ms", "{:.2f}"),
    ]
    live = next(iter(results.values()))["live"]
    lines = ["| | " + " | ".join(stores) + " |", "|---" * (len(stores) + 1) + "|"]
    for label, key, key2, fmt in rows:
        cells = []
        for store in stores:
            cell = fmt.format(results[store][key])
            if key2:
                cell += " / " + fmt.format(results[store][key2])
            cells.append(cell)
        lines.append(f"| {label.format(live=live)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--mariadb", default="mysql+pymysql://root@127.0.0.1:3306")
    parser.add_argument("--smoke", action="store_true", help="tiny counts, to check it runs")
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    results: dict[str, dict[str, Any]] = {}
    prefix = f"cancellable-bench:{run}:"
    results["Redis"] = measure({"kind": "redis", "url": args.redis, "prefix": prefix}, args.smoke)
    import redis

    client = redis.Redis.from_url(args.redis)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()
    with database(args.postgres) as url:
        results["PostgreSQL"] = measure({"kind": "sql", "url": url, "name": run}, args.smoke)
    with database(args.mariadb) as url:
        results["MariaDB"] = measure({"kind": "sql", "url": url, "name": run}, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/ledger.db"
        results["SQLite"] = measure({"kind": "sql", "url": url, "name": run}, args.smoke)
    print(table(results))


if __name__ == "__main__":
    main()
