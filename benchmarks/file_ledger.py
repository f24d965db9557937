"""The file ledger's cost per record once many entries are live (issue 18, point 5).

Fills a fresh `~cancellable.celery._ledger.FileLedger` (in a temporary
directory, or ``--dir``) with ``--live-mib`` MiB of live entries (records of
1,000 ids), then times ``--records`` single-id records one after the other
and prints the median, 95th percentile and largest time per record, and how
many compactions (new file generations) they caused.  Before issue 18 every
record past 4 MiB of live entries rewrote the whole file (36-57 ms per
record); now a file is compacted only once it has doubled since its last
compaction.

Usage: ``python benchmarks/file_ledger.py [--live-mib 6] [--records 300]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from cancellable import CancelReason
from cancellable.celery._ledger import FileLedger


def generation(path: Path) -> str:
    """The file's generation (its header), or "" for a file without one."""
    with open(path, "rb") as log:
        first = log.readline()
    try:
        return str(json.loads(first).get("generation", ""))
    except ValueError:
        return ""


def measure(directory: Path, live_mib: float, records: int) -> dict[str, float]:
    """Fill ``directory``'s ledger, then time ``records`` single-id records."""
    ledger = FileLedger(directory, 7 * 24 * 3600)
    path = directory / "ledger.jsonl"
    reason = CancelReason(source="revoked", message="benchmark")
    while not path.exists() or path.stat().st_size < live_mib * 1024 * 1024:
        ledger.record([("task", str(uuid.uuid4())) for _ in range(1000)], reason)
    generations = {generation(path)}
    times = []
    for _ in range(records):
        start = time.perf_counter()
        ledger.record([("task", str(uuid.uuid4()))], reason)
        times.append((time.perf_counter() - start) * 1000.0)
        generations.add(generation(path))
    times.sort()
    return {
        "live_mib": round(path.stat().st_size / 1024 / 1024, 2),
        "records": records,
        "median_ms": round(statistics.median(times), 3),
        "p95_ms": round(times[int(len(times) * 0.95) - 1], 3),
        "max_ms": round(times[-1], 3),
        "compactions": len(generations) - 1,
    }


def main() -> None:
    """Parse the arguments, measure, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live-mib", type=float, default=6.0)
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if args.dir is not None:
        print(json.dumps(measure(args.dir, args.live_mib, args.records)))
        return
    with tempfile.TemporaryDirectory(prefix="cancellable-file-ledger-") as tmp:
        print(json.dumps(measure(Path(tmp), args.live_mib, args.records)))


if __name__ == "__main__":
    main()
