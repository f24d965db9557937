"""The cancellation ladder on a real prefork worker, beside Celery's ``terminate=True``.

One worker (``celery worker --pool=prefork -c 2`` of ``bench_app``, with
``cancellable_kill_after`` = `KILL_AFTER`) runs, one at a time, a task that
never reaches a checkpoint:

* ``sleep``: blocked in ``time.sleep(3600)`` (a signal handler can break it);
* ``gil``: stuck in ``sum(range(10**12))``, one C call that holds the GIL
  and never lets a signal handler run.

For each, measured from the moment the client call returns:

* ``ladder.<task>.grace_<g>.revoked_s``: ``cancel(result, grace=g)`` until
  the stored state is REVOKED (the sleeping task is interrupted after the
  grace; the GIL-holding one is terminated ``kill_after`` later);
* ``ladder.<task>.grace_<g>.full_strength_s``: until the pool has
  ``concurrency`` live children again and none of them is the one that ran
  the task (0 when the child survived);
* ``ladder.<task>.terminate_<SIG>.*``: the same for Celery's
  ``app.control.revoke(id, terminate=True, signal=SIG)`` on the same task
  without ``@cancellable``, plus ``stopped_s``: until the task's process
  really stopped running it (Celery stores REVOKED as soon as it has sent
  the signal, whether or not the task stopped; a task that is still running
  after `GIVE_UP` seconds is reported as not stopped).

Every case runs `ROUNDS` times (``--rounds``) in the same session, against
one worker; medians are reported.  Output: a JSON list of result records
(``--json FILE``) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, environment, log
from _workers import session

#: ``cancellable_kill_after`` of the benchmark worker (seconds).
KILL_AFTER = 1.0
GRACES = (0.0, 0.5, 1.0, 2.0)
ROUNDS = 3
#: Seconds after which a task that did not stop is reported as not stopped.
GIVE_UP = 8.0


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids.update(int(p) for p in path.read_text().split())
        except OSError:
            continue
    return {kid for kid in kids if _alive(kid)}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _state(app: Any, task_id: str) -> str:
    return str(app.backend.get_task_meta(task_id, cache=False)["status"])


def _wait(predicate: Any, timeout: float, step: float = 0.005) -> float | None:
    """Seconds until ``predicate()`` is true, or None after ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(step)
    return None


def _start(worker: Any, task: str) -> tuple[Any, int]:
    """Send ``task``, wait until it runs; return its result and its child's pid."""
    import redis

    key = f"ladder:{uuid.uuid4().hex}"
    result = worker.app.send_task(task, args=(key,), queue=worker.queue)
    client = redis.Redis.from_url(worker.redis_url)
    if _wait(lambda: client.hget(key, "pid"), 60) is None:
        raise RuntimeError(f"{task} did not start; {worker.tail()}")
    time.sleep(0.2)  # well inside the body
    return result, int(client.hget(key, "pid"))


def _measure(worker: Any, task_id: str, pid: int, began: float) -> dict[str, float | None]:
    """From ``began``: until REVOKED, until the task's child died, until full strength.

    ``stopped_s`` is None if the child still ran the task after `GIVE_UP`
    seconds (then it is killed here, so the next case has its pool back);
    a child that survives (the task was interrupted and ended) stopped the
    task when it stored REVOKED, and the pool never lost strength.
    """
    revoked = died = strength = None
    while time.monotonic() - began < 60:
        now = time.monotonic() - began
        if revoked is None and _state(worker.app, task_id) == "REVOKED":
            revoked = now
        if died is None and not _alive(pid):
            died = now
        if died is not None and strength is None:
            kids = _children(worker.pid)
            if len(kids) == worker.concurrency and pid not in kids:
                strength = now
        if revoked is not None and (strength is not None or (died is None and now > GIVE_UP)):
            break
        if revoked is not None and died is None and now - revoked > 1.0:
            # Alive a second after REVOKED: it survived (interrupted), or it
            # ignores Celery's signal; wait for the second case to give up.
            if _task_still_running(worker, pid):
                if now > GIVE_UP:
                    break
            else:
                break
        time.sleep(0.005)
    alive = _alive(pid)
    if alive and _task_still_running(worker, pid):
        os.kill(pid, 9)  # Celery's SIGTERM could not stop it: free the child
        stopped = None
        strength = _wait(lambda: len(_children(worker.pid)) == worker.concurrency, 60, 0.01)
        strength = None if strength is None else time.monotonic() - began
    elif alive:
        stopped, strength = revoked, 0.0
    else:
        stopped = died
    _settle(worker)
    return {"revoked_s": revoked, "stopped_s": stopped, "full_strength_s": strength}


def _task_still_running(worker: Any, pid: int) -> bool:
    """Whether the child ``pid`` still runs its task: it is listed active, or it spins.

    Celery forgets a task it has signalled, so a child that ignored the
    signal is found by its CPU use (the GIL-holding task never sleeps).
    """
    replies = worker.app.control.inspect(destination=[worker.nodename], timeout=1.0).active()
    for tasks in (replies or {}).values():
        for task in tasks:
            if task.get("worker_pid") == pid:
                return True
    return _cpu_seconds(pid, 0.3) > 0.05


def _cpu_seconds(pid: int, window: float) -> float:
    """CPU seconds ``pid`` used during the next ``window`` seconds."""

    def used() -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = used()
    time.sleep(window)
    return used() - before


def _settle(worker: Any) -> None:
    # Back to full strength and idle before the next case.
    _wait(lambda: len(_children(worker.pid)) == worker.concurrency, 60, 0.05)
    time.sleep(0.3)


def ladder_case(worker: Any, kind: str, grace: float) -> dict[str, float | None]:
    """One ``cancel(grace=)`` of a running ``@cancellable`` task."""
    from cancellable.celery import cancel

    result, pid = _start(worker, f"bench.ladder_{kind}")
    began = time.monotonic()
    cancel(result, "benchmark", grace=grace, app=worker.app)
    return _measure(worker, result.id, pid, began)


def terminate_case(worker: Any, kind: str, signame: str) -> dict[str, float | None]:
    """Celery's ``revoke(terminate=True, signal=...)`` of the plain task."""
    result, pid = _start(worker, f"bench.plain_{kind}")
    began = time.monotonic()
    worker.app.control.revoke(result.id, terminate=True, signal=signame)
    return _measure(worker, result.id, pid, began)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if len(present) < len(values):
        return None
    return statistics.median(present)


def run(redis_url: str, rounds: int, graces: tuple[float, ...]) -> list[dict[str, Any]]:
    """All cases, ``rounds`` times each, on one worker."""
    os.environ["CANCELLABLE_BENCH_KILL_AFTER"] = str(KILL_AFTER)
    records: list[dict[str, Any]] = []
    cases: list[tuple[str, Any]] = []
    for kind in ("sleep", "gil"):
        for grace in graces:
            cases.append((f"ladder.{kind}.grace_{grace:g}", (ladder_case, kind, grace)))
        for signame in ("SIGTERM", "SIGKILL"):
            cases.append((f"ladder.{kind}.terminate_{signame}", (terminate_case, kind, signame)))
    with session(redis_url, concurrency=2) as worker:
        for name, (fn, kind, arg) in cases:
            samples = [fn(worker, kind, arg) for _ in range(rounds)]
            for metric in samples[0]:
                values = [sample[metric] for sample in samples]
                records.append(
                    {
                        "name": f"{name}.{metric}",
                        "median": _median(values),
                        "unit": "s" if metric.endswith("_s") else "fraction",
                        "runs": len(values),
                        "values": values,
                    }
                )
            log(
                f"{name}: "
                + ", ".join(
                    f"{r['name'].rsplit('.', 1)[1]}={r['median']}"
                    for r in records[-len(samples[0]) :]
                )
            )
    return records


def table(records: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per case, seconds as medians."""
    by_case: dict[str, dict[str, Any]] = {}
    for record in records:
        case, metric = record["name"].rsplit(".", 1)
        by_case.setdefault(case, {})[metric] = record["median"]

    def fmt(value: Any) -> str:
        return "not stopped" if value is None else f"{value:.2f}"

    lines = [
        "| task | how | REVOKED after (s) | task stopped after (s) "
        "| pool at full strength after (s) |",
        "|---|---|---|---|---|",
    ]
    for case, metrics in by_case.items():
        _, kind, how = case.split(".", 2)
        if how.startswith("grace_"):
            how_text = f"`cancel(grace={how[6:]})`"
        else:
            how_text = f"`revoke(terminate=True, signal={how[10:]})`"
        stopped = metrics["stopped_s"]
        lines.append(
            f"| {kind} | {how_text} | {fmt(metrics['revoked_s'])} | {fmt(stopped)} | "
            f"{fmt(metrics['full_strength_s'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the ladder benchmark; print a table; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--graces", default=",".join(f"{g:g}" for g in GRACES))
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args(argv)
    graces = tuple(float(g) for g in args.graces.split(","))
    records = run(args.redis_url, args.rounds, graces)
    print(table(records))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"environment": environment(), "results": records}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
