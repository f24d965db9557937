"""Render a results JSON (from ``run.py --json``) as the Markdown tables of docs/performance.md.

Usage::

    python benchmarks/report.py docs/_static/benchmarks.json > /tmp/tables.md
    python benchmarks/report.py docs/_static/benchmarks.json docs/_static/latency_cdf.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES_BY_NAME

LIVE = "checkpoint.live_scope"
TIMES = "\u00d7"  # multiplication sign
DASH = "\u2013"  # en dash


DESCRIPTIONS = {
    "celery.request_revoked": "`current_task.request.revoked()` in a running `@cancellable` task",
    "celery.bound_request_revoked": "`self.request.revoked()` (bound task, no proxy), same task",
    "celery.checkpoint_in_task": "`checkpoint()` in the same task",
}


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _ns(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.0f} µs"
    if value >= 1000:
        return f"{value / 1000:.2f} µs"
    return f"{value:.1f} ns"


def per_call_table(results: dict[str, Any], names: list[str], *, vs_live: bool = False) -> str:
    """Rows of per-call results: median, p90, ratios (net)."""
    header = f"| name | what | median | p90 | {TIMES} empty call | {TIMES} loop iteration |"
    rule = "|---|---|---|---|---|---|"
    if vs_live:
        header += f" {TIMES} `checkpoint.live_scope` |"
        rule += "---|"
    rows = [header, rule]
    live = results.get(LIVE)
    for name in names:
        record = results.get(name)
        if record is None:
            continue
        what = (
            CASES_BY_NAME[name].description if name in CASES_BY_NAME else DESCRIPTIONS.get(name, "")
        )
        if record.get("skipped"):
            rows.append(f"| `{name}` | {what} | skipped: {record['reason']} | | | |")
            continue
        row = (
            f"| `{name}` | {what} | {_ns(record['median'])} | {_ns(record['p90'])} "
            f"| {_fmt(record['ratio_to_empty_call'])} "
            f"| {_fmt(record['ratio_to_loop_iteration'])} |"
        )
        if vs_live and live and not live.get("skipped"):
            row += f" {_fmt(record['median'] / live['median'])} |"
        rows.append(row)
    return "\n".join(rows)


def context_table(results: dict[str, Any]) -> str:
    """Overhead of a checkpoint per iteration, per loop body."""
    rows = [
        "| loop body | measured body cost | added per iteration | overhead (median) | stdev |",
        "|---|---|---|---|---|",
    ]
    for label in ("100ns", "1us", "10us", "100us"):
        pct = results.get(f"context.body_{label}.overhead_pct")
        if pct is None or pct.get("skipped"):
            continue
        added = results[f"context.body_{label}.added_ns"]
        body = results[f"context.body_{label}.body_ns"]
        rows.append(
            f"| ~{label.replace('us', ' µs').replace('ns', ' ns')} | {_ns(body['median'])} "
            f"| {added['median']:.1f} ns | {pct['median']:.3f} % | {pct.get('stdev', 0):.2f} % |"
        )
    return "\n".join(rows)


def _dist(record: dict[str, Any] | None, samples: dict[str, list[float]], name: str) -> str:
    """``p50 / p90 / p99 / max`` in ms (max from the raw samples, when given)."""
    if record is None or record.get("skipped"):
        return DASH
    values = samples.get(name)
    top = f"{max(values):.1f}" if values else DASH
    return f"{record['median']:.1f} / {record['p90']:.1f} / {record['p99']:.1f} / {top}"


LATENCY_VARIANTS = (
    ("prefork, Redis broker", "latency."),
    ("prefork, Redis broker, `async def` body", "latency.async."),
    ("prefork, RabbitMQ broker", "latency.prefork_rabbitmq."),
    ("threads, Redis broker", "latency.threads_redis."),
    ("threads, Redis broker, `async def` body", "latency.async_threads_redis."),
    ("threads, RabbitMQ broker", "latency.threads_rabbitmq."),
)


def latency_table(results: dict[str, Any], samples: dict[str, list[float]] | None = None) -> str:
    """Latency p50 / p90 / p99 / max per variant, then Celery's own ways."""
    samples = samples or {}
    rows = [
        "| worker | revoke → checkpoint raises | → cleanup done | → `REVOKED` published "
        "| samples |",
        "|---|---|---|---|---|",
    ]
    for label, prefix in LATENCY_VARIANTS:
        cells = []
        runs = ""
        for step in ("revoke_to_checkpoint", "revoke_to_cleanup", "revoke_to_revoked_state"):
            record = results.get(prefix + step)
            if record is not None and not record.get("skipped"):
                runs = str(record["runs"])
            cells.append(_dist(record, samples, prefix + step))
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {runs} |")
    rows += [
        "",
        "| Celery's own way | measured | p50 / p90 / p99 / max | samples |",
        "|---|---|---|---|",
    ]
    for name, label, what in (
        ("latency.terminate.to_process_death", "`revoke(terminate=True)`", "→ child dead"),
        ("latency.terminate.to_pool_full", "", "→ pool back to 2 children"),
        ("latency.terminate.revoke_to_revoked_state", "", "→ `REVOKED` published"),
        ("latency.abortable_100ms.to_noticed", "`AbortableTask`, 100 ms poll", "→ noticed"),
        ("latency.abortable_100ms.to_final_state", "", "→ final state published"),
    ):
        record = results.get(name)
        runs = "" if record is None or record.get("skipped") else str(record["runs"])
        rows.append(f"| {label} | {what} | {_dist(record, samples, name)} | {runs} |")
    return "\n".join(rows)


#: Ours beside the peers in the per-call table of the peers.
PEERS_OURS = ("checkpoint.live_scope", "checkpoint.outside_scope", "is_cancelled.live_scope")

PEERS_LATENCY = (
    (
        "peers.latency.cancellable.revoke_to_checkpoint",
        "cancellable, prefork + Redis: `revoke()` → checkpoint raises (100 ms after start)",
    ),
    (
        "peers.latency.dramatiq_abort.abort_to_raise",
        "dramatiq-abort, Redis: `abort(id)` → `Abort` raised (100 ms after start)",
    ),
    (
        "peers.latency.dramatiq_abort_settled.abort_to_raise",
        "dramatiq-abort, Redis: `abort(id)` → `Abort` raised (1.2 s after start)",
    ),
)


def peers_latency_table(
    results: dict[str, Any], samples: dict[str, list[float]] | None = None
) -> str:
    """Delivery latency of ours and dramatiq-abort's, sampled in turns in one run."""
    samples = samples or {}
    rows = ["| cancelled by | p50 / p90 / p99 / max (ms) | samples |", "|---|---|---|"]
    for name, label in PEERS_LATENCY:
        record = results.get(name)
        if record is None:
            continue
        if record.get("skipped"):
            rows.append(f"| {label} | skipped: {record['reason']} | |")
            continue
        rows.append(f"| {label} | {_dist(record, samples, name)} | {record['runs']} |")
    return "\n".join(rows)


def throughput_table(results: dict[str, Any]) -> str:
    """Throughput rows."""
    rows = ["| name | median | stdev | rounds |", "|---|---|---|---|"]
    for name in (
        "throughput.plain_tasks_per_s",
        "throughput.cancellable_tasks_per_s",
        "throughput.per_task_overhead_us",
        "throughput.cancellable_to_plain_ratio",
        "throughput.eager_apply_plain_us",
        "throughput.eager_apply_cancellable_us",
        "throughput.eager_apply_overhead_us",
    ):
        record = results.get(name)
        if record is None or record.get("skipped"):
            continue
        unit = record["unit"].replace("us", "µs")
        digits = 3 if unit == "x" else 1
        rows.append(
            f"| `{name}` | {record['median']:.{digits}f} {unit} "
            f"| {record.get('stdev', 0):.{digits}f} {unit} | {record['runs']} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    """Print every table; ``argv``: the results file, optionally the latency samples file."""
    doc = json.loads(Path(argv[0]).read_text())
    samples = json.loads(Path(argv[1]).read_text())["samples"] if len(argv) > 1 else {}
    results = {r["name"]: r for r in doc["results"]}
    env = doc["environment"]
    print(f"<!-- environment: {json.dumps(env)} -->\n")
    print(
        per_call_table(
            results,
            [n for n in results if n.split(".")[0] in ("baseline", "checkpoint", "is_cancelled")],
        )
    )
    print()
    print(
        per_call_table(
            results,
            [LIVE] + [n for n in results if n.startswith("alt.")],
            vs_live=True,
        )
    )
    print()
    print(per_call_table(results, [n for n in results if n.startswith("celery.")]))
    print()
    print(context_table(results))
    print()
    print(latency_table(results, samples))
    print()
    peer_names = [n for n in results if n.startswith("peers.") and ".latency." not in n]
    if peer_names:
        print(per_call_table(results, [*PEERS_OURS, *peer_names], vs_live=True))
        print()
        print(peers_latency_table(results, samples))
        print()
    print(throughput_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
