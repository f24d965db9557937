"""Per-call micro-benchmarks, measured with pyperf in worker processes.

Run as a script it is a pyperf benchmark program (``pyperf.Runner`` parses
``sys.argv`` and spawns one worker process per run)::

    python benchmarks/micro.py -o micro.json --fast [--only 'checkpoint.*']

``--hot-path`` selects just the cases of the hot-path table in
``docs/performance.md`` (`HOT_PATH` and the baselines), so that one
measurement per interpreter gives every figure of its row; ``table`` prints
that table from the JSON files, merging the files of the same interpreter.
On a shared machine, run it in short passes that take turns (the load then
hits every case and every interpreter a little, instead of one a lot)::

    for pass in 1 2 3 4 5 6 7 8; do
        for py in python3.10 python3.11 python3.12 python3.13; do
            $py benchmarks/micro.py --hot-path -p 3 -q -o hot-$py-$pass.json
        done
    done
    python benchmarks/micro.py table hot-*.json

``--peers`` selects the cases of the peers table (`PEERS_TABLE`: every
``peers.*`` case, ours beside them, and the baselines); ``peers.py table``
prints that table from passes taken the same way.

`run.py` does not call it that way by hand: it uses `run` below, which starts
this script as a subprocess with options tuned for ``--quick`` or the full
run, loads pyperf's JSON with ``pyperf.BenchmarkSuite.load`` and turns each
benchmark into a result record (nanoseconds per call).

The cases themselves (statements, setups) are in ``cases.py``.
"""

from __future__ import annotations

import atexit
import gc
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, log, measured, selected, skipped
from cases import BASELINES, CASES, Case, Options, make_inner, missing, run_setup, timed

HERE = Path(__file__).resolve().parent

#: pyperf options per mode.  The full run is pyperf's default (3 values after
#: 1 warmup, 100 ms per value) in 20 worker processes per benchmark, spread
#: over `PASSES` passes through the whole list, so that a noisy minute on this
#: shared machine hits every benchmark a little instead of one a lot.
PYPERF_OPTIONS = {
    "full": [],
    "quick": ["--quiet", "--values", "5", "--warmups", "1", "--min-time", "0.02"],
    # For tests: one value, a fixed small loop count (no calibration).
    "smoke": ["--quiet", "--values", "1", "--warmups", "0", "--loops", "5"],
}
#: (passes, worker processes per benchmark per pass) per mode.
PASSES = {"full": (4, 5), "quick": (1, 1), "smoke": (1, 1)}


#: The checkpoint cases of the hot-path table: in a live scope, outside any
#: scope, and while another thread's scope is cancelled (the pending flag is
#: up, and this thread must answer "nothing for me").
HOT_PATH = (
    "checkpoint.live_scope",
    "checkpoint.outside_scope",
    "checkpoint.other_thread_cancelled",
    "checkpoint.other_thread_cleaning_up",
)


#: The cases of the peers table (``--peers``): every ``peers.*`` case and
#: ours beside them.
PEERS_TABLE = (
    "checkpoint.live_scope",
    "checkpoint.outside_scope",
    "is_cancelled.live_scope",
    *(case.name for case in CASES if case.name.startswith("peers.")),
)


def select_cases(
    only: str | None,
    *,
    redis: bool = True,
    hot_path: bool = False,
    peers: bool = False,
    available: bool = False,
) -> list[Case]:
    """The cases to run for ``--only`` (or ``--hot-path``, ``--peers``), plus the baselines.

    ``redis=False`` leaves out the cases that need Redis, ``available=True``
    those whose packages cannot be imported here (`cases.missing`).
    """
    chosen = [
        case
        for case in CASES
        if selected(case.name, only)
        and (not hot_path or case.name in HOT_PATH)
        and (not peers or case.name in PEERS_TABLE)
    ]
    if chosen:
        chosen_names = {case.name for case in chosen}
        chosen = [case for case in CASES if case.name in chosen_names or case.name in BASELINES]
    if not redis:
        chosen = [case for case in chosen if not case.needs_redis]
    if available:
        chosen = [case for case in chosen if not missing(case)]
    return chosen


def make_time_func(case: Case, options: Options) -> Callable[[int], float]:
    """A pyperf time function: time ``loops`` iterations of the case's statement."""
    ns = case.namespace()
    inner = make_inner(case, ns)
    timed_loop = timed(case, ns, inner)

    ready = False

    def time_func(loops: int) -> float:
        # Set up once per worker process, on first use (a pyperf worker runs
        # one benchmark), and keep the state for every later value: threads
        # and connections are not restarted per value, and the scope stays
        # entered in this thread.  Undone at exit.
        nonlocal ready
        if not ready:
            atexit.register(run_setup(case, ns, options))
            ready = True
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return timed_loop(loops)
        finally:
            if gc_was_enabled:
                gc.enable()

    return time_func


def quiet_logs() -> None:
    """Drop cancellable's info-level log lines in benchmark processes."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _forward_args(cmd: list[str], args: Any) -> None:
    # pyperf calls this to build each worker's command line.
    if args.only:
        cmd.extend(("--only", args.only))
    cmd.extend(("--redis-url", args.redis_url))
    if args.no_redis:
        cmd.append("--no-redis")
    if args.hot_path:
        cmd.append("--hot-path")
    if args.peers:
        cmd.append("--peers")


def main() -> None:
    """The pyperf program: register every selected case with one Runner."""
    import pyperf

    runner = pyperf.Runner(add_cmdline_args=_forward_args)
    runner.argparser.add_argument("--only", default=None, help="glob or substring of names")
    runner.argparser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    runner.argparser.add_argument(
        "--no-redis", action="store_true", help="leave out the cases that need Redis"
    )
    runner.argparser.add_argument(
        "--hot-path", action="store_true", help="only the cases of the hot-path table"
    )
    runner.argparser.add_argument(
        "--peers", action="store_true", help="only the cases of the peers table"
    )
    args = runner.parse_args()
    quiet_logs()
    options = Options(redis_url=args.redis_url)
    for case in select_cases(
        args.only,
        redis=not args.no_redis,
        hot_path=args.hot_path,
        peers=args.peers,
        available=True,
    ):
        runner.bench_time_func(
            case.name,
            make_time_func(case, options),
            inner_loops=case.inner_loops,
            metadata={"description": case.description},
        )


# --------------------------------------------------------------------------
# Driver side (called by run.py).


def records_from_suites(suites: list[Any]) -> list[dict[str, Any]]:
    """Result records (ns per call) from loaded pyperf BenchmarkSuites (one per pass)."""
    values: dict[str, list[float]] = {}
    runs: dict[str, int] = {}
    for suite in suites:
        for bench in suite.get_benchmarks():
            name = bench.get_name()
            values.setdefault(name, []).extend(v * 1e9 for v in bench.get_values())
            runs[name] = runs.get(name, 0) + sum(1 for run in bench.get_runs() if run.values)
    return [measured(name, values[name], "ns", runs=runs[name]) for name in values]


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    redis_error: str | None = None,
    timeout: float = 1800.0,
) -> list[dict[str, Any]]:
    """Run the pyperf program in a subprocess and return its result records.

    ``redis_error`` (Redis is unreachable) leaves out the cases that need
    Redis and reports them as skipped with that reason.
    """
    import pyperf

    cases = select_cases(only, redis=redis_error is None, available=True)
    reasons = {}
    for case in select_cases(only):
        if case in cases:
            continue
        if case.needs_redis and redis_error is not None:
            reasons[case.name] = redis_error
        else:
            reasons[case.name] = (
                f"needs {', '.join(missing(case))}, not installed: "
                "pip install -e '.[bench]' (the benchmark-only dependencies)"
            )
    if not cases:
        return [skipped(name, reason) for name, reason in reasons.items()]
    passes, processes = PASSES[mode]
    suites = []
    with tempfile.TemporaryDirectory(prefix="cancellable-bench-") as tmp:
        for number in range(passes):
            out = Path(tmp) / f"micro-{number}.json"
            cmd = [sys.executable, str(HERE / "micro.py"), "-o", str(out)]
            cmd += PYPERF_OPTIONS[mode] + ["--processes", str(processes)]
            cmd += ["--redis-url", redis_url]
            if only:
                cmd += ["--only", only]
            if redis_error is not None:
                cmd.append("--no-redis")
            log(f"micro: pass {number + 1}/{passes}, {len(cases)} benchmarks with pyperf ({mode})")
            _run_pyperf(cmd, timeout)
            suites.append(pyperf.BenchmarkSuite.load(str(out)))
    records = records_from_suites(suites)
    records += [skipped(name, reason) for name, reason in reasons.items()]
    return records


def _run_pyperf(cmd: list[str], timeout: float) -> None:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            log("  " + line.rstrip())
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise RuntimeError(f"the pyperf program failed (exit status {rc}): {' '.join(cmd)}")


def hot_path_rows(suites: list[Any]) -> list[dict[str, Any]]:
    """The rows of the hot-path table from loaded pyperf BenchmarkSuites.

    Suites of the same Python version are one measurement (passes of it) and
    give one row: medians in ns over all their values, and ratios to the
    empty call of the same measurement, net of the harness loop (as in every
    table of ``docs/performance.md``) and gross.
    """
    import statistics

    values: dict[str, dict[str, list[float]]] = {}
    for suite in suites:
        benches = suite.get_benchmarks()
        python = benches[0].get_metadata().get("python_version", "?").split(" ")[0]
        per_name = values.setdefault(python, {})
        for bench in benches:
            per_name.setdefault(bench.get_name(), []).extend(v * 1e9 for v in bench.get_values())
    rows = []
    for python in sorted(values, key=lambda v: tuple(int(p) for p in v.split(".")[:2])):
        medians = {name: statistics.median(vals) for name, vals in values[python].items()}
        loop, empty = medians["baseline.timeit_loop"], medians["baseline.empty_call"]
        runs = len(values[python]["baseline.empty_call"])
        row: dict[str, Any] = {"python": python, "loop_ns": loop, "empty_ns": empty, "values": runs}
        for name in HOT_PATH:
            short = name.split(".", 1)[1]
            row[f"{short}_ns"] = medians[name]
            row[f"{short}_net"] = (medians[name] - loop) / (empty - loop)
            row[f"{short}_gross"] = medians[name] / empty
        rows.append(row)
    return rows


def print_table(paths: list[str]) -> None:
    """Print the Markdown hot-path table for pyperf JSON files (one or more per interpreter)."""
    import pyperf

    print(
        "| CPython | harness loop | empty call | `checkpoint()` in a live scope | x empty "
        "| outside any scope | x empty "
        "| while another thread's scope is cancelled | x empty "
        "| while another thread's scope runs its cleanup | x empty | values |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in hot_path_rows([pyperf.BenchmarkSuite.load(path) for path in paths]):
        cells = [row["python"], f"{row['loop_ns']:.1f} ns", f"{row['empty_ns']:.1f} ns"]
        for short in (
            "live_scope",
            "outside_scope",
            "other_thread_cancelled",
            "other_thread_cleaning_up",
        ):
            cells.append(f"{row[short + '_ns']:.1f} ns")
            cells.append(f"{row[short + '_net']:.2f} ({row[short + '_gross']:.2f} gross)")
        cells.append(str(row["values"]))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        print_table(sys.argv[2:])
    else:
        main()
