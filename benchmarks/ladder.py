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

Every case runs `ROUNDS` times against the harness's shared worker
(`real_workers.py`); medians are reported, and a case whose task was not
stopped in some round is reported as skipped, saying so.  The full run
measures every case; ``--quick`` and ``--smoke`` only the sleeping task's
``grace_0`` case, once.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from _common import log, measured, skipped
from _workers import live_children, process_gone

#: ``cancellable_kill_after`` of the benchmark worker (seconds).
KILL_AFTER = 1.0
GRACES = (0.0, 0.5, 1.0, 2.0)
#: Rounds per case, per mode (quick and smoke: only `QUICK_CASE`).
ROUNDS = {"full": 3, "quick": 1, "smoke": 1}
QUICK_CASE = "ladder.sleep.grace_0"
#: Seconds after which a task that did not stop is reported as not stopped.
GIVE_UP = 8.0
METRICS = ("revoked_s", "stopped_s", "full_strength_s")
CASES = tuple(
    (f"ladder.{kind}.{how}", kind, how)
    for kind in ("sleep", "gil")
    for how in (*(f"grace_{g:g}" for g in GRACES), "terminate_SIGTERM", "terminate_SIGKILL")
)
NAMES = tuple(f"{case}.{metric}" for case, _kind, _how in CASES for metric in METRICS)


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


def _start(worker: Any, client: Any, task: str) -> tuple[Any, int]:
    """Send ``task``, wait until it runs; return its result and its child's pid."""
    key = f"ladder:{uuid.uuid4().hex}"
    result = worker.app.send_task(task, args=(key,), queue=worker.queue)
    if _wait(lambda: client.hget(key, "pid"), 60) is None:
        raise RuntimeError(f"{task} did not start; {worker.tail()}")
    time.sleep(0.2)  # well inside the body
    return result, int(client.hget(key, "pid"))


def _full(worker: Any) -> bool:
    return len(live_children(worker.pid)) == worker.concurrency


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
        if died is None and process_gone(pid):
            died = now
        if died is not None and strength is None:
            kids = live_children(worker.pid)
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
    alive = not process_gone(pid)
    if alive and _task_still_running(worker, pid):
        os.kill(pid, 9)  # Celery's SIGTERM could not stop it: free the child
        stopped = None
        strength = _wait(lambda: _full(worker), 60, 0.01)
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
    _wait(lambda: _full(worker), 60, 0.05)
    time.sleep(0.3)


def one_case(worker: Any, client: Any, kind: str, how: str) -> dict[str, float | None]:
    """One ``cancel(grace=)`` of a running ``@cancellable`` task, or Celery's terminate."""
    from cancellable.celery import cancel

    if how.startswith("grace_"):
        result, pid = _start(worker, client, f"bench.ladder_{kind}")
        began = time.monotonic()
        cancel(result, "benchmark", grace=float(how[6:]), app=worker.app)
    else:
        result, pid = _start(worker, client, f"bench.plain_{kind}")
        began = time.monotonic()
        worker.app.control.revoke(result.id, terminate=True, signal=how[10:])
    return _measure(worker, result.id, pid, began)


def run(worker: Any, client: Any, mode: str, names: list[str]) -> list[dict[str, Any]]:
    """The selected ``ladder.*`` records, on the harness's worker."""
    records: list[dict[str, Any]] = []
    for case, kind, how in CASES:
        wanted = [f"{case}.{metric}" for metric in METRICS if f"{case}.{metric}" in names]
        if not wanted:
            continue
        if mode != "full" and case != QUICK_CASE:
            records += [skipped(n, f"only in the full run, not in {mode} mode") for n in wanted]
            continue
        samples = [one_case(worker, client, kind, how) for _ in range(ROUNDS[mode])]
        for metric in METRICS:
            name, values = f"{case}.{metric}", [sample[metric] for sample in samples]
            if name not in wanted:
                continue
            present = [v for v in values if v is not None]
            if len(present) < len(values):
                missed = len(values) - len(present)
                why = f"not stopped within {GIVE_UP:g} s in {missed} of {len(values)} rounds"
                records.append(skipped(name, why))
            else:
                records.append(measured(name, present, "s", runs=len(present), tails=False))
        log(f"{case}: " + ", ".join(f"{m}={[s[m] for s in samples]}" for m in METRICS))
    return records
