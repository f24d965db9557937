"""Run the cancellable benchmarks: the per-call harness, then the real-worker harness.

Usage::

    python benchmarks/run.py --quick                        # under a minute, rough numbers
    python benchmarks/run.py --json docs/_static/benchmarks.json \\
        --plot docs/_static/overhead.png --cdf docs/_static/latency_cdf.png \\
        --groups-plot docs/_static/bulk_groups.png         # the full run (about 30 minutes)
    python benchmarks/run.py --only 'checkpoint.*'          # a subset (glob, or a substring)
    python benchmarks/run.py --report results.json          # the table of a finished run

Two harnesses, one results document:

* `per_call.py`: every statement of ``cases.py`` (``baseline.*``,
  ``checkpoint.*``, ``is_cancelled.*``, ``alt.*``, ``peers.*``,
  ``context.*``), timed by pyperf in worker processes; ratios taken pass by
  pass in the same run.
* `real_workers.py`: delivery latency, throughput, in-task costs, the peers'
  latency, bulk cancellation and the ladder, over real Celery (and dramatiq)
  workers (``latency.*``, ``throughput.*``, ``celery.*``,
  ``peers.latency.*``, ``bulk.*``, ``ladder.*``).

The instruction counts (``instructions.py``, ``lookups.py``) are separate
programs: they need valgrind and one interpreter per column.

Redis (DB 14 of ``--redis-url``, the only database the suite writes and
flushes) is needed by the ``alt.*`` cases and by every real worker.  The
document is ``{"environment": {...}, "results": [...]}`` (see
``_common.py``); ``--cdf FILE`` also writes the raw latency samples, in ms,
to ``FILE`` with the suffix ``.json``.  ``--smoke`` runs both harnesses with
tiny counts, for the test suite (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bulk
import per_call
import real_workers
from _common import DEFAULT_REDIS_URL, check_schema, environment, log, selected, skipped


def expected_names(mode: str, only: str | None = None) -> list[str]:
    """Every result name a run produces (measured or skipped) for ``--only``."""
    every = per_call.expected_names(only)
    return every + [name for name in real_workers.names(mode) if selected(name, only)]


def redis_problem(url: str) -> str | None:
    """None if Redis answers at ``url``, else a sentence saying why not."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"Redis is not reachable at {url}: {exc}"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a rough run, under one minute")
    mode.add_argument("--smoke", action="store_true", help="tiny counts, for the test suite")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument(
        "--only", metavar="PATTERN", help="only the names that match (glob/substring)"
    )
    parser.add_argument("--plot", metavar="PNG", help="plot the checkpoint's overhead in a loop")
    parser.add_argument("--cdf", metavar="PNG", help="plot the latency CDF; samples to PNG's .json")
    parser.add_argument("--groups-plot", metavar="PNG", help="plot the bulk.group_* results")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis, DB 14")
    parser.add_argument("--report", metavar="JSON", help="print the table of a results file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both harnesses on the selected names; return the results document."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    redis_error = redis_problem(args.redis_url)
    if redis_error:
        log(f"warning: {redis_error}; what needs it is reported as skipped")
    env = environment()
    results = per_call.run(mode, args.only, args.redis_url, redis_error)
    worker_names = [n for n in real_workers.names(mode) if selected(n, args.only)]
    if redis_error:
        results += [skipped(name, redis_error) for name in worker_names]
    elif worker_names:
        results += real_workers.run(mode, args.only, args.redis_url)
    return {"environment": env, "results": results}


def write_plots(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """The plots asked for on the command line, from this run's results."""
    if args.plot and any(r["name"].endswith(".overhead_pct") for r in doc["results"]):
        per_call.plot_overhead(doc["results"], Path(args.plot))
        log(f"overhead plot written to {args.plot}")
    if args.cdf and real_workers.RAW:
        samples = Path(args.cdf).with_suffix(".json")
        samples.write_text(json.dumps({"unit": "ms", "samples": real_workers.RAW}, indent=1) + "\n")
        real_workers.plot_cdf(real_workers.RAW, Path(args.cdf))
        log(f"CDF plot written to {args.cdf}, its samples to {samples}")
    if args.groups_plot and args.json:
        bulk.plot_groups(Path(args.json), Path(args.groups_plot))
        log(f"group plot written to {args.groups_plot}")


def summary(doc: dict[str, Any]) -> str:
    """A plain-text table of the results, with the ratios of the same run."""
    lines = [f"{'name':50} {'median':>14} {'p90':>12} {'x empty':>9} {'x loop':>8} {'x cp':>8}"]
    for record in doc["results"]:
        if record.get("skipped"):
            lines.append(f"{record['name']:50} skipped: {record['reason']}")
            continue
        unit = record["unit"]
        p90 = f"{record['p90']:.4g} {unit}" if "p90" in record else ""
        cells = [
            "" if record.get(key) is None else f"{record[key]:.3g}"
            for key in ("ratio_to_empty_call", "ratio_to_loop_iteration", "ratio_to_checkpoint")
        ]
        lines.append(
            f"{record['name']:50} {record['median']:>11.4g} {unit:2} {p90:>12} "
            f"{cells[0]:>9} {cells[1]:>8} {cells[2]:>8}"
        )
    lines.append(
        "(ratios net of baseline.timeit_loop, medians of each pass's ratio: x empty = per "
        "baseline.empty_call, x loop = per baseline.loop_iteration, x cp = per "
        "checkpoint.live_scope)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 if a result is missing or a part failed)."""
    args = parse_args(argv)
    if args.report:
        print(summary(json.loads(Path(args.report).read_text())))
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    expected = expected_names(mode, args.only)
    if not expected:
        log(f"--only {args.only!r} matches no benchmark")
        return 2
    per_call.quiet_logs()
    doc = run(args)
    print(summary(doc))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    write_plots(args, doc)
    problems = check_schema(doc, expected)
    problems += [
        f"{r['name']}: {r['reason']}"
        for r in doc["results"]
        if str(r.get("reason")).startswith("failed")
    ]
    if problems:
        log("the results have problems:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
