"""Audit a finished soak run again from its directory (after changing a rule,
or to read a violation's evidence again):

    .venv/bin/python -m tests.soak.reaudit /tmp/soak/soak-long-seed3-...

It starts redis-server on the run's own AOF (``<run>/redis``) on a free
port, reads every task's meta with ``cache=False``, stops it, and prints the
summary.  Nothing is written to the run directory.  A run against a
PostgreSQL ledger (its database is dropped with the run) is judged by the
task ids that ledger named at the end, kept in ``records.json``.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .aof import read_commands, unrecorded_pops
from .audit import (
    CancelRecord,
    KillRecord,
    TaskRecord,
    Violation,
    audit,
    faults_of,
    lost_by_broker,
    mark_cut_off,
    mark_unheard,
)
from .harness import RedisServer, free_port, read_events
from .settings import make_app


def recorded_ids(client: Any) -> set[str]:
    """Task ids named by every cancellation ledger on this Redis."""
    from cancellable.celery._ledger import RedisLedger

    found: set[str] = set()
    for key in client.scan_iter(match="cancellable:*:ledger"):
        prefix = key.decode()[: -len("ledger")]
        entries, _cursor = RedisLedger(client, prefix, 7 * 24 * 3600).read(None)
        found.update(t for e in entries for kind, t in e.targets if kind == "task")
    return found


def _queue_of(commands: list[list[bytes]]) -> str | None:
    """The task queue of a run recorded before records.json named it: the list popped
    that is not a reply queue."""
    popped = {a[1] for a in commands if a[0].upper() == b"RPOP" and b"." not in a[1]}
    return popped.pop().decode() if len(popped) == 1 else None


def reaudit(run_dir: Path) -> str:
    data = json.loads((run_dir / "records.json").read_text())
    tasks = {t: TaskRecord(**r) for t, r in data["tasks"].items()}
    cancels = [CancelRecord(**c) for c in data["cancels"]]
    kills = [KillRecord(**dict(k, pids=set(k["pids"]))) for k in data["kills"]]
    events = {t: read_events(run_dir / "events", t) for t in tasks}
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "redis"
        shutil.copytree(run_dir / "redis", copy)
        server = RedisServer(copy, free_port(random.Random()))
        server.start()
        try:
            app = make_app(
                main="reaudit", redis_url=server.url, queue="-", control_exchange="-",
                visibility_timeout=30,
            )  # fmt: skip
            metas = {t: dict(app.backend.get_task_meta(t, cache=False)) for t in tasks}
            recorded = recorded_ids(app.backend.client)
            if data.get("ledger_task_ids") is not None:
                recorded = set(data["ledger_task_ids"])
            app.close()
        finally:
            server.stop()
    mark_unheard(cancels, recorded)
    cuts = [(began, ended) for began, ended in data.get("cuts", [])]
    if data.get("ledger_task_ids") is None:  # the Redis ledger, cut off with the broker
        mark_cut_off(cancels, cuts, float(data["mode"]["grace"]))
    pending = [tasks[t] for t, m in metas.items() if m.get("status") == "PENDING"]
    logs = "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.log")))
    restarts = [(began, ended) for began, ended in data.get("restarts", [])]
    commands = read_commands(run_dir / "redis")
    queue = data.get("queue") or _queue_of(commands or [])
    pops = None if commands is None or queue is None else unrecorded_pops(commands, queue)
    lost = lost_by_broker(pending, events, logs, pops, faults_of(kills, restarts, cuts))
    report = audit(
        tasks, cancels, kills, events, metas, float(data["mode"]["grace"]), lost_by_broker=lost
    )
    for began, task_id in data.get("hung_cancels", []):
        report.anomalies.append(
            Violation(task_id, "cancel() blocked while the broker was down", f"called at {began}")
        )
    return report.summary(f"re-audit of {run_dir} (code {data.get('code', '?')})")


if __name__ == "__main__":
    print(reaudit(Path(sys.argv[1])))
