"""The per-call harness: every case of ``cases.py``, timed by pyperf, as ratios of the same run.

Run as a script it is a pyperf benchmark program (``pyperf.Runner`` parses
``sys.argv`` and spawns one worker process per benchmark)::

    python benchmarks/per_call.py -o out.json [--only 'checkpoint.*'] [--hot-path | --peers]

``--hot-path`` selects the cases of the hot-path table of
``docs/performance.md`` (`HOT_PATH` and the baselines), ``--peers`` those of
the peers' table; ``table FILE...`` prints the hot-path table from such
files, merging the files of the same interpreter (passes that took turns
between interpreters)::

    for pass in 1 2 3 4 5 6 7 8; do for py in python3.10 python3.11 python3.12 python3.13; do
        $py benchmarks/per_call.py --hot-path -p 3 -q -o hot-$py-$pass.json
    done; done
    python benchmarks/per_call.py table hot-*.json

`run.py` calls `run`, which starts this program in passes (the full run: 4
passes of 5 worker processes per case, so that a noisy minute hits every case
a little) and turns pyperf's JSON into result records.  Every per-call record
carries its ratios to the harness loop, the empty call and the bare loop
iteration *of the same pass*, as the median over the passes
(`_common.ratios`), and ``ratio_to_checkpoint``, the same with
``checkpoint.live_scope`` in place of the empty call.

The loop overhead (``context.body_<label>.*``) is a difference of a few
percent between two loops, too small for measurements taken seconds apart
on a shared machine: `context_records` times the two ``context.*`` cases of
``cases.py`` (a body with and without a checkpoint before it) in this
process, in alternating ABBA pairs of a few milliseconds each, and reports
the median over the pairs of the overhead (``.overhead_pct``) and of the
added time per iteration (``.added_ns``), and the body's own cost
(``.body_ns``).

``--quick`` and ``--smoke`` skip pyperf's calibration: each case runs its own
``quick_loops`` per value (about a millisecond), one process per case.
"""

from __future__ import annotations

import atexit
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, log, measured, ratios, selected, skipped
from cases import (
    BASELINES,
    CASES,
    CASES_BY_NAME,
    CONTEXT_BODIES,
    Case,
    Options,
    make_inner,
    run_setup,
    timed,
    unavailable,
)

HERE = Path(__file__).resolve().parent
LOOP, EMPTY, RANGE, LIVE = (*BASELINES, "checkpoint.live_scope")

#: pyperf options per mode: the full run is pyperf's default (calibrated
#: loops, 3 values after 1 warmup, 100 ms each, in worker processes); the
#: others run every case in this one process, without calibration.
PYPERF_OPTIONS = {
    "full": [],
    "quick": ["--in-process", "--values", "5", "--warmups", "1", "--loops", "1"],
    "smoke": ["--in-process", "--values", "1", "--warmups", "0", "--loops", "1"],
}
#: (passes, worker processes per case per pass) per mode.
PASSES = {"full": (4, 5), "quick": (1, 1), "smoke": (1, 1)}
#: (pairs, seconds per timed loop) of the ``context.*`` measurement per mode.
CONTEXT_PAIRS = {"full": (401, 0.005), "quick": (15, 0.002), "smoke": (2, 0.0002)}
#: Divisor of each case's ``quick_loops`` (loops per value without calibration) per mode.
FIXED_LOOPS = {"quick": 1, "smoke": 64}

#: The checkpoint cases of the hot-path table.
HOT_PATH = (
    "checkpoint.live_scope",
    "checkpoint.outside_scope",
    "checkpoint.other_thread_cancelled",
    "checkpoint.other_thread_cleaning_up",
)
#: The cases of the peers' table: ours beside every ``peers.*`` case.
PEERS_TABLE = (
    "checkpoint.live_scope",
    "checkpoint.outside_scope",
    "is_cancelled.live_scope",
    *(case.name for case in CASES if case.name.startswith("peers.")),
)
CONTEXT_SUFFIXES = ("overhead_pct", "added_ns", "body_ns")


def context_labels(only: str | None) -> list[str]:
    """The loop bodies whose ``context.body_<label>.*`` results ``--only`` selects."""
    return [
        label
        for label, _size in CONTEXT_BODIES
        if any(selected(f"context.body_{label}.{suffix}", only) for suffix in CONTEXT_SUFFIXES)
    ]


def select_cases(only: str | None, *, hot_path: bool = False, peers: bool = False) -> list[Case]:
    """The cases pyperf times for ``--only`` (or ``--hot-path``, ``--peers``), with the baselines.

    The ``context.*`` cases are timed in pairs instead (`context_records`);
    when they are selected, the baselines and ``checkpoint.live_scope`` (the
    overhead model's cost) are timed beside them.
    """
    chosen = {
        case.name
        for case in CASES
        if selected(case.name, only)
        and not case.name.startswith("context.")
        and (not hot_path or case.name in HOT_PATH)
        and (not peers or case.name in PEERS_TABLE)
    }
    if chosen or context_labels(only):
        chosen.update(BASELINES)
        if any(n.startswith("peers.") for n in chosen) or context_labels(only):
            chosen.add(LIVE)  # the peers' second yardstick, the overhead model's cost
    return [case for case in CASES if case.name in chosen]


def expected_names(only: str | None) -> list[str]:
    """Every result name `run` gives for ``--only`` (measured or skipped)."""
    names = [case.name for case in select_cases(only)]
    for label in context_labels(only):
        names += [f"context.body_{label}.{suffix}" for suffix in CONTEXT_SUFFIXES]
    return names


# --------------------------------------------------------------------------
# The pyperf program (worker side).


def make_time_func(
    case: Case, options: Options, factor: int, in_process: bool
) -> Callable[[int], float]:
    """A pyperf time function: ``loops * factor`` iterations of the case's statement.

    In a worker process (one case per process) the setup runs on first use
    and stays for every later value (threads keep looping, the scope stays
    entered); it is undone at exit.  ``in_process`` (every case in one
    process, ``--quick``) sets up and undoes around each value instead, so
    that no case's threads or scopes outlive it.  The garbage collector is
    off while the clock runs.
    """
    ns = case.namespace()
    timed_loop = timed(case, ns, make_inner(case, ns))
    ready = False

    def time_func(loops: int) -> float:
        nonlocal ready
        teardown = run_setup(case, ns, options) if in_process or not ready else None
        if teardown is not None and not in_process:
            atexit.register(teardown)
            ready = True
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return timed_loop(loops * factor)
        finally:
            if gc_was_enabled:
                gc.enable()
            if in_process and teardown is not None:
                teardown()

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
    cmd.extend(("--redis-url", args.redis_url, "--fixed-loops", str(args.fixed_loops)))
    for flag in ("no_redis", "hot_path", "peers"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))


def main() -> None:
    """The pyperf program: register every selected case that can run here with one Runner."""
    import pyperf

    runner = pyperf.Runner(add_cmdline_args=_forward_args)
    arg = runner.argparser.add_argument
    arg("--only", default=None, help="glob or substring of names")
    arg("--redis-url", default=DEFAULT_REDIS_URL)
    arg("--no-redis", action="store_true", help="leave out the cases that need Redis")
    arg("--hot-path", action="store_true", help="only the cases of the hot-path table")
    arg("--peers", action="store_true", help="only the cases of the peers' table")
    arg(
        "--fixed-loops",
        type=int,
        default=0,
        metavar="DIVISOR",
        help="with --loops 1: run each case's quick_loops / DIVISOR iterations per value",
    )
    args = runner.parse_args()
    quiet_logs()
    options = Options(redis_url=args.redis_url)
    for case in select_cases(args.only, hot_path=args.hot_path, peers=args.peers):
        if unavailable(case) or (case.needs_redis and args.no_redis):
            continue
        factor = max(1, case.quick_loops // args.fixed_loops) if args.fixed_loops else 1
        runner.bench_time_func(
            case.name,
            make_time_func(case, options, factor, args.in_process),
            inner_loops=case.inner_loops * factor,
            metadata={"description": case.description},
        )


# --------------------------------------------------------------------------
# The driver (called by run.py).


def pass_medians(suites: list[Any]) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """All values (ns) per case, and each pass's median per case, from loaded pyperf suites."""
    values: dict[str, list[float]] = {}
    passes = []
    for suite in suites:
        medians = {}
        for bench in suite.get_benchmarks():
            ns = [v * 1e9 for v in bench.get_values()]
            values.setdefault(bench.get_name(), []).extend(ns)
            medians[bench.get_name()] = statistics.median(ns)
        passes.append(medians)
    return values, passes


def records_from_suites(suites: list[Any]) -> list[dict[str, Any]]:
    """Result records from the passes: ns per call, with ratios taken pass by pass."""
    values, passes = pass_medians(suites)
    records = []

    def over_passes(fn: Callable[[dict[str, float]], float | None]) -> float | None:
        each = [r for r in (fn(p) for p in passes) if r is not None]
        return statistics.median(each) if each else None

    for case in CASES:
        name = case.name
        if name not in values:
            continue
        record = measured(name, values[name], "ns", runs=len(values[name]))
        if all(base in values for base in BASELINES):
            for key in ("ratio_to_empty_call", "ratio_to_loop_iteration"):
                record[key] = over_passes(
                    lambda p, key=key, n=name: ratios(p[n], p[LOOP], p[EMPTY], p[RANGE])[key]
                )
            if LIVE in values:
                record["ratio_to_checkpoint"] = over_passes(
                    lambda p, n=name: (p[n] - p[LOOP]) / (p[LIVE] - p[LOOP])
                )
        records.append(record)
    return records


def context_records(mode: str, only: str | None) -> list[dict[str, Any]]:
    """``context.body_<label>.*``: each body with and without a checkpoint, ABBA pairs, here."""
    pairs, seconds = CONTEXT_PAIRS[mode]
    records = []
    for label in context_labels(only):
        loops, teardowns = [], []
        try:
            for kind in ("plain", "checkpoint"):  # the second runs in the first's live scope
                case = CASES_BY_NAME[f"context.body_{label}.{kind}"]
                ns = case.namespace()
                inner = make_inner(case, ns)
                teardowns.append(run_setup(case, ns, Options()))
                loops.append(inner)
            count = 1
            while loops[0](count, time.perf_counter) < seconds and count < 1 << 30:
                count *= 2
            plain_ns, with_ns = [], []
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                for k in range(pairs):
                    order = (0, 1) if k % 2 == 0 else (1, 0)  # ABBA: drift hits both alike
                    times = {i: loops[i](count, time.perf_counter) / count * 1e9 for i in order}
                    plain_ns.append(times[0])
                    with_ns.append(times[1])
            finally:
                if gc_was_enabled:
                    gc.enable()
        finally:
            for teardown in reversed(teardowns):
                teardown()
        pct = [(w / p - 1) * 100 for p, w in zip(plain_ns, with_ns, strict=True)]
        added = [w - p for p, w in zip(plain_ns, with_ns, strict=True)]
        prefix = f"context.body_{label}"
        records.append(measured(f"{prefix}.overhead_pct", pct, "%", runs=pairs))
        records.append(measured(f"{prefix}.added_ns", added, "ns", runs=pairs))
        records.append(measured(f"{prefix}.body_ns", plain_ns, "ns", runs=pairs, tails=False))
        log(f"per-call: {prefix}: {statistics.median(pct):+.2f} % over {pairs} pairs")
    return records


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    redis_error: str | None = None,
    timeout: float = 1800.0,
) -> list[dict[str, Any]]:
    """Run the pyperf program in passes and return its result records.

    A case that cannot run here (Redis unreachable: ``redis_error``; a
    package of the ``bench`` extra missing) is reported as skipped, with the
    reason, as are the ``context.*`` results of a pair that did not run.
    """
    import pyperf

    wanted = [case.name for case in select_cases(only)]
    if not wanted:
        return context_records(mode, only)
    reasons = {}
    for case in select_cases(only):
        reason = unavailable(case) or (redis_error if case.needs_redis else None)
        if reason:
            reasons[case.name] = reason
    passes, processes = PASSES[mode]
    suites = []
    with tempfile.TemporaryDirectory(prefix="cancellable-bench-") as tmp:
        for number in range(passes):
            out = Path(tmp) / f"per-call-{number}.json"
            cmd = [sys.executable, str(HERE / "per_call.py"), "-o", str(out)]
            cmd += PYPERF_OPTIONS[mode] + ["--processes", str(processes), "--redis-url", redis_url]
            cmd += ["--fixed-loops", str(FIXED_LOOPS[mode])] if mode in FIXED_LOOPS else []
            cmd += ["--only", only] if only else []
            cmd += ["--no-redis"] if redis_error is not None else []
            log(f"per-call: pass {number + 1}/{passes} with pyperf ({mode})")
            began = time.monotonic()
            _run_pyperf(cmd, timeout)
            log(f"per-call: pass {number + 1} took {time.monotonic() - began:.1f} s")
            suites.append(pyperf.BenchmarkSuite.load(str(out)))
    records = [r for r in records_from_suites(suites) if r["name"] in wanted]
    done = {r["name"] for r in records}
    records += [skipped(n, reasons.get(n, "not measured")) for n in wanted if n not in done]
    return records + context_records(mode, only)


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


def plot_overhead(records: list[dict[str, Any]], path: Path) -> None:
    """Overhead % of one checkpoint per iteration against the body cost, with the c/L model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["name"]: r for r in records if not r.get("skipped")}
    points = [
        (by_name[f"{p}.body_ns"]["median"] / 1000, by_name[f"{p}.overhead_pct"]["median"])
        for p in (f"context.body_{label}" for label, _size in CONTEXT_BODIES)
        if f"{p}.overhead_pct" in by_name
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(*zip(*points, strict=True), "o", color="tab:blue", label="measured (median)")
    if LIVE in by_name and LOOP in by_name:
        net = by_name[LIVE]["median"] - by_name[LOOP]["median"]
        grid = [points[0][0] / 2 * 1.2**k for k in range(60)]
        grid = [x for x in grid if x <= points[-1][0] * 2]
        ax.plot(
            grid,
            [100 * net / (x * 1000) for x in grid],
            "--",
            color="tab:gray",
            label=f"model: {net:.0f} ns / body",
        )
    ax.axhline(1.0, color="tab:red", linewidth=0.8, linestyle=":", label="1 %")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("loop body cost per iteration (µs, log scale)")
    ax.set_ylabel("overhead of one checkpoint() per iteration (%)")
    ax.set_title("checkpoint() overhead in a loop, inside a live scope")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def print_table(paths: list[str]) -> None:
    """Print the Markdown hot-path table from pyperf JSON files (passes; one row per Python)."""
    import pyperf

    by_python: dict[str, list[Any]] = {}
    for path in paths:
        suite = pyperf.BenchmarkSuite.load(path)
        meta = suite.get_benchmarks()[0].get_metadata()
        by_python.setdefault(meta.get("python_version", "?").split(" ")[0], []).append(suite)
    head = " | ".join(f"`{name.split('.', 1)[1]}` | x empty" for name in HOT_PATH)
    print(f"| CPython | harness loop | empty call | {head} | values |")
    print("|---" * (4 + 2 * len(HOT_PATH)) + "|")
    for python in sorted(by_python, key=lambda v: tuple(int(p) for p in v.split(".")[:2])):
        values, _passes = pass_medians(by_python[python])
        medians = {name: statistics.median(vals) for name, vals in values.items()}
        loop, empty = medians[LOOP], medians[EMPTY]
        cells = [python, f"{loop:.1f} ns", f"{empty:.1f} ns"]
        for name in HOT_PATH:
            net, gross = (medians[name] - loop) / (empty - loop), medians[name] / empty
            cells += [f"{medians[name]:.1f} ns", f"{net:.2f} ({gross:.2f} gross)"]
        cells.append(str(len(values[EMPTY])))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        print_table(sys.argv[2:])
    else:
        main()
