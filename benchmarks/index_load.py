"""Where a worker's first read of a large ledger spends its time, in one process.

`index_memory.py` measures the whole worker (memory, first ping); this one
times the load itself (`TargetIndex.load
<cancellable.celery._index.TargetIndex.load>`) on a ledger filled the same
way (N canonical UUID task ids in entries of 1,000), and its parts:

* ``read_s``: the Redis reads and the parsing of the entries alone
  (iterating `RedisLedger.read_pages
  <cancellable.celery._ledger.RedisLedger.read_pages>`);
* ``load_s``: the whole load (read, conversion, the sort into the table,
  ``malloc_trim``), ``load_cpu_s`` the CPU time of this process in it (the
  Redis server works in its own), and ``build_s``: the sort alone
  (``_idtable._build_rows``; ``_build`` in versions before it).

``--against REV`` also times the code of a git revision (its
``src/cancellable`` extracted into a temporary directory and imported as
``cancellable_before``) on the same ledger, in the same process, the two
alternating, so the ratios come from one run.  ``--profile`` prints the
functions of one load that took the most time (cProfile).  Run::

    python benchmarks/index_load.py --redis redis://127.0.0.1:6431/14 \\
        --sizes 1000000 --repeat 3 --against HEAD~1

Load (``os.getloadavg``) is printed with every row: the machine may be shared.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import os
import pstats
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import flush_benchmark_db
from index_memory import LEDGER_KEY, fill_ledger

ROOT = Path(__file__).resolve().parent.parent
PREFIX = LEDGER_KEY.removesuffix("ledger")
TTL = 7 * 24 * 3600.0


def package_at(rev: str, into: Path) -> str:
    """Extract ``src/cancellable`` of git revision ``rev`` as package ``cancellable_before``."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src/cancellable"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    (into / "src" / "cancellable").rename(into / "cancellable_before")
    sys.path.insert(0, str(into))
    return "cancellable_before"


class Code:
    """One version of the index and the ledger: ``cancellable`` or ``cancellable_before``."""

    def __init__(self, package: str, label: str) -> None:
        self.label = label
        self.index: ModuleType = importlib.import_module(f"{package}.celery._index")
        self.ledger: ModuleType = importlib.import_module(f"{package}.celery._ledger")
        self.idtable: ModuleType = importlib.import_module(f"{package}.celery._idtable")

    def make_ledger(self, client: Any) -> Any:
        return self.ledger.RedisLedger(client, PREFIX, TTL)

    def time_read(self, client: Any) -> float:
        ledger = self.make_ledger(client)
        started = time.perf_counter()
        for _page in ledger.read_pages(None):
            pass
        return time.perf_counter() - started

    def time_load(self, client: Any) -> tuple[float, float, float, int]:
        """The whole load (wall, CPU), the part of it `_build` took (wall); the ids indexed."""
        ledger = self.make_ledger(client)
        index = self.index.TargetIndex()
        # The sort: `_build_rows` since the load stages rows, `_build` before.
        name = "_build_rows" if hasattr(self.idtable, "_build_rows") else "_build"
        build = getattr(self.idtable, name)
        spent = [0.0]

        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return build(*args)
            finally:
                spent[0] += time.perf_counter() - started

        setattr(self.idtable, name, timed)
        try:
            started, cpu = time.perf_counter(), time.process_time()
            index.load(ledger)
            total, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            setattr(self.idtable, name, build)
        return total, cpu, spent[0], len(index)

    def profile(self, client: Any, top: int) -> str:
        ledger = self.make_ledger(client)
        index = self.index.TargetIndex()
        profiler = cProfile.Profile()
        profiler.runcall(index.load, ledger)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
        return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6422/14")
    parser.add_argument("--sizes", default="1000000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--against", default=None, help="a git revision to time as well")
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import redis

    codes = [Code("cancellable", "now")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            codes.append(Code(package_at(args.against, Path(tmp)), args.against))
        client = redis.Redis.from_url(args.redis)
        rows = []
        try:
            for n in (int(s) for s in args.sizes.split(",")):
                flush_benchmark_db(args.redis)
                fill_ledger(args.redis, n)
                for round_ in range(args.repeat):
                    for code in codes:
                        read_s = code.time_read(client)
                        load_s, cpu_s, build_s, ids = code.time_load(client)
                        row = {
                            "ids": n,
                            "code": code.label,
                            "round": round_,
                            "read_s": round(read_s, 3),
                            "load_s": round(load_s, 3),
                            "load_cpu_s": round(cpu_s, 3),
                            "build_s": round(build_s, 3),
                            "indexed": ids,
                            "load": [round(x, 2) for x in os.getloadavg()],
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                if args.profile:
                    for code in codes:
                        print(f"--- {code.label}, {n} ids ---")
                        print(code.profile(client, args.profile), flush=True)
        finally:
            flush_benchmark_db(args.redis)
            client.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
