"""A fleet of prefork workers on one Redis: cancel -> cleanup, and what a cancel costs the fleet.

``--workers`` N ``celery worker --pool=prefork -c <concurrency>`` of
``bench_app`` consume one queue and share one control exchange (unique to
the run) on one Redis.  ``task_track_started`` is on, so a running task's
state names its worker.  Then, until ``--cancels`` samples are taken: every
pool slot gets a ``bench.nap_poll`` task (``@cancellable``, a checkpoint
every 2 ms between ``time.sleep`` calls: nearly idle tasks, so the numbers
measure delivery, not a fight for two cores; ``--task bench.nap`` waits in
``cancellable.sleep`` instead), and once all have started they are cancelled
one at a time with ``cancel(task, app=...)``, each waited for until its
``on_cancel`` hook has run (the client blocks in ``BLPOP`` on a notice the
hook pushes after stamping its time, rather than polling, which kept the
client and Redis busy on the cores the fleet needs).  Reported:

* ``cancel_ms``: the ``cancel()`` call (p50, p99);
* ``cleanup_ms``: from just before ``cancel()`` to the task's cleanup hook
  (p50, p99; wall clocks of one host);
* ``delivery_ms``: from ``cancel()``'s return to the cleanup hook (p50,
  p99): the workers' part of ``cleanup_ms``;
* ``fleet_cpu_ms_per_cancel``: CPU time (user + system) of all the
  workers' main processes during the cancel phase, per cancel, minus the
  same measured over an idle stretch as long (what waking, parsing and
  looking up a cancel costs the fleet);
* ``busy_children_cpu_ms_per_s``: CPU time of the pool children during the
  cancel phase, per second (the running tasks themselves);
* ``idle_cpu_ms_per_s``: CPU time of the workers' main processes and of
  their children over the idle stretch, per second (what an idle fleet
  costs);
* every task stopped (``stopped`` == ``cancels``; the ids of any that did
  not run their cleanup within `STOP_WAIT` are listed in ``not_stopped``,
  and those that had ended on their own before their ``cancel()``, which
  then rightly records nothing, in ``finished_first``: there should be none).

Each task is cancelled once it has run `SETTLE` seconds, in the order they
start: a worker may reserve more tasks than it has children, and those start
only when an earlier one ends.  (Waiting for every task of a batch to start
first let the early ones reach their spin limit and end SUCCESS before their
cancel: they were reported as ``not_stopped``, a loss that was the
benchmark's, not the library's.)

``--direct 1`` (the default, ``cancellable_direct_running = True``) sends
the cancel of each running task to its worker's own queue
(`cancellable.celery._direct`); ``--direct 0`` sets it False on the workers
and on the client (every cancel is broadcast to every worker), for
comparison.  (Before, the client's app never got the setting: "broadcast"
rows were directed by the client all the same.)  Load (``os.getloadavg``) is
printed with every row: the machine may be shared.  Run:
``python benchmarks/fleet.py --redis redis://127.0.0.1:6422/14 --workers 16
--concurrency 1 --cancels 48 [--direct 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile
from _workers import START_TIMEOUT, Worker, WorkerError, flush_benchmark_db, live_children

#: The task each pool slot runs by default: a checkpoint every 2 ms between
#: ``time.sleep`` calls (nearly idle).  ``--task bench.nap`` (in
#: ``cancellable.sleep``) is the other choice.
TASK = "bench.nap_poll"
#: Seconds a cancelled task has to run its cleanup hook before it counts as not stopped.
STOP_WAIT = 15.0
#: Seconds a task runs before it is cancelled (its STARTED state is stored
#: before the body runs).
SETTLE = 0.2
#: The spinning task's own limit: far longer than a run, so that no task
#: ends on its own before its cancel (which cancel() would rightly ignore).
SPIN_LIMIT = 600


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (``/proc/<pid>/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:  # a child that was replaced
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def start_fleet(redis_url: str, n: int, concurrency: int, direct: bool) -> list[Worker]:
    """``n`` workers on one queue and one control exchange, launched together."""
    token = uuid.uuid4().hex[:8]
    env = {
        "CANCELLABLE_BENCH_TRACK_STARTED": "1",
        "CANCELLABLE_BENCH_DIRECT": "1" if direct else "0",
        "CANCELLABLE_BENCH_SPIN_LIMIT": str(SPIN_LIMIT),
    }
    workers = []
    for _ in range(n):
        worker = Worker(redis_url, concurrency=concurrency, env=env)
        worker.queue = f"cancellable-bench-fleet-{token}"
        worker.control_exchange = f"cancellable-bench-fleet-ctl-{token}"
        workers.append(worker)
    try:
        for worker in workers:
            cmd = [sys.executable, "-m", "celery", "-A", "bench_app", "worker"]
            cmd += ["--pool=prefork", "-c", str(concurrency), "-Q", worker.queue]
            cmd += ["-n", worker.nodename, "--without-gossip", "--without-mingle"]
            cmd += ["--without-heartbeat", "-l", "WARNING"]
            worker.launch(
                cmd,
                {
                    "CANCELLABLE_BENCH_REDIS_URL": redis_url,
                    "CANCELLABLE_BENCH_BROKER_URL": redis_url,
                    "CANCELLABLE_BENCH_QUEUE": worker.queue,
                    "CANCELLABLE_BENCH_CONTROL": worker.control_exchange,
                    **env,
                },
            )
        app = workers[0].app
        app.conf.task_track_started = True
        # The client decides how a cancel is sent: it needs the setting too.
        app.conf.cancellable_direct_running = direct
        pending = {w.nodename for w in workers}
        deadline = time.monotonic() + START_TIMEOUT * 3
        while pending:
            for worker in workers:
                worker.check_alive()
            replies = app.control.ping(destination=sorted(pending), timeout=1.0)
            for reply in replies:
                pending -= set(reply)
            if time.monotonic() > deadline:
                raise WorkerError(f"{len(pending)} workers did not answer a ping")
    except BaseException:
        stop_fleet(workers)
        raise
    return workers


def stop_fleet(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.terminate()
    for worker in workers:
        worker.stop()
    workers[0].close()


def run(
    redis_url: str, n: int, concurrency: int, cancels: int, direct: bool, task: str = TASK
) -> dict[str, Any]:
    import redis

    from cancellable.celery import cancel

    flush_benchmark_db(redis_url)
    client = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    workers = start_fleet(redis_url, n, concurrency, direct)
    ready_s = time.monotonic() - started
    app = workers[0].app
    mains = [w.pid for w in workers]
    cancel_ms: list[float] = []
    cleanup_ms: list[float] = []
    delivery_ms: list[float] = []
    not_stopped: list[str] = []
    finished_first: list[str] = []
    busy_cpu = busy_wall = busy_kids_cpu = 0.0
    try:
        while len(cancel_ms) < cancels:
            slots = min(n * concurrency, cancels - len(cancel_ms))
            batch = []
            for _ in range(slots):
                key = f"cancellable-bench:fleet:{uuid.uuid4().hex}"
                batch.append((key, app.send_task(task, args=(key,), queue=workers[0].queue)))
            # A worker may reserve more tasks than it has children (prefetch):
            # those start only once an earlier one is cancelled.  So each task
            # is cancelled once it has run for `SETTLE` seconds, in the order
            # they start; waiting for all of them first would let the early
            # ones end on their own (then cancel() rightly leaves them alone).
            kids = [kid for pid in mains for kid in live_children(pid)]
            cpu0, wall0, kids0 = cpu_seconds(mains), time.monotonic(), cpu_seconds(kids)
            todo = dict(batch)
            deadline = time.monotonic() + 60
            while todo:
                ready = []
                for key in todo:
                    started_at = client.hget(key, "started")
                    if started_at is not None and time.time() - float(started_at) >= SETTLE:
                        ready.append(key)
                if not ready:
                    if time.monotonic() > deadline:
                        raise WorkerError("not every task started")
                    time.sleep(0.05)
                    continue
                for key in ready:
                    result = todo.pop(key)
                    t0 = time.time()
                    c0 = time.perf_counter()
                    receipt = cancel(result, reason="fleet benchmark", app=app)
                    cancel_ms.append((time.perf_counter() - c0) * 1000)
                    returned = time.time()
                    if receipt.finished:
                        # It ended before cancel() (a spin limit too short for
                        # the run): not a lost cancellation, and not a sample.
                        finished_first.append(result.id)
                        continue
                    # Blocked until the cleanup hook's notice: a waiter that
                    # polled would keep a core of the two busy meanwhile.
                    if client.blpop([f"{key}:done"], timeout=STOP_WAIT) is None:
                        not_stopped.append(result.id)  # reported, and the run goes on
                    else:
                        cleanup = float(client.hget(key, "cleanup"))
                        cleanup_ms.append((cleanup - t0) * 1000)
                        delivery_ms.append((cleanup - returned) * 1000)
                deadline = time.monotonic() + 60
            busy_cpu += cpu_seconds(mains) - cpu0
            busy_kids_cpu += cpu_seconds(kids) - kids0
            busy_wall += time.monotonic() - wall0
        kids = [kid for pid in mains for kid in live_children(pid)]
        cpu0, kids0 = cpu_seconds(mains), cpu_seconds(kids)
        time.sleep(busy_wall)
        idle_cpu = cpu_seconds(mains) - cpu0
        idle_kids_cpu = cpu_seconds(kids) - kids0
        children = len(kids)
    finally:
        stop_fleet(workers)
        client.close()
        flush_benchmark_db(redis_url)
    return {
        "workers": n,
        "concurrency": concurrency,
        "direct": direct,
        "task": task,
        "children": children,
        "cancels": len(cancel_ms),
        "stopped": len(cleanup_ms),
        "not_stopped": not_stopped,
        "finished_first": finished_first,
        "ready_s": round(ready_s, 1),
        "cancel_ms": {
            "p50": round(percentile(cancel_ms, 50), 2),
            "p99": round(percentile(cancel_ms, 99), 2),
        },
        "cleanup_ms": {
            "p50": round(percentile(cleanup_ms, 50), 2),
            "p99": round(percentile(cleanup_ms, 99), 2),
        },
        # From cancel()'s return to the cleanup hook: the workers' part.
        "delivery_ms": _p50_p99(delivery_ms),
        "fleet_cpu_ms_per_cancel": round((busy_cpu - idle_cpu) * 1000 / len(cancel_ms), 2),
        # The running tasks' children while the cancels go on, per second.
        "busy_children_cpu_ms_per_s": round(busy_kids_cpu * 1000 / busy_wall, 1),
        # The idle fleet (no task running): CPU ms per second of wall time.
        "idle_cpu_ms_per_s": {
            "mains": round(idle_cpu * 1000 / busy_wall, 1),
            "children": round(idle_kids_cpu * 1000 / busy_wall, 1),
        },
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def _p50_p99(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6422/14")
    parser.add_argument("--workers", default="16")
    parser.add_argument("--concurrency", default="1")
    parser.add_argument("--cancels", type=int, default=48)
    parser.add_argument("--direct", default="1")
    parser.add_argument("--task", default=TASK)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        for c in (int(x) for x in args.concurrency.split(",")):
            for direct in (x == "1" for x in args.direct.split(",")):
                row = run(args.redis, n, c, args.cancels, direct, args.task)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
