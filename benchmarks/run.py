"""Run the cancellable benchmark suite and write the results.

Usage::

    python benchmarks/run.py                      # full run (several minutes)
    python benchmarks/run.py --quick              # under a minute, rough numbers
    python benchmarks/run.py --json out.json --plot docs/_static/overhead.png \
        --cdf docs/_static/latency_cdf.png
    python benchmarks/run.py --only 'checkpoint.*'

Parts, each a module of this directory:

* ``micro.py``: per-call costs (``baseline.*``, ``checkpoint.*``,
  ``is_cancelled.*``, ``alt.*``), measured by pyperf in worker processes;
  this driver starts the pyperf program as a subprocess and reads its JSON.
* ``paired.py``: ``paired.*``, the checkpoint/empty-call ratios measured
  back to back, round after round, for a robust answer on a noisy machine.
* ``in_task.py``: ``celery.*``, ``current_task.request.revoked()`` timed
  inside a real task.
* ``overhead.py``: ``context.*``, the overhead of a checkpoint per iteration
  on loop bodies of 100 ns to 100 us, and the plot.
* ``latency.py`` and ``throughput.py``: delivery latency (with Celery's
  ``revoke(terminate=True)`` and ``AbortableTask`` beside it) and task
  throughput over real Celery workers.  ``--cdf FILE`` plots the latency
  distributions (PNG) and writes their raw samples, in ms, next to it
  (``FILE`` with the suffix ``.json``: ``{"unit": "ms", "samples": {name:
  [...]}}``), the only place the maxima are kept.
* ``peers.py``: ``peers.latency.*``, dramatiq-abort's delivery latency
  through a real dramatiq worker on the same Redis, sampled in turns with
  ours over the shared Celery worker.  The peers' per-call checks
  (``peers.*`` in ``cases.py``: dramatiq-abort, Temporal, cancelscope) are
  micro cases; they and the dramatiq worker need the ``bench`` extra, and
  are reported as skipped without it.
* ``bulk.py``: ``bulk.*``, one ``cancellable.celery.cancel()`` of 1,000 to
  100,000 queued ids and the sustained cancel rate, over a worker of its own
  (Celery's revoked set capped at 100 ids).

Redis (DB 14 of ``--redis-url``) is used by the ``alt.*`` cases and the
Celery parts.  The JSON document is ``{"environment": {...}, "results":
[...]}``; see ``_common.py`` for the record format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workers
import bulk
import in_task
import latency
import micro
import overhead
import paired
import peers
import throughput
from _common import (
    DEFAULT_REDIS_URL,
    EMPTY_CALL,
    LOOP_ITERATION,
    TIMEIT_LOOP,
    add_ratios,
    check_schema,
    environment,
    log,
    selected,
    skipped,
)
from cases import CASES

CELERY_PARTS = (in_task, latency, throughput, peers)
#: Errors of parts that failed (they are reported as skipped; the exit status is 1).
FAILURES: list[str] = []


def expected_names(only: str | None = None) -> list[str]:
    """Every result name a run produces (measured or skipped) for ``--only``."""
    names = [case.name for case in micro.select_cases(only)]
    names += [name for name in paired.NAMES if selected(name, only)]
    names += [name for name in in_task.NAMES if selected(name, only)]
    for label, _target in overhead.TARGETS:
        for suffix in ("overhead_pct", "added_ns", "body_ns"):
            name = f"context.body_{label}.{suffix}"
            if selected(name, only):
                names.append(name)
    names += [name for name in latency.NAMES if selected(name, only)]
    names += [name for name in throughput.NAMES if selected(name, only)]
    names += [name for name in peers.NAMES if selected(name, only)]
    names += [name for name in bulk.NAMES if selected(name, only)]
    return names


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
    parser.add_argument("--quick", action="store_true", help="a rough run, under one minute")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny iteration counts, for the test suite only (the numbers mean nothing)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument(
        "--only",
        metavar="PATTERN",
        help="run only the results whose names match (glob, or a substring)",
    )
    parser.add_argument("--plot", metavar="FILE", help="write the overhead plot (PNG) to FILE")
    parser.add_argument(
        "--cdf",
        metavar="FILE",
        help="write the CDF plot of the delivery latencies (PNG) to FILE, and their raw "
        "samples to FILE with the suffix .json",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"Redis for the alt.* and Celery benchmarks (default {DEFAULT_REDIS_URL})",
    )
    return parser.parse_args(argv)


def run_celery_parts(
    mode: str, only: str | None, redis_url: str, redis_error: str | None
) -> list[dict[str, Any]]:
    """``celery.*``, ``latency.*``, ``throughput.*`` and ``peers.latency.*``, sharing one worker.

    Each is reported as skipped, with the reason, when Redis is missing, in
    ``--smoke`` mode (no workers), or when the worker fails; a failure is
    also logged.
    """
    names = [n for part in CELERY_PARTS for n in part.NAMES if selected(n, only)]
    if not names:
        return []
    reason = redis_error
    if reason is None and mode == "smoke":
        reason = "not run in --smoke mode, which starts no Celery workers"
    if reason is not None:
        return [skipped(name, reason) for name in names]
    results: list[dict[str, Any]] = []
    try:
        with _workers.session(redis_url) as worker:
            log(f"celery: worker {worker.nodename} is up")
            for part in CELERY_PARTS:
                results += part.run(mode, only, redis_url, worker)
    except Exception as exc:
        log(f"error: the Celery benchmarks failed: {exc!r}")
        done = {r["name"] for r in results}
        results += [skipped(n, f"failed: {exc!r}") for n in names if n not in done]
        FAILURES.append(repr(exc))
    return results


def run_bulk(
    mode: str, only: str | None, redis_url: str, redis_error: str | None
) -> list[dict[str, Any]]:
    """``bulk.*``, over a worker of its own; skipped like the other Celery parts."""
    names = [n for n in bulk.NAMES if selected(n, only)]
    if not names:
        return []
    reason = redis_error
    if reason is None and mode == "smoke":
        reason = "not run in --smoke mode, which starts no Celery workers"
    if reason is not None:
        return [skipped(name, reason) for name in names]
    try:
        return bulk.run(mode, only, redis_url)
    except Exception as exc:
        log(f"error: the bulk cancellation benchmarks failed: {exc!r}")
        FAILURES.append(repr(exc))
        return [skipped(n, f"failed: {exc!r}") for n in names]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected part; return the results document."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    redis_error = redis_problem(args.redis_url)
    if redis_error:
        log(f"warning: {redis_error}; the benchmarks that need it are reported as skipped")
    env = environment()
    results: list[dict[str, Any]] = []
    results += micro.run(mode, args.only, args.redis_url, redis_error)
    results += paired.run(mode, args.only)
    context_records, raw = overhead.run(mode, args.only)
    results += context_records
    results += run_celery_parts(mode, args.only, args.redis_url, redis_error)
    results += run_bulk(mode, args.only, args.redis_url, redis_error)
    add_ratios(results)
    if args.plot and raw:
        by_name = {r["name"]: r for r in results if not r.get("skipped")}
        live = by_name.get("checkpoint.live_scope")
        harness = by_name.get(TIMEIT_LOOP)
        net = live["median"] - harness["median"] if live and harness else None
        overhead.plot(raw, Path(args.plot), net)
        log(f"plot written to {args.plot}")
    if args.cdf:
        write_cdf({**latency.RAW, **peers.RAW}, Path(args.cdf))
    return {"environment": env, "results": results}


def write_cdf(raw: dict[str, list[float]], path: Path) -> None:
    """The CDF plot at ``path`` and the raw samples beside it (``.json``), if any were taken.

    The plot shows the curves of `latency.CDF_CURVES`; the samples file
    also keeps the others (``peers.latency.*``), even when none of those
    curves was sampled.
    """
    if not any(raw.values()):
        log("no latency samples were taken: the CDF plot is not written")
        return
    samples = path.with_suffix(".json")
    samples.write_text(json.dumps({"unit": "ms", "samples": raw}, indent=1) + "\n")
    if any(raw.get(name) for name in latency.CDF_CURVES):
        latency.plot_cdf(raw, path)
        log(f"CDF plot written to {path}, its samples to {samples}")
    else:
        log(f"none of the CDF curves was sampled: no plot; the samples are in {samples}")
    for name, values in raw.items():
        log(f"  {name}: max {max(values):.2f} ms over {len(values)}")


def summary(doc: dict[str, Any]) -> str:
    """A plain-text table of the results."""
    lines = [f"{'name':42} {'median':>14} {'p90':>12} {'x empty':>9} {'x loop':>8}"]
    for record in doc["results"]:
        if record.get("skipped"):
            lines.append(f"{record['name']:42} skipped: {record['reason']}")
            continue
        unit = record["unit"]
        p90 = f"{record['p90']:.4g} {unit}" if "p90" in record else ""
        ratio_e = record.get("ratio_to_empty_call")
        ratio_l = record.get("ratio_to_loop_iteration")
        lines.append(
            f"{record['name']:42} {record['median']:>11.4g} {unit:2} {p90:>12} "
            f"{'' if ratio_e is None else f'{ratio_e:9.3g}':>9} "
            f"{'' if ratio_l is None else f'{ratio_l:8.3g}':>8}"
        )
    lines.append(
        f"(ratios are net of {TIMEIT_LOOP}: x empty = net / net {EMPTY_CALL}, "
        f"x loop = net / {LOOP_ITERATION})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    micro.quiet_logs()
    if args.only and not expected_names(args.only):
        known = ", ".join(case.name for case in CASES)
        log(f"--only {args.only!r} matches no benchmark (known micro names: {known})")
        return 2
    doc = run(args)
    problems = check_schema(doc, expected_names(args.only))
    print(summary(doc))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    if problems:
        log("the results document has problems:\n  " + "\n  ".join(problems))
        return 1
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
