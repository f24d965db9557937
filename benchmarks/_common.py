"""Shared pieces of the benchmark suite: result records, statistics, environment.

Every benchmark module returns a list of *result records* (plain dicts), one
per stable dotted name.  A measured record has the keys ``name``, ``median``,
``unit`` and ``runs`` and, where they apply, ``p90``, ``p99`` and ``stdev``;
per-call results in nanoseconds also get ``ratio_to_empty_call`` and
``ratio_to_loop_iteration`` (`ratios`, from baselines of the same run), and
may get ``ratio_to_checkpoint``.  A benchmark that cannot run says so with a *skipped* record:
``{"name": ..., "skipped": True, "reason": ...}``, never with a made-up number.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

#: Redis database the benchmarks use (and the only one they ever flush).
REDIS_DB = 14
DEFAULT_REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"

#: Name groups whose nanosecond results are "per call" and get ratios.
PER_CALL_GROUPS = ("baseline", "checkpoint", "is_cancelled", "celery", "alt", "peers")

#: The harness's own loop (one iteration of the timeit-style loop around the
#: statement).  It is included in every per-call median; ratios subtract it.
TIMEIT_LOOP = "baseline.timeit_loop"
EMPTY_CALL = "baseline.empty_call"
LOOP_ITERATION = "baseline.loop_iteration"

ENVIRONMENT_KEYS = (
    "python",
    "implementation",
    "platform",
    "machine",
    "cpu_count",
    "versions",
    "date",
)
VERSION_KEYS = (
    "cancellable",
    "celery",
    "kombu",
    "redis-py",
    "pyperf",
    # The peers (benchmark-only dependencies; None when not installed).
    "dramatiq",
    "dramatiq-abort",
    "temporalio",
    "cancelscope",
)
MEASURED_KEYS = frozenset({"name", "median", "unit", "runs"})
OPTIONAL_KEYS = frozenset({"p90", "p99", "stdev"})
RATIO_KEYS = frozenset({"ratio_to_empty_call", "ratio_to_loop_iteration"})
#: Per-call results may also carry the ratio to ``checkpoint.live_scope``.
OPTIONAL_RATIO_KEYS = frozenset({"ratio_to_checkpoint"})
SKIPPED_KEYS = frozenset({"name", "skipped", "reason"})


def selected(name: str, pattern: str | None) -> bool:
    """Whether ``--only PATTERN`` selects ``name``.

    The pattern is a shell-style glob (``checkpoint.*``); a pattern without
    wildcards matches names that contain it (``alt`` selects ``alt.*``).
    """
    if not pattern:
        return True
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile, ``p`` in [0, 100] (same rule as pyperf)."""
    if not values:
        raise ValueError("no values")
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def measured(
    name: str,
    values: Sequence[float],
    unit: str,
    *,
    runs: int,
    tails: bool = True,
) -> dict[str, Any]:
    """A measured result record from raw values (already in ``unit``).

    ``runs`` is the number of independent runs (processes, or repetitions)
    behind ``values``.  ``tails`` adds p90 and p99; stdev is added when there
    are at least two values.
    """
    if not values:
        raise ValueError(f"{name}: no values")
    record: dict[str, Any] = {
        "name": name,
        "median": statistics.median(values),
        "unit": unit,
    }
    if tails:
        record["p90"] = percentile(values, 90)
        record["p99"] = percentile(values, 99)
    if len(values) >= 2:
        record["stdev"] = statistics.stdev(values)
    record["runs"] = runs
    return record


def skipped(name: str, reason: str) -> dict[str, Any]:
    """A record saying that ``name`` was not measured, and why."""
    return {"name": name, "skipped": True, "reason": reason}


def is_per_call(record: dict[str, Any]) -> bool:
    """Whether ``record`` is a per-call nanosecond result (which gets ratios)."""
    return (
        not record.get("skipped")
        and record.get("unit") == "ns"
        and record["name"].split(".", 1)[0] in PER_CALL_GROUPS
    )


def ratios(value: float, harness: float, empty: float, loop: float) -> dict[str, float]:
    """The net ratios of a per-call ``value`` (ns, harness loop included) to its baselines.

    ``ratio_to_empty_call`` is (value - harness) / (empty - harness): 1.0
    means "costs exactly an empty function call"; ``ratio_to_loop_iteration``
    is (value - harness) / one iteration of a bare ``for`` loop.  All four
    numbers must come from the same run.
    """
    net = value - harness
    return {"ratio_to_empty_call": net / (empty - harness), "ratio_to_loop_iteration": net / loop}


def environment() -> dict[str, Any]:
    """The machine, interpreter, library versions and date of this run."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "cancellable": _version("cancellable"),
            "celery": _version("celery"),
            "kombu": _version("kombu"),
            "redis-py": _version("redis"),
            "pyperf": _version("pyperf"),
            "dramatiq": _version("dramatiq"),
            "dramatiq-abort": _version("dramatiq-abort"),
            "temporalio": _version("temporalio"),
            "cancelscope": _version("cancelscope"),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_schema(doc: dict[str, Any], expected_names: Iterable[str] = ()) -> list[str]:
    """Problems with a results document (an empty list means it is valid)."""
    problems: list[str] = []
    if set(doc) != {"environment", "results"}:
        problems.append(f"top-level keys are {sorted(doc)}, expected environment and results")
        return problems
    env = doc["environment"]
    if set(env) != set(ENVIRONMENT_KEYS):
        problems.append(f"environment keys are {sorted(env)}, expected {sorted(ENVIRONMENT_KEYS)}")
    elif set(env["versions"]) != set(VERSION_KEYS):
        problems.append(f"versions keys are {sorted(env['versions'])}")
    names = [r.get("name") for r in doc["results"]]
    if len(names) != len(set(names)):
        problems.append("duplicate result names")
    for record in doc["results"]:
        name = record.get("name")
        if not isinstance(name, str) or "." not in name:
            problems.append(f"bad name {name!r}")
            continue
        if record.get("skipped"):
            if set(record) != SKIPPED_KEYS or not record["reason"]:
                problems.append(f"{name}: a skipped record needs exactly name, skipped, reason")
            continue
        keys = set(record)
        if not keys >= MEASURED_KEYS:
            problems.append(f"{name}: missing {sorted(MEASURED_KEYS - keys)}")
            continue
        ratio_keys = RATIO_KEYS | OPTIONAL_RATIO_KEYS if is_per_call(record) else set()
        allowed = MEASURED_KEYS | OPTIONAL_KEYS | ratio_keys
        if keys - allowed:
            problems.append(f"{name}: unexpected keys {sorted(keys - allowed)}")
        if is_per_call(record) and not keys >= RATIO_KEYS:
            problems.append(f"{name}: per-call result without ratios")
        for key in keys & (OPTIONAL_KEYS | ratio_keys | {"median"}):
            if not isinstance(record[key], (int, float)) or isinstance(record[key], bool):
                problems.append(f"{name}: {key} is not a number")
        if not isinstance(record["runs"], int) or record["runs"] < 1:
            problems.append(f"{name}: runs must be a positive int")
    missing = sorted(set(expected_names) - set(names))
    if missing:
        problems.append(f"missing results: {missing}")
    return problems


def log(message: str) -> None:
    """Progress output of the driver (stderr, so stdout stays the summary)."""
    print(message, file=sys.stderr, flush=True)
