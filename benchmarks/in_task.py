"""``celery.*``: the tutorial idiom ``current_task.request.revoked()``, inside a real task.

Measures, per call and timeit-style, inside the ``bench.measure_revoked``
task (``@app.task`` over ``@cancellable``) while it executes in a real
prefork worker:

* ``celery.request_revoked``: ``current_task.request.revoked()``;
* ``celery.bound_request_revoked``: the same through the task object, as
  ``self.request.revoked()`` in a ``bind=True`` task (no proxy);
* ``celery.checkpoint_in_task``: ``checkpoint()`` in the same task.

The harness loop, an empty call and a bare loop iteration are measured in the
same task, interleaved with these, and the ratios of these results use them
(same process, same run).

Needs Redis; when the worker's measurement fails, `run` returns a skipped
record naming the reason.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, log, measured, selected, skipped

NAME = "celery.request_revoked"
#: Result name -> role in `STATEMENTS`.
MEASURED = {
    NAME: "revoked",
    "celery.bound_request_revoked": "bound_revoked",
    "celery.checkpoint_in_task": "checkpoint",
}
NAMES = tuple(MEASURED)

#: (seconds per value, values) per mode.
SETTINGS = {"full": (0.05, 40), "quick": (0.01, 5), "smoke": (0.001, 1)}

#: The statements timed in the task, keyed by role.
STATEMENTS = {
    "revoked": "current_task.request.revoked()",
    # The same through the task object (``self.request.revoked()`` in a
    # ``bind=True`` task), without the ``current_task`` proxy.
    "bound_revoked": "_task.request.revoked()",
    "checkpoint": "checkpoint()",
    "harness": "pass",
    "empty": "empty()",
    "loop": "for _i in _range_n:\n    pass",
}


def measure_here(seconds_per_value: float, values: int) -> dict[str, Any]:
    """Run inside the task: ns per call of each statement, ``values`` interleaved rounds."""
    import os

    from celery import current_task

    import cases
    from cancellable import current_scope

    request = current_task.request
    revoked = getattr(request, "revoked", None)
    if not callable(revoked):
        return {"error": "current_task.request.revoked is not callable in a @cancellable task"}
    if revoked() is not False:
        return {"error": f"request.revoked() returned {revoked()!r} in a live task"}
    if current_scope() is None:
        return {"error": "the task body does not run in a cancel scope"}

    timers = {}
    for role, stmt in STATEMENTS.items():
        case = cases.Case(f"in_task.{role}", role, stmt)
        ns = case.namespace()
        ns["current_task"] = current_task
        ns["_task"] = current_task._get_current_object()
        ns["_range_n"] = range(cases.RANGE_ITERATIONS)
        inner_loops = cases.RANGE_ITERATIONS if role == "loop" else 1
        timers[role] = (cases.make_inner(case, ns), inner_loops)

    loops = {}
    for role, (inner, _n) in timers.items():
        count = 1
        while inner(count, time.perf_counter) < seconds_per_value and count < 1 << 30:
            count *= 2
        loops[role] = count

    results: dict[str, list[float]] = {role: [] for role in timers}
    roles = list(timers)
    for value in range(values):
        order = roles[value % len(roles) :] + roles[: value % len(roles)]
        for role in order:
            inner, inner_loops = timers[role]
            elapsed = inner(loops[role], time.perf_counter)
            results[role].append(elapsed / (loops[role] * inner_loops) * 1e9)
    return {"values": results, "pid": os.getpid(), "task_id": request.id}


def records_from(payload: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """Result records (with their own baselines for the ratios) from the task's answer."""
    if "error" in payload:
        return [skipped(name, payload["error"]) for name in names]
    values = payload["values"]
    baselines = {
        "harness": statistics.median(values["harness"]),
        "empty": statistics.median(values["empty"]),
        "loop": statistics.median(values["loop"]),
    }
    records = []
    for name in names:
        role_values = values[MEASURED[name]]
        record = measured(name, role_values, "ns", runs=len(role_values))
        record["_baselines"] = baselines
        records.append(record)
    return records


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    worker: Any = None,
) -> list[dict[str, Any]]:
    """Result records for the selected ``celery.*`` names."""
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    if worker is None:
        from _workers import session

        with session(redis_url) as own:
            return run(mode, only, redis_url, own)
    seconds, values = SETTINGS[mode]
    result = worker.app.send_task("bench.measure_revoked", args=(seconds, values))
    payload = result.get(timeout=600)
    result.forget()
    log(f"celery.*: measured in worker child pid {payload.get('pid')}")
    return records_from(payload, names)
