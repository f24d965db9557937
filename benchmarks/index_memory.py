"""What a large ledger costs a real prefork worker: memory per process, time to first ping.

For each ledger size N (0, 10k, 100k, 1M, 5M live task ids by default), the
benchmark Redis database is flushed and filled with N canonical UUID task
ids in entries of 1,000 (the layout `RedisLedger.record` writes: one
``XADD`` per entry, in pipelines), then one ``celery worker --pool=prefork
-c <concurrency>`` of ``bench_app`` is started.  Reported per size:

* ``first_ping_s``: from launching the worker to its first answered ping
  (the worker reads the whole ledger into its index while it starts);
* ``main`` and ``child`` (the largest pool child): RSS, PSS and USS in MB
  (``/proc/<pid>/smaps_rollup``), sampled ``SETTLE_S`` after the ping;
* the same minus the empty-ledger worker's (``*_over_empty``).

USS is what a process holds alone (what one more child costs); PSS shares
the shared pages among the processes mapping them; RSS counts them in full
for each.  Run: ``python benchmarks/index_memory.py --redis
redis://127.0.0.1:6422/14 [--sizes 0,10000,1000000] [--json out.json]``.
Load (``os.getloadavg``) is printed with every row: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import Worker, flush_benchmark_db, live_children

#: Ids per ledger entry (`cancellable.celery._ledger.CHUNK`).
CHUNK = 1000
#: Seconds between the first ping and the memory sample.
SETTLE_S = 3.0
LEDGER_KEY = "cancellable:cancellable_bench:ledger"
REASON = json.dumps({"source": "manual", "message": "index_memory benchmark"})


def fill_ledger(redis_url: str, n: int) -> list[str]:
    """XADD ``n`` fresh task ids in entries of `CHUNK`; return a sample of them."""
    import redis

    client = redis.Redis.from_url(redis_url)
    sample: list[str] = []
    pipe = client.pipeline(transaction=False)
    for start in range(0, n, CHUNK):
        ids = [str(uuid.uuid4()) for _ in range(min(CHUNK, n - start))]
        sample.append(ids[0])
        pipe.xadd(LEDGER_KEY, {"reason": REASON, "targets": "\n".join("task:" + i for i in ids)})
        if len(pipe) >= 50:
            pipe.execute()
    pipe.execute()
    client.close()
    return sample


def memory_mb(pid: int) -> dict[str, float]:
    """RSS, PSS and USS of ``pid`` in MB, from ``/proc/<pid>/smaps_rollup``."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {
        "rss": fields.get("Rss", 0) / 1024,
        "pss": fields.get("Pss", 0) / 1024,
        "uss": uss / 1024,
    }


def measure(redis_url: str, n: int, concurrency: int) -> dict[str, Any]:
    """One worker on a ledger of ``n`` ids."""
    flush_benchmark_db(redis_url)
    t0 = time.monotonic()
    fill_ledger(redis_url, n)
    fill_s = time.monotonic() - t0
    worker = Worker(redis_url, concurrency=concurrency)
    try:
        started = time.monotonic()
        worker.start()
        first_ping = time.monotonic() - started
        time.sleep(SETTLE_S)
        main = memory_mb(worker.pid)
        children = [memory_mb(pid) for pid in live_children(worker.pid)]
        report = worker.app.control.inspect(destination=[worker.nodename], timeout=5.0)._request(
            "cancellable_bench_index"
        )
        targets = (report or {}).get(worker.nodename, {}).get("targets")
    finally:
        worker.stop()
        worker.close()
        flush_benchmark_db(redis_url)
    child = max(children, key=lambda m: m["uss"]) if children else {}
    return {
        "ids": n,
        "fill_s": round(fill_s, 2),
        "first_ping_s": round(first_ping, 3),
        "index_targets": targets,
        "main": {k: round(v, 1) for k, v in main.items()},
        "child": {k: round(v, 1) for k, v in child.items()},
        "children": len(children),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6422/14")
    parser.add_argument("--sizes", default="0,10000,100000,1000000,5000000")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    base: dict[str, Any] | None = None
    for n in (int(s) for s in args.sizes.split(",")):
        row = measure(args.redis, n, args.concurrency)
        if n == 0:
            base = row
        if base is not None:
            for proc in ("main", "child"):
                row[f"{proc}_over_empty"] = {
                    k: round(row[proc].get(k, 0) - base[proc].get(k, 0), 1) for k in row[proc]
                }
            row["first_ping_over_empty_s"] = round(row["first_ping_s"] - base["first_ping_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
