"""Runs a soak: starts Redis and the workers, executes the plan, waits, audits.

The workers reach the soak's Redis (their broker, result backend and, by
default, ledger) through a TCP proxy the driver controls (`tests.proxy`), so
that the plan can cut every worker connection at once; the driver's own
client talks to Redis directly.  With ``CANCELLABLE_SOAK_LEDGER=postgresql``
the workers' and the client's ledger is a PostgreSQL database the soak
creates for the run and drops at the end (`tests.sql_dbs`).

Everything the audit needs is recorded as it happens: when each task was
sent, every cancel call (when it began and returned, how, with what reason,
and what the task's own event file said just before), every kill (time and
pids) and every Redis restart.  At the end the driver waits, bounded, until
every task has a final state, no run is in progress and no message is left in
the queue or among the unacked ones, then reads each task's stored meta from
the backend with ``cache=False`` and hands everything to `audit.audit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import threading
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any

from celery import Celery, group
from tests.proxy import TcpProxy

from . import aof
from . import audit as audit_mod
from .audit import CancelRecord, KillRecord, Report, TaskRecord
from .harness import RedisServer, Worker, free_port, phase_of, read_events, worker_env
from .plan import Action, Mode, Plan
from .settings import SHUTDOWN_GRACE, make_app

#: How long cancel() may take to refuse a cancellation while Redis is down.
PROBE_TIMEOUT = 5.0
#: How often a cancel refused with BrokerUnavailableError is retried, and how far apart.
#: The longest waits a worker's threads may show (``timings/<node>.json``, the
#: library's `~cancellable.celery._runtime.Timings`), as docs/reliability.md
#: documents them: the library's own work on the consumer thread for one revoke
#: command, the time between two ticks of the ladder, and one ledger call
#: (two round trips of at most 2 s each, and the delivery of what it read).
STALL_BOUNDS = {"consumer_s": 2.0, "tick_gap_s": 2.0, "ledger_call_s": 5.0}
#: How long the revokes sent during a hang may take once Redis is back.
HANG_REVOKE_JOIN = 60.0
CANCEL_RETRIES = 40
CANCEL_RETRY_EVERY = 0.5


@dataclasses.dataclass
class Pending:
    """A cancel to retry: it was refused because the broker was down."""

    method: str
    task_ids: list[str]
    as_result: bool
    due: float
    tries: int = 0
    group_result: Any = None


def code_version() -> str:
    """The commit under test, and whether src/ has uncommitted changes."""
    import subprocess

    from .harness import REPO_ROOT

    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in src/' if dirty else ''}"


#: Seconds past ``cancellable_shutdown_grace`` within which every run on a
#: worker in a warm shutdown must have ended, its cleanup done (docs/shutdown.md:
#: the grace plus a small bound; the interrupt step and the cleanup hooks,
#: under load).  This is the library's part of a shutdown.
SHUTDOWN_BOUND = 5.0
#: Seconds past the grace within which the worker process must have exited
#: (then it is killed, and reported).  Celery's own teardown after the pool
#: has drained (the pool's join, the consumer's close) is not the library's:
#: a plain Celery worker with nothing running took 3.4-4.2 s to exit on
#: SIGTERM on this 2-core machine at a load of 4, and 8.5 s after its last
#: task in a CI run (a soak worker, four test jobs beside it).
SHUTDOWN_EXIT_BOUND = 20.0


class Soak:
    def __init__(self, plan: Plan, run_dir: Path, *, with_cancellable: bool = True) -> None:
        self.plan = plan
        self.mode: Mode = plan.mode
        self.run_dir = run_dir
        self.events_dir = run_dir / "events"
        self.events_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        self.with_cancellable = with_cancellable
        self.rng = random.Random(self.mode.seed + 1)
        uid = uuid.uuid4().hex[:8]
        self.app_name = f"soak-{uid}"
        self.queue = f"soak-{uid}"
        self.control_exchange = f"soak-{uid}"
        self.redis = RedisServer(run_dir / "redis", free_port(random.Random()))
        self.app: Celery | None = None
        self.workers: list[Worker] = []
        self.worker_serial = 0
        self.tasks: dict[str, TaskRecord] = {}
        self.cancelled: set[str] = set()
        self.cancels: list[CancelRecord] = []
        self.kills: list[KillRecord] = []
        self.restarts: list[tuple[float, float]] = []
        #: Hung-server phases: (SIGSTOP, SIGCONT) wall times.
        self.hangs: list[tuple[float, float]] = []
        self._seq_lock = threading.Lock()
        self.log: list[str] = []
        self.cancel_seq = 0
        self.t0 = 0.0
        self._starting: list[threading.Thread] = []
        self._next_supervise = 0.0
        #: cancel() calls that blocked while Redis was down: (began, task id).
        self.hung: list[tuple[float, str]] = []
        self._probes: list[threading.Thread] = []
        self.children_seen: dict[str, set[int]] = {}
        self.died: set[str] = set()
        self.timings: dict[str, float] = {}
        #: Warm shutdowns: (worker, SIGTERM time, seconds until it exited, its pids).
        self.shutdowns: list[tuple[str, float, float, frozenset[int]]] = []
        #: The proxy between the workers and Redis, and its cuts: (cut, accepting again).
        self.proxy: TcpProxy | None = None
        self.cuts: list[tuple[float, float]] = []
        #: cancel() calls made during a cut, and right after the workers were back.
        self.cut_cancels = {"during": 0, "after": 0}
        #: The ledger's URL when it is not the soak's Redis (a PostgreSQL database).
        self.ledger_url: str | None = None
        #: The task ids the ledger named at the end (`mark_unheard_revokes`).
        self.recorded: set[str] = set()
        self._resources = contextlib.ExitStack()

    # ------------------------------------------------------------------ setup

    def note(self, text: str) -> None:
        """Log an action as it happens (also to driver.log, for long runs)."""
        line = f"[{time.time() - self.t0 if self.t0 else 0.0:8.3f}] {text}"
        self.log.append(line)
        with contextlib.suppress(OSError), open(self.run_dir / "driver.log", "a") as out:
            out.write(line + "\n")

    @property
    def worker_redis_url(self) -> str:
        """The workers' Redis URL: the proxy's port (the soak's Redis itself before the proxy)."""
        if self.proxy is None:
            return self.redis.url
        return f"redis://127.0.0.1:{self.proxy.port}/0"

    def env(self) -> dict[str, str]:
        return worker_env(
            app_name=self.app_name,
            redis_url=self.worker_redis_url,
            ledger_url=self.ledger_url,
            queue=self.queue,
            control_exchange=self.control_exchange,
            run_dir=self.run_dir,
            visibility_timeout=self.mode.visibility_timeout,
            with_cancellable=self.with_cancellable,
        )

    def new_worker(self) -> Worker:
        self.worker_serial += 1
        worker = Worker.make(
            run_dir=self.run_dir,
            queue=self.queue,
            concurrency=self.mode.concurrency,
            env=self.env(),
            label=f"w{self.worker_serial}",
        )
        worker.spawn()
        self.workers.append(worker)
        return worker

    def start(self) -> None:
        began = time.monotonic()
        self.redis.start()
        self.proxy = TcpProxy("127.0.0.1", self.redis.port)
        if self.mode.ledger == "postgresql":
            from tests import sql_dbs

            database = self._resources.enter_context(sql_dbs.temporary_database("postgresql"))
            self.ledger_url = sql_dbs.url("postgresql", database)
            self.note(f"ledger: PostgreSQL database {database} (dropped at the end)")
        self.app = make_app(
            main=self.app_name,
            redis_url=self.redis.url,
            queue=self.queue,
            control_exchange=self.control_exchange,
            visibility_timeout=self.mode.visibility_timeout,
        )
        # The client side gives up quickly when Redis is down (cancel() then
        # raises BrokerUnavailableError instead of waiting).
        self.app.conf.broker_connection_timeout = 2.0
        if self.with_cancellable:
            from cancellable.celery import configure

            configure(self.app, ledger_url=self.ledger_url or self.redis.url, poll_interval=0.5)
        fresh = [self.new_worker() for _ in range(self.mode.workers)]
        for worker in fresh:
            worker.wait_ready(self.app, self.mode.concurrency)
        self.timings["startup"] = time.monotonic() - began

    def stop(self) -> None:
        for thread in self._starting:
            thread.join(timeout=70)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()
        if self.app is not None:
            with contextlib.suppress(Exception):
                self.app.close()
        if self.proxy is not None:
            self.proxy.close()
        self.redis.stop()
        self._resources.close()  # drops the PostgreSQL ledger's database

    # --------------------------------------------------------------- the run

    def run(self) -> Report:
        try:
            self.start()
            self.t0 = time.time()
            self.execute()
            drained = self.drain()
            report = self.audit(drained)
        finally:
            self.stop()
            self.write_records()
        return report

    def elapsed(self) -> float:
        return time.time() - self.t0

    def execute(self) -> None:
        sends = sorted(self.plan.tasks, key=lambda t: t.sent_at)
        actions = list(self.plan.actions)
        retries: list[Pending] = []
        group_cancels: list[tuple[float, Action, Any]] = []
        si = ai = 0
        while si < len(sends) or ai < len(actions) or retries or group_cancels:
            now = self.elapsed()
            while si < len(sends) and sends[si].sent_at <= now:
                self.send(sends[si])
                si += 1
            for item in list(group_cancels):
                if item[0] <= now:
                    group_cancels.remove(item)
                    self.cancel_group(item[1], item[2], retries)
            for pending in list(retries):
                if pending.due <= now:
                    retries.remove(pending)
                    self.issue(
                        pending.method,
                        pending.task_ids,
                        pending.as_result,
                        retries,
                        pending,
                        group_result=pending.group_result,
                    )
            self.supervise()
            if ai < len(actions) and actions[ai].at <= now:
                action = actions[ai]
                ai += 1
                self.act(action, retries, group_cancels)
                continue
            time.sleep(0.01)
        self.timings["schedule"] = self.elapsed()

    def act(self, action: Action, retries: list[Pending], group_cancels: list[Any]) -> None:
        try:
            if action.kind == "cancel":
                self.do_cancel(action, retries)
            elif action.kind == "group":
                result = self.send_group(action)
                if result is not None:
                    at = self.elapsed() + float(action.params["cancel_after"])
                    group_cancels.append((at, action, result))
            elif action.kind == "kill_child":
                self.kill_child()
            elif action.kind == "kill_worker":
                self.kill_worker()
            elif action.kind == "restart_redis":
                self.restart_redis(action, retries)
            elif action.kind == "hang_redis":
                self.hang_redis(action, retries)
            elif action.kind == "warm_shutdown":
                self.warm_shutdown()
            elif action.kind == "cut_connections":
                self.cut_connections(action, retries)
        except Exception:
            self.note(f"action {action.kind} failed:\n{traceback.format_exc()}")

    # ------------------------------------------------------------ sending

    def send(self, task: TaskRecord) -> None:
        assert self.app is not None
        for _ in range(100):
            try:
                task.sent_at = time.time()
                self.app.send_task(f"soak.{task.kind}", args=task.args, task_id=task.id)
                self.tasks[task.id] = task
                return
            except Exception as exc:
                self.note(f"send {task.id} failed ({exc!r}); retrying")
                time.sleep(0.2)
        self.note(f"send {task.id} gave up")

    def send_group(self, action: Action) -> Any:
        assert self.app is not None
        members: list[TaskRecord] = action.params["members"]
        sigs = [
            self.app.signature(f"soak.{m.kind}", args=m.args, options={"task_id": m.id})
            for m in members
        ]
        sent_at = time.time()
        result = group(sigs).apply_async(group_id=action.params["id"])
        for member in members:
            member.sent_at = sent_at
            member.group = action.params["id"]
            self.tasks[member.id] = member
            self.cancelled.add(member.id)  # reserved for the group cancel
        self.note(f"sent group {action.params['id']} of {len(members)}")
        return result

    # ------------------------------------------------------------ cancels

    def phase(self, task_id: str) -> str:
        dead = {pid for k in self.kills for pid in k.pids}
        return phase_of(read_events(self.events_dir, task_id), dead)

    def pick(self, want: str, batch: int) -> list[str]:
        candidates: dict[str, list[str]] = {
            "queued": [],
            "running": [],
            "finished": [],
            "killed": [],
            "stopped": [],
        }
        for task_id in self.tasks:
            if task_id not in self.cancelled:
                candidates[self.phase(task_id)].append(task_id)
        pool = (
            candidates[want]
            or candidates["killed"]
            or next((candidates[p] for p in ("running", "queued", "finished") if candidates[p]), [])
        )
        if not pool:
            return []
        return self.rng.sample(pool, min(batch, len(pool)))

    def do_cancel(self, action: Action, retries: list[Pending]) -> None:
        params = action.params
        task_ids = self.pick(params["phase"], params["batch"])
        if not task_ids:
            return
        self.cancelled.update(task_ids)
        self.issue(params["method"], task_ids, params.get("as_result", False), retries, None)

    def cancel_group(self, action: Action, result: Any, retries: list[Pending]) -> None:
        members = [m.id for m in action.params["members"]]
        self.issue("group", members, True, retries, None, group_result=result)

    def issue(
        self,
        method: str,
        task_ids: list[str],
        as_result: bool,
        retries: list[Pending],
        pending: Pending | None,
        group_result: Any = None,
    ) -> None:
        assert self.app is not None
        with self._seq_lock:  # hang_redis issues from several threads at once
            self.cancel_seq += 1
            seq = self.cancel_seq
        reason = requested_by = None
        if method in ("cancel", "group"):
            reason = f"soak {self.mode.seed}/{seq}: stop {method}"
            requested_by = f"soak-user-{seq}"
        phases = {t: self.phase(t) for t in task_ids}
        record = CancelRecord(seq, method, task_ids, 0.0, 0.0, phases, reason, requested_by)
        record.t_begin = time.time()
        try:
            if method in ("cancel", "group"):
                import cancellable.celery as cc

                if group_result is not None:
                    target: Any = group_result
                elif as_result:
                    target = [self.app.AsyncResult(t) for t in task_ids]
                else:
                    target = task_ids if len(task_ids) > 1 else task_ids[0]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    receipt = cc.cancel(
                        target, reason=reason, requested_by=requested_by, app=self.app
                    )
                record.finished = [task_id for task_id, _state in receipt.finished]
                record.ledger_warning = any(
                    issubclass(w.category, cc.LedgerUnavailableWarning) for w in caught
                )
            elif method == "revoke":
                for task_id in task_ids:
                    self.app.AsyncResult(task_id).revoke()
            else:
                self.app.control.revoke(list(task_ids))
            record.outcome = "issued"
        except Exception as exc:
            broker_down = type(exc).__name__ == "BrokerUnavailableError"
            record.outcome = "not_issued" if broker_down else "uncertain"
            record.error = repr(exc)
            if broker_down:
                tries = (pending.tries if pending else 0) + 1
                if tries <= CANCEL_RETRIES:
                    due = self.elapsed() + CANCEL_RETRY_EVERY
                    retries.append(Pending(method, task_ids, as_result, due, tries, group_result))
                else:
                    self.cancelled.difference_update(task_ids)
        record.t_end = time.time()
        self.cancels.append(record)
        self.note(
            f"cancel #{seq} {method} {len(task_ids)} id(s) {record.outcome}"
            + (f" {record.error}" if record.error else "")
            + (f" phases {sorted(set(phases.values()))}" if len(task_ids) > 1 else f" {phases}")
        )

    # ------------------------------------------------------------ faults

    def supervise(self, every: float = 0.5) -> None:
        """Track pool children; replace a worker that exited although nobody killed it.

        Such an exit is not the library's doing (kombu 5.7 can end a worker
        with "Unrecoverable error" when the broker connection drops), but
        its runs end without a kill we recorded, so it is recorded as a
        ``died`` kill (with the children last seen) and reported.
        """
        now = time.monotonic()
        if now < self._next_supervise:
            return
        self._next_supervise = now + every
        for worker in list(self.workers):
            if worker.killed_at or worker.proc is None:
                continue
            if worker.alive():
                if worker.ready_at:
                    self.children_seen.setdefault(worker.name, set()).update(worker.children())
                continue
            if worker.name in self.died:
                continue
            self.died.add(worker.name)
            pids = {worker.pid, *self.children_seen.get(worker.name, set())}
            self.kills.append(KillRecord(time.time(), "died", pids, worker.name))
            self.note(
                f"worker {worker.name} exited on its own (rc {worker.proc.returncode}); "
                "starting a replacement"
            )
            self.replace()

    def replace(self) -> None:
        replacement = self.new_worker()

        def ready() -> None:
            assert self.app is not None
            try:
                replacement.wait_ready(self.app, self.mode.concurrency)
                self.note(f"replacement {replacement.name} ready")
            except Exception as exc:
                self.note(f"replacement {replacement.name} failed: {exc}")

        thread = threading.Thread(target=ready, daemon=True)
        thread.start()
        self._starting.append(thread)

    def alive_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive() and w.ready_at and not w.killed_at]

    def busy_pids(self) -> set[int]:
        pids: set[int] = set()
        for task_id in self.tasks:
            events = read_events(self.events_dir, task_id)
            ended = {e["run"] for e in events if e["ev"] in ("finished", "checkpoint_raised")}
            pids |= {e["pid"] for e in events if e["ev"] == "started" and e["run"] not in ended}
        return pids

    def kill_child(self) -> None:
        import os
        import signal

        workers = self.alive_workers()
        if not workers:
            self.note("kill_child: no ready worker")
            return
        kids = {kid: w for w in workers for kid in w.children()}
        busy = [k for k in kids if k in self.busy_pids()]
        choice = self.rng.choice(sorted(busy) or sorted(kids))
        os.kill(choice, signal.SIGKILL)
        self.kills.append(KillRecord(time.time(), "child", {choice}, kids[choice].name))
        self.note(f"kill -9 child {choice} of {kids[choice].name} (busy={choice in busy})")

    def kill_worker(self) -> None:
        workers = self.alive_workers()
        if not workers:
            self.note("kill_worker: no ready worker")
            return
        worker = self.rng.choice(workers)
        pids = worker.kill9()
        self.kills.append(KillRecord(time.time(), "worker", pids, worker.name))
        self.note(f"kill -9 worker {worker.name} pids {sorted(pids)}; starting a replacement")
        self.replace()

    def warm_shutdown(self) -> None:
        """SIGTERM one worker (its running tasks go back to the broker); start a replacement.

        The stop runs on its own thread (the schedule goes on); a worker still
        alive `SHUTDOWN_EXIT_BOUND` seconds after its grace is killed, and
        reported.  `audit` checks that its runs ended within `SHUTDOWN_BOUND`.
        """
        workers = self.alive_workers()
        if not workers:
            self.note("warm_shutdown: no ready worker")
            return
        worker = self.rng.choice(workers)
        pids = {worker.pid, *worker.children()}
        began = time.time()
        worker.killed_at = began  # its exit is not a death, and it takes no more actions
        self.note(f"warm shutdown (SIGTERM) of {worker.name}; starting a replacement")

        def stop() -> None:
            worker.stop(timeout=SHUTDOWN_GRACE + SHUTDOWN_EXIT_BOUND)
            took = time.time() - began
            self.shutdowns.append((worker.name, began, took, frozenset(pids)))
            # Runs that never ended there were ended by the stop's SIGKILL.
            self.kills.append(KillRecord(began, "shutdown", pids, worker.name))
            self.note(f"{worker.name} exited {took:.2f}s after SIGTERM")

        thread = threading.Thread(target=stop, daemon=True)
        thread.start()
        self._starting.append(thread)
        self.replace()

    def restart_redis(self, action: Action, retries: list[Pending]) -> None:
        assert self.app is not None
        client = self.redis.client()
        marker = f"soak-marker-{uuid.uuid4().hex[:6]}"
        client.set(marker, "1")
        before = int(client.llen(self.queue)), int(client.hlen("unacked"))
        client.close()
        began = time.time()

        def while_down() -> None:
            # One cancel while Redis is down: cancel() must refuse it at once
            # (BrokerUnavailableError), and it is retried after the restart.
            # Bounded: a cancel() that blocks instead must not hold the
            # restart up; it is reported and judged as uncertain.
            if not self.with_cancellable:
                return
            pick = self.pick("queued", 1)
            if not pick:
                return
            self.cancelled.update(pick)
            late: list[Pending] = []
            probe = threading.Thread(
                target=self.issue, args=("cancel", pick, False, late, None), daemon=True
            )
            began = time.time()
            probe.start()
            probe.join(PROBE_TIMEOUT)
            if probe.is_alive():
                self.hung.append((began, pick[0]))
                self.note(f"cancel() of {pick[0]} did not return within {PROBE_TIMEOUT}s")
                self._probes.append(probe)
            else:
                retries.extend(late)

        self.redis.restart(float(action.params.get("down_for", 1.0)), while_down)
        client = self.redis.client()
        kept = client.get(marker) == b"1"
        after = int(client.llen(self.queue)), int(client.hlen("unacked"))
        client.close()
        self.restarts.append((began, time.time()))
        self.note(
            f"redis restarted (AOF kept data: {kept}; queue/unacked before {before} after {after})"
        )
        if not kept:
            raise RuntimeError("Redis lost data across the restart: the AOF setup is wrong")
        self.wait_for_pings("the restart")

    def wait_for_pings(self, after: str) -> None:
        """Go on only once every live worker answers a ping again (its consumer
        and control channel are back), bounded."""
        assert self.app is not None
        deadline = time.monotonic() + 30
        for worker in self.alive_workers():
            while worker.alive() and not worker.pings(self.app, 1.0):
                if time.monotonic() >= deadline:
                    self.note(f"{worker.name} does not answer pings after {after}")
                    break
                time.sleep(0.2)
            self.supervise(every=0.0)
        self.note(f"workers answer pings after {after}")

    def cut_connections(self, action: Action, retries: list[Pending]) -> None:
        """Cut every worker connection to Redis at once (the proxy), then let them back.

        The proxy closes every forwarded connection on both sides (each
        worker's broker, result-backend and, with the Redis ledger, ledger
        connections), refuses new ones for ``refuse_for`` seconds (0: it
        accepts again at once), then accepts again.  A Redis broker
        redelivers nothing on a lost connection, so the library stops
        nothing (docs/shutdown.md): the audit's rules for uncancelled tasks
        (no checkpoint raised, no hook, SUCCESS) and for overlapping runs
        judge it.  While the workers are cut off (a cut that refuses
        connections for a while), the driver cancels one
        running task with ``cancel()`` (its client reaches Redis directly):
        no worker hears the broadcast, so the task learns of it from the
        ledger, once the cut is over (the Redis ledger, cut off too: the
        call, like every call whose grace had not run out when the cut
        began, is judged from then, `CancelRecord.cut_until`) or at once (a
        PostgreSQL ledger, which the cut does not touch).  Once every worker
        answers pings again, one more running task is cancelled.
        """
        assert self.proxy is not None
        refuse_for = float(action.params.get("refuse_for", 0.0))
        held = self.proxy.connections() // 2
        began = time.time()
        self.proxy.cut()
        self.note(f"connection cut: {held} connection(s) dropped, refusing for {refuse_for:.2f}s")
        # A cut that accepts again at once lets the workers reconnect while
        # their consumers still clean up the old connection (kombu restores
        # their unacknowledged messages then): nothing is cancelled in between.
        if self.with_cancellable and refuse_for > 0:
            pick = self.pick("running", 1)
            if pick:
                self.cancelled.update(pick)
                count = len(self.cancels)
                self.issue("cancel", pick, False, retries, None)
                self.cut_cancels["during"] += sum(
                    c.outcome == "issued" for c in self.cancels[count:]
                )
        time.sleep(max(0.0, refuse_for - (time.time() - began)))
        self.proxy.restore()
        ended = time.time()
        self.cuts.append((began, ended))
        self.note(f"connection cut over after {ended - began:.2f}s; accepting again")
        self.wait_for_pings("the cut")
        if self.with_cancellable:
            pick = self.pick("running", 1)
            if pick:
                self.cancelled.update(pick)
                self.issue("cancel", pick, True, retries, None)
                self.cut_cancels["after"] += 1

    def hang_redis(self, action: Action, retries: list[Pending]) -> None:
        """A hung server: SIGSTOP the soak's Redis, send plain revokes, SIGCONT it.

        The server keeps its port and its connections and answers nothing, so
        every client waits on it: the workers' consumers (the broker), their
        result backend and their ledger threads (each ledger call gives up
        after its bound and is retried).  The burst of plain revokes
        (``AsyncResult.revoke`` and ``control.revoke``, half each, of running
        and queued tasks), each from a thread of its own, is published once
        the server answers again; the workers then record each one in the
        ledger, once.  The driver sends nothing else meanwhile.
        """
        batches: list[tuple[str, list[str]]] = []
        for n in range(int(action.params.get("revokes", 4))):
            task_ids = self.pick("running" if n % 2 else "queued", self.rng.randint(1, 4))
            if task_ids:
                self.cancelled.update(task_ids)
                batches.append(("revoke" if n % 2 else "control", task_ids))
        pause_for = float(action.params.get("pause_for", 10.0))
        self.redis.pause()
        began = time.time()
        self.note(f"redis stopped (SIGSTOP) for {pause_for:.1f}s; {len(batches)} plain revokes")
        threads = [
            threading.Thread(
                target=self.issue, args=(method, ids, False, retries, None), daemon=True
            )
            for method, ids in batches
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.2)
        time.sleep(max(0.0, pause_for - (time.time() - began)))
        paused = self.redis.resume()
        self.hangs.append((began, time.time()))
        self.note(f"redis continued (SIGCONT) after {paused:.1f}s")
        deadline = time.monotonic() + HANG_REVOKE_JOIN
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = sum(thread.is_alive() for thread in threads)
        if late:
            self.note(f"{late} revoke(s) sent during the hang had not returned after the join")
        self.supervise(every=0.0)

    def stalls(self) -> dict[str, dict[str, float]]:
        """Each worker's longest waits (its last ``timings/<node>.json``)."""
        found: dict[str, dict[str, float]] = {}
        for path in sorted((self.run_dir / "timings").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                found[path.stem] = json.loads(path.read_text())
        return found

    # -------------------------------------------------------------- the end

    def states(self) -> dict[str, dict[str, Any]]:
        assert self.app is not None
        backend = self.app.backend
        metas: dict[str, dict[str, Any]] = {}
        for task_id in self.tasks:
            for _ in range(20):
                try:
                    metas[task_id] = dict(backend.get_task_meta(task_id, cache=False))
                    break
                except Exception:
                    time.sleep(0.2)
        return metas

    def outstanding(self) -> dict[str, Any]:
        client = self.redis.client()
        try:
            queued = sum(
                int(client.llen(k))
                for k in client.scan_iter(match=f"{self.queue}*")
                if client.type(k) == b"list"
            )
            unacked = int(client.hlen("unacked"))
        finally:
            client.close()
        metas = self.states()
        not_final = [t for t, m in metas.items() if m.get("status") not in audit_mod.FINAL]
        return {
            "queued": queued,
            "unacked": unacked,
            "not_final": not_final,
            "busy": self.busy_pids(),
        }

    def drain(self) -> bool:
        began = time.monotonic()
        for thread in self._starting:
            thread.join(timeout=70)
        deadline = time.monotonic() + self.mode.drain_timeout + self.mode.visibility_timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.supervise(every=0.0)
            last = self.outstanding()
            live_busy = {p for p in last["busy"] if Path(f"/proc/{p}").exists()}
            waiting = set(last["not_final"]) - set(self.lost_by_broker(last["not_final"]))
            if not (last["queued"] or last["unacked"] or waiting or live_busy):
                self.timings["drain"] = time.monotonic() - began
                self.note("drained")
                return True
            time.sleep(1.0)
        self.timings["drain"] = time.monotonic() - began
        self.note(
            f"drain timed out: queued {last.get('queued')}, unacked {last.get('unacked')}, "
            f"not final {len(last.get('not_final', []))}"
        )
        return False

    def audit(self, drained: bool) -> Report:
        for probe in self._probes:
            probe.join(timeout=30)
        for record in self.cancels:
            hung = any(record.task_ids == [task_id] for _, task_id in self.hung)
            if hung and record.outcome == "issued":
                # It returned (or failed) only after Redis came back: when it
                # took effect is unknown, so only the weak rules apply.
                record.outcome = "uncertain"
                record.error = (record.error or "") + " (blocked while Redis was down)"
        self.mark_unheard_revokes()
        if self.ledger_url is None:
            # The workers' ledger (the soak's Redis) was cut off with their broker.
            audit_mod.mark_cut_off(self.cancels, self.cuts, self.mode.grace)
        metas = self.states()
        events = {t: read_events(self.events_dir, t) for t in self.tasks}
        pending = [t for t, m in metas.items() if m.get("status") == "PENDING"]
        report = audit_mod.audit(
            self.tasks,
            self.cancels,
            self.kills,
            events,
            metas,
            self.mode.grace,
            lost_by_broker=self.lost_by_broker(pending),
        )
        for began, task_id in self.hung:
            report.anomalies.append(
                audit_mod.Violation(
                    task_id,
                    "cancel() blocked while the broker was down",
                    f"called {began - self.t0:.1f}s into the run; did not raise "
                    f"BrokerUnavailableError within {PROBE_TIMEOUT}s",
                )
            )
        report.stalls = self.stalls()
        report.stall_bounds = dict(STALL_BOUNDS)
        if self.with_cancellable and self.hangs and not report.stalls:
            report.anomalies.append(
                audit_mod.Violation("-", "no worker reported its timings", "timings/ is empty")
            )
        for node, figures in report.stalls.items():
            for name, bound in STALL_BOUNDS.items():
                value = float(figures.get(name, 0.0))
                if value > bound:
                    report.anomalies.append(
                        audit_mod.Violation(
                            "-",
                            f"a worker stalled longer than its bound ({name})",
                            f"{node}: {name} {value:.3f}s > {bound:.1f}s",
                        )
                    )
        self.check_shutdowns(report, events)
        if not drained:
            report.anomalies.append(
                audit_mod.Violation("-", "the run did not drain", self.log[-1] if self.log else "")
            )
        for violation in report.violations[:200]:
            violation.evidence.extend(self.log_lines(violation.task_id))
        return report

    def check_shutdowns(self, report: Report, events: dict[str, list[dict[str, Any]]]) -> None:
        """Each warm shutdown: its runs ended within the grace and `SHUTDOWN_BOUND`,
        the worker exited within `SHUTDOWN_EXIT_BOUND`.

        Sending a task back needs the broker: a shutdown that overlaps a
        Redis restart or hang (SIGSTOP) waits for it, and neither bound holds
        while the broker does not answer (docs/shutdown.md).
        """
        for name, began, took, pids in self.shutdowns:
            outages = [
                (a, b)
                for a, b in (*self.restarts, *self.hangs, *self.cuts)
                if a < began + took and b > began
            ]
            late_runs = []
            for task_id, task_events in events.items():
                runs, _problems = audit_mod.runs_of(task_events, self.kills)
                for run in runs:
                    if run.pid not in pids:
                        continue
                    # Every run that ends records an event after its start (the
                    # end, a checkpoint's raise, or its cleanup hook).
                    end = run.last if run.ended or run.hooks else None
                    if end is not None and end < began:
                        continue
                    killed_before = any(
                        run.pid in k.pids and run.started <= k.ts < began for k in self.kills
                    )
                    if end is None and killed_before:
                        continue
                    if end is None or end - began > SHUTDOWN_GRACE + SHUTDOWN_BOUND:
                        ran = "never ended" if end is None else f"ended {end - began:.2f}s after"
                        late_runs.append(f"{task_id} (run {run.token}) {ran}")
            overran = took > SHUTDOWN_GRACE + SHUTDOWN_EXIT_BOUND
            if (late_runs or overran) and outages:
                self.note(
                    f"{name} exited {took:.2f}s after SIGTERM, during a Redis outage "
                    f"({', '.join(f'{b - a:.1f}s' for a, b in outages)}): bounds not applied"
                )
                continue
            for late in late_runs:
                report.anomalies.append(
                    audit_mod.Violation(
                        "-",
                        "a run outlived a warm shutdown's grace",
                        f"{name}: {late} SIGTERM (grace {SHUTDOWN_GRACE}s + {SHUTDOWN_BOUND}s)",
                    )
                )
            if overran:
                report.anomalies.append(
                    audit_mod.Violation(
                        "-",
                        "a warm shutdown overran its exit bound",
                        f"{name} exited {took:.2f}s after SIGTERM "
                        f"(grace {SHUTDOWN_GRACE}s + {SHUTDOWN_EXIT_BOUND}s)",
                    )
                )

    def mark_unheard_revokes(self) -> None:
        """Plain revokes that no worker received become "unheard" (`audit.mark_unheard`)."""
        from cancellable.celery._runtime import runtime

        assert self.app is not None
        entries, _cursor = runtime().ledgers.get(self.app).read(None)
        recorded = {target_id for e in entries for kind, target_id in e.targets if kind == "task"}
        self.recorded = recorded
        audit_mod.mark_unheard(self.cancels, recorded)

    def lost_by_broker(self, task_ids: list[str]) -> dict[str, str]:
        """Of ``task_ids`` (not final), those whose message the broker lost, with the evidence."""
        candidates = [self.tasks[t] for t in task_ids]
        events = {t: read_events(self.events_dir, t) for t in task_ids}
        logs = ""
        for worker in self.workers:
            with contextlib.suppress(OSError):
                logs += worker.log_path.read_text(errors="replace")
        if not audit_mod.never_received(candidates, events, logs):
            return {}  # the common case: no need to read the AOF
        commands = aof.read_commands(self.redis.directory)
        pops = None if commands is None else aof.unrecorded_pops(commands, self.queue)
        faults = audit_mod.faults_of(self.kills, self.restarts, self.cuts)
        return audit_mod.lost_by_broker(candidates, events, logs, pops, faults)

    def log_lines(self, task_id: str, limit: int = 8) -> list[str]:
        if task_id == "-":
            return []
        found: list[str] = []
        for worker in self.workers:
            with contextlib.suppress(OSError):
                for line in worker.log_path.read_text(errors="replace").splitlines():
                    if task_id in line:
                        found.append(f"{worker.name.split('@')[0]}: {line.strip()[:300]}")
        return found[:limit]

    def write_records(self) -> None:
        data = {
            "code": code_version(),
            "queue": self.queue,
            "mode": dataclasses.asdict(self.mode),
            "timings": self.timings,
            "tasks": {t: dataclasses.asdict(r) for t, r in self.tasks.items()},
            "cancels": [dataclasses.asdict(c) for c in self.cancels],
            "kills": [dict(dataclasses.asdict(k), pids=sorted(k.pids)) for k in self.kills],
            "restarts": self.restarts,
            "hangs": self.hangs,
            "cuts": self.cuts,
            "cut_cancels": self.cut_cancels,
            # The ledger's database is dropped with the run: what it named, for reaudit.
            "ledger_task_ids": sorted(self.recorded) if self.ledger_url else None,
            "stalls": self.stalls(),
            "hung_cancels": self.hung,
            "workers": [
                {
                    "name": w.name,
                    "log": str(w.log_path),
                    "started": w.started_at,
                    "killed": w.killed_at,
                }
                for w in self.workers
            ],
        }
        (self.run_dir / "records.json").write_text(json.dumps(data, indent=1, default=str))
