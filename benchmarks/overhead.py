"""Overhead in context: what one checkpoint() per iteration costs a real loop.

For loop bodies that cost about 100 ns, 1 us, 10 us and 100 us, time N
iterations of ::

    for _ in range(n_iter):          for _ in range(n_iter):
        body(size)                       checkpoint()
                                         body(size)

inside a live `CancelScope`, and report how much slower the right-hand loop
is, in percent (``context.body_1us.overhead_pct``).  The body is a
deterministic pure-Python integer loop; ``size`` is calibrated at the start
so that one call costs about the target time on this machine.

The machine is noisy, so the two loops are measured in alternating pairs
(ABBA order, so drift hits both equally) and each pair gives one ratio; the
result is the median ratio over all pairs.  ``context.body_*.added_ns`` is
the median extra time per iteration, which should match the per-call cost of
``checkpoint.live_scope`` minus the harness loop.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import log, measured, percentile, selected
from cancellable import CancelScope, checkpoint

#: (label used in names, target body cost in ns)
TARGETS: tuple[tuple[str, float], ...] = (
    ("100ns", 100.0),
    ("1us", 1_000.0),
    ("10us", 10_000.0),
    ("100us", 100_000.0),
)


@dataclass(frozen=True)
class Settings:
    """How long to measure."""

    pairs: int  # measured pairs per body (each pair = one ratio)
    loop_seconds: float  # target duration of one timed loop


SETTINGS = {
    "full": Settings(pairs=401, loop_seconds=0.005),
    "quick": Settings(pairs=9, loop_seconds=0.01),
    "smoke": Settings(pairs=2, loop_seconds=0.0005),
}


def body(size: int) -> int:
    """A deterministic pure-Python loop body: ``size`` steps of integer arithmetic."""
    x = 1
    for i in range(size):
        x = (x * 31 + i) % 65521
    return x


def loop_plain(n_iter: int, size: int) -> None:
    """The loop without checkpoints."""
    for _ in range(n_iter):
        body(size)


def loop_checkpoint(n_iter: int, size: int) -> None:
    """The same loop with one ``checkpoint()`` per iteration."""
    for _ in range(n_iter):
        checkpoint()
        body(size)


def _time(fn: Callable[[int, int], None], n_iter: int, size: int) -> float:
    t0 = time.perf_counter()
    fn(n_iter, size)
    return time.perf_counter() - t0


def body_cost_ns(size: int, budget: float = 0.005) -> float:
    """Per-iteration time of ``loop_plain`` for ``size`` (best of 5), in ns."""
    n_iter = 1
    while True:
        elapsed = _time(loop_plain, n_iter, size)
        if elapsed >= budget:
            break
        n_iter *= 2
    best = min(_time(loop_plain, n_iter, size) for _ in range(5))
    return best / n_iter * 1e9


def calibrate(target_ns: float, budget: float = 0.005) -> tuple[int, float]:
    """The body ``size`` whose loop iteration costs closest to ``target_ns``.

    Fits ``cost = a + b * size`` on two sizes, solves for the target, refines
    the guess twice with the measured cost, then checks the neighbours.
    Returns ``(size, measured ns per iteration)``.
    """
    c0 = body_cost_ns(0, budget)
    c_big = body_cost_ns(64, budget)
    slope = max((c_big - c0) / 64, 1e-3)
    guess = max(0, round((target_ns - c0) / slope))
    for _ in range(2):
        cost = body_cost_ns(guess, budget)
        if guess > 0:
            slope = max((cost - c0) / guess, 1e-3)
        guess = max(0, round(guess + (target_ns - cost) / slope))
    candidates = {max(0, guess - 1), guess, guess + 1}
    costs = {size: body_cost_ns(size, budget) for size in candidates}
    size = min(costs, key=lambda s: abs(costs[s] - target_ns))
    return size, costs[size]


def measure_pairs(size: int, n_iter: int, pairs: int) -> tuple[list[float], list[float]]:
    """Alternating timings; returns (overhead % per pair, added ns per iteration per pair)."""
    pct: list[float] = []
    added: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _time(loop_plain, n_iter, size)  # warm up both
        _time(loop_checkpoint, n_iter, size)
        for k in range(pairs):
            if k % 2 == 0:
                plain = _time(loop_plain, n_iter, size)
                with_cp = _time(loop_checkpoint, n_iter, size)
            else:
                with_cp = _time(loop_checkpoint, n_iter, size)
                plain = _time(loop_plain, n_iter, size)
            pct.append((with_cp / plain - 1.0) * 100.0)
            added.append((with_cp - plain) / n_iter * 1e9)
    finally:
        if gc_was_enabled:
            gc.enable()
    return pct, added


def run(mode: str = "full", only: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every selected body; return (result records, raw data for the plot)."""
    settings = SETTINGS[mode]
    records: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    calib_budget = min(0.005, settings.loop_seconds)
    with CancelScope():  # checkpoint() must run inside a live scope
        for label, target in TARGETS:
            prefix = f"context.body_{label}"
            names = [f"{prefix}.overhead_pct", f"{prefix}.added_ns", f"{prefix}.body_ns"]
            if not any(selected(name, only) for name in names):
                continue
            size, cost = calibrate(target, calib_budget)
            n_iter = max(1, round(settings.loop_seconds * 1e9 / cost))
            pct, added = measure_pairs(size, n_iter, settings.pairs)
            log(
                f"context: body {label}: size={size}, {cost:.0f} ns/iteration, "
                f"{n_iter} iterations x {settings.pairs} pairs, "
                f"overhead median {statistics.median(pct):+.3f} %"
            )
            records.append(measured(f"{prefix}.overhead_pct", pct, "%", runs=len(pct)))
            records.append(measured(f"{prefix}.added_ns", added, "ns", runs=len(added)))
            records.append({"name": f"{prefix}.body_ns", "median": cost, "unit": "ns", "runs": 1})
            raw[label] = {"target_ns": target, "body_ns": cost, "size": size, "pct": pct}
    return records, raw


def plot(raw: dict[str, Any], path: Path, checkpoint_net_ns: float | None) -> None:
    """Overhead % against body cost (log x), with the c/L model line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in TARGETS if label in raw]
    xs = [raw[label]["body_ns"] / 1000.0 for label in labels]  # us
    medians = [statistics.median(raw[label]["pct"]) for label in labels]
    lows = [m - percentile(raw[label]["pct"], 25) for m, label in zip(medians, labels, strict=True)]
    highs = [
        percentile(raw[label]["pct"], 75) - m for m, label in zip(medians, labels, strict=True)
    ]

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.errorbar(
        xs,
        medians,
        yerr=[lows, highs],
        fmt="o",
        capsize=4,
        color="tab:blue",
        label="measured (median, bars: p25-p75 of paired runs)",
    )
    if checkpoint_net_ns is not None and xs:
        lo, hi = min(xs) / 2, max(xs) * 2
        grid = [lo * (hi / lo) ** (k / 60) for k in range(61)]
        ax.plot(
            grid,
            [100.0 * checkpoint_net_ns / (x * 1000.0) for x in grid],
            "--",
            color="tab:gray",
            label=f"model: {checkpoint_net_ns:.0f} ns / body",
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
