"""Paired, interleaved ratios: checkpoint() against an empty call, in the same seconds.

pyperf measures each benchmark in its own worker processes, one benchmark
after the other, so on a shared, noisy machine two medians a few seconds
apart can differ by more than the few nanoseconds being compared.  This
module answers the questions the project sets itself ("is ``checkpoint()``
inside a live scope, or outside any scope, at most 1.3x an empty call, and
the checkpoint of a thread while *another* thread's scope is cancelled at
most 3x?") with a paired design instead: every round times the harness
loop, the empty call and the checkpoints back to back (a few milliseconds
each, in rotating order), and gives one ratio per round; the result is the
median over many rounds.

* ``paired.<case>.net_ratio``: (checkpoint - harness) / (empty - harness),
  the harness loop of the same round subtracted from both;
* ``paired.<case>.gross_ratio``: checkpoint / empty, each with its harness
  loop iteration included.

for ``<case>`` in ``outside_scope``, ``live_scope`` and
``other_thread_cancelled`` (the pending flag is up because a helper thread's
scope is cancelled; this thread's checkpoint must answer "nothing for me").
Unit: ``x``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import log, measured, selected
from cases import CASES_BY_NAME, Case, Options, make_inner, run_setup

#: Rounds and milliseconds per timed loop, per mode.
SETTINGS = {"full": (400, 3.0), "quick": (60, 2.0), "smoke": (3, 0.2)}
PAIRED = ("outside_scope", "live_scope", "other_thread_cancelled")
NAMES = tuple(f"paired.{case}.{kind}" for case in PAIRED for kind in ("net_ratio", "gross_ratio"))

_ROLES = {
    "harness": "baseline.timeit_loop",
    "empty": "baseline.empty_call",
    "outside_scope": "checkpoint.outside_scope",
    "live_scope": "checkpoint.live_scope",
    "other_thread_cancelled": "checkpoint.other_thread_cancelled",
}


def _calibrate(inner: Callable[[int, Callable[[], float]], float], seconds: float) -> int:
    loops = 1
    while inner(loops, time.perf_counter) < seconds and loops < 1 << 30:
        loops *= 2
    return loops


def measure(rounds: int, ms_per_loop: float) -> dict[str, list[float]]:
    """Per-round ns per iteration of each role, interleaved."""
    options = Options()
    prepared: dict[str, tuple[Case, dict[str, Any], Any]] = {}
    for role, name in _ROLES.items():
        case = CASES_BY_NAME[name]
        ns = case.namespace()
        prepared[role] = (case, ns, make_inner(case, ns))
    loops = {}
    for role, (case, ns, inner) in prepared.items():
        teardown = run_setup(case, ns, options)
        try:
            loops[role] = _calibrate(inner, ms_per_loop / 1000.0)
        finally:
            teardown()
    roles = list(prepared)
    values: dict[str, list[float]] = {role: [] for role in roles}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for k in range(rounds):
            shift = k % len(roles)
            for role in roles[shift:] + roles[:shift]:
                case, ns, inner = prepared[role]
                teardown = run_setup(case, ns, options)
                try:
                    elapsed = inner(loops[role], time.perf_counter)
                finally:
                    teardown()
                values[role].append(elapsed / loops[role] * 1e9)
    finally:
        if gc_was_enabled:
            gc.enable()
    return values


def run(mode: str = "full", only: str | None = None) -> list[dict[str, Any]]:
    """Result records for the selected paired ratios."""
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    rounds, ms = SETTINGS[mode]
    values = measure(rounds, ms)
    records = []
    for case in PAIRED:
        net = [
            (c - h) / (e - h)
            for c, e, h in zip(values[case], values["empty"], values["harness"], strict=True)
            if e > h
        ]
        gross = [c / e for c, e in zip(values[case], values["empty"], strict=True)]
        for kind, ratios in (("net_ratio", net), ("gross_ratio", gross)):
            name = f"paired.{case}.{kind}"
            if name in names:
                records.append(measured(name, ratios, "x", runs=len(ratios)))
        log(
            f"paired: {case} / empty call: net {statistics.median(net):.3f}, "
            f"gross {statistics.median(gross):.3f} over {rounds} rounds"
        )
    return records
