"""Instructions per call, counted by valgrind: the hot path without the noise.

Timing ratios on a shared machine move with the load (see the hot-path
section of ``docs/performance.md``).  Instruction counts do not: callgrind
counts the instructions the CPU retires, the same number whatever else the
machine is doing.  They are not time (a cache miss costs more than an add),
but for a few bytecodes of straight-line code they are a faithful second
opinion on "how much more work than an empty call".

For each case of the hot-path table (and the baselines) this runs the case's
own timed loop (``cases.make_inner``, after its setup) under
``valgrind --tool=callgrind`` twice, with `SHORT` and `LONG` iterations, and
takes the difference over ``LONG - SHORT``: the instructions of one
iteration, start-up and setup cancelled out.  Ratios are net of the harness
loop, as in the timing tables::

    python benchmarks/instructions.py python3.10 python3.11 python3.12 python3.13

Each interpreter needs ``cancellable`` importable.  Prints a Markdown table.
Run with ``--one CASE LOOPS`` it is the program valgrind runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Iterations of the two runs whose difference is measured.
SHORT, LONG = 20_000, 120_000
#: The cases of the table, in column order (after the baselines).
CASES = (
    "checkpoint.live_scope",
    "checkpoint.outside_scope",
    "checkpoint.other_thread_cancelled",
    "checkpoint.other_thread_cleaning_up",
)
BASELINES = ("baseline.timeit_loop", "baseline.empty_call")


def run_one(name: str, loops: int) -> None:
    """Set up case ``name`` and run its timed loop ``loops`` times (under valgrind)."""
    from cases import CASES_BY_NAME, Options, make_inner, run_setup

    case = CASES_BY_NAME[name]
    ns = case.namespace()
    inner = make_inner(case, ns)
    teardown = run_setup(case, ns, Options())
    try:
        inner(loops, time.perf_counter)
    finally:
        teardown()


def callgrind(python: str, script: str, name: str, loops: int) -> int:
    """Instructions valgrind counted for ``python script --one name loops``."""
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            python,
            script,
            "--one",
            name,
            str(loops),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"valgrind run of {name} with {python} failed:\n{proc.stderr[-2000:]}")
    return int(match.group(1))


def count(python: str, name: str, loops: int) -> int:
    """Instructions valgrind counted for one run of ``name`` with ``loops`` iterations."""
    return callgrind(python, __file__, name, loops)


def per_iteration(python: str, name: str) -> float:
    """Instructions per iteration of case ``name``'s timed loop."""
    return (count(python, name, LONG) - count(python, name, SHORT)) / (LONG - SHORT)


def row(python: str) -> dict[str, float]:
    """Per-iteration counts of the baselines and every case for one interpreter."""
    return {name: per_iteration(python, name) for name in (*BASELINES, *CASES)}


def version(python: str) -> str:
    """The interpreter's version, e.g. ``3.12.1``."""
    out = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def table(pythons: list[str]) -> str:
    """The Markdown table: per-iteration counts and net ratios to the empty call."""
    lines = [
        "| CPython | harness loop | empty call | "
        + " | ".join(f"`{name.split('.', 1)[1]}` | x empty" for name in CASES)
        + " |",
        "|---" * (3 + 2 * len(CASES)) + "|",
    ]
    for python in pythons:
        counts = row(python)
        loop, empty = counts["baseline.timeit_loop"], counts["baseline.empty_call"]
        cells = [version(python), f"{loop:.0f}", f"{empty:.0f}"]
        for name in CASES:
            cells += [f"{counts[name]:.0f}", f"{(counts[name] - loop) / (empty - loop):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Print the table for the interpreters in ``argv`` (default: this one)."""
    if argv[:1] == ["--one"]:
        run_one(argv[1], int(argv[2]))
        return
    print(table(argv or [sys.executable]))


if __name__ == "__main__":
    main(sys.argv[1:])
