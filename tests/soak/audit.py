"""The soak's audit: pure functions from what was recorded to a list of violations.

Inputs are plain data (`TaskRecord`, `CancelRecord`, `KillRecord`, the event
lines each task's executions wrote, and the final stored meta read from the
backend without the client cache), so the rules are unit-tested on synthetic
records (``test_audit.py``) as well as run on a real soak.

Timing model.  ``t_begin``/``t_end`` bracket the client call that issued a
cancellation (wall clock, same machine as the workers).  A broadcast needs a
few milliseconds to reach the workers' main processes and the ledger poll,
the safety net, runs every 0.5 s, so a run whose ``started`` event is no
later than ``t_end + grace`` may legitimately have started before the
cancellation reached its worker: it is judged as a *running* task that was
cancelled (it must stop at a checkpoint, run its hook once, end REVOKED).
A run that starts later than that ran *after* the cancellation: a violation.
A call made while the soak's proxy had cut the workers off from Redis (their
broker, result backend and, with the Redis ledger, their ledger), or whose
grace had not run out when the cut began, can reach them only once the proxy
accepts connections again: for it, ``t_end`` is replaced by that time
(`CancelRecord.effective`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import Any

from .aof import Pop

CHECKPOINT_KINDS = frozenset({"short", "long", "slow_cleanup"})
KINDS = ("short", "long", "slow_cleanup", "no_checkpoint")
FINAL = frozenset({"SUCCESS", "REVOKED", "FAILURE"})
#: How long a run of a task may start before an earlier run of it has ended.
#: docs/shutdown.md promises no overlap at all here: after a warm shutdown the
#: message goes back only after the cleanup, and a lost connection to a Redis
#: broker redelivers nothing (the message comes back after its visibility
#: timeout, longer than any soak task).  A run killed with SIGKILL has ended
#: by its last event at the latest.
OVERLAP_BOUND = 0.0
#: A cancel issued this long after a task's ``finished`` event finds SUCCESS stored.
STORED_AFTER = 2.0


@dataclasses.dataclass
class TaskRecord:
    id: str
    kind: str
    args: list[Any]
    sent_at: float
    group: str | None = None


@dataclasses.dataclass
class CancelRecord:
    """One client call that cancelled one or more tasks."""

    seq: int
    method: str  # "cancel", "revoke" (AsyncResult.revoke), "control" (app.control.revoke), "group"
    task_ids: list[str]
    t_begin: float
    t_end: float
    #: What each task's own event file said just before the call.
    phases: dict[str, str]
    #: The reason message and requester given to cancel() (None for plain revokes).
    reason: str | None = None
    requested_by: str | None = None
    #: "issued", "not_issued" (BrokerUnavailableError), "uncertain" (another
    #: error, or it blocked while Redis was down) or "unheard" (a plain revoke
    #: that no worker received: it left no trace in the ledger, which every
    #: worker that receives a plain revoke writes to; Celery's revokes reach
    #: only online workers, so such a revoke promises nothing).
    outcome: str = "issued"
    error: str | None = None
    #: cancel() warned LedgerUnavailableWarning: broadcast, but not durable.
    ledger_warning: bool = False
    #: The tasks cancel()'s receipt said had finished (it left them alone).
    finished: list[str] = dataclasses.field(default_factory=list)
    #: The workers' connections to the soak's Redis (their broker, result
    #: backend and ledger) were cut while the call was made, or before its
    #: grace had run out (its broadcast may still have been on its way): no
    #: worker could hear of it before this time, when the proxy accepted
    #: connections again (None: no cut then, or the workers' ledger was not
    #: cut off).
    cut_until: float | None = None

    @property
    def effective(self) -> float:
        """From when the workers could hear of this call: its return, or the cut's end."""
        return max(self.t_end, self.cut_until or self.t_end)

    @property
    def expected_text(self) -> list[str]:
        if self.method in ("cancel", "group"):
            return [t for t in (self.reason, self.requested_by) if t]
        return ["revoked"]


@dataclasses.dataclass
class KillRecord:
    ts: float
    #: "child", "worker" (kill -9 by the driver), "died" (exited on its own) or
    #: "shutdown" (a warm shutdown; its pids were killed only if it overran).
    what: str
    pids: set[int]
    worker: str


@dataclasses.dataclass
class Run:
    token: str
    pid: int
    started: float
    attempt: int
    redelivered: bool
    finished: float | None = None
    raised: float | None = None
    hooks: int = 0
    hooks_done: int = 0
    killed: bool = False
    #: The source of the cancellation a checkpoint raised (``"shutdown"``: a
    #: warm shutdown stopped the run and sent the task back to the broker).
    source: str | None = None
    #: The time of the run's last event.
    last: float = 0.0

    @property
    def sent_back(self) -> bool:
        """A warm shutdown stopped this run; the task runs again elsewhere."""
        return self.source == "shutdown"

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.raised is not None


@dataclasses.dataclass
class Violation:
    task_id: str
    rule: str
    detail: str
    evidence: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TaskVerdict:
    task_id: str
    kind: str
    category: str  # "uncancelled" or the effective phase of the cancellation
    status: str
    method: str | None
    runs: int
    violations: list[Violation]
    notes: list[str]
    duplicate: str | None = None  # cause of extra runs of an uncancelled task
    raced_delay: float | None = None
    #: Runs a warm shutdown stopped and sent back to the broker.
    sent_back: int = 0


@dataclasses.dataclass
class Report:
    verdicts: list[TaskVerdict]
    cancels: list[CancelRecord]
    kills: list[KillRecord]
    grace: float
    anomalies: list[Violation] = dataclasses.field(default_factory=list)
    #: The evidence that the broker lost a task's message, by task id.
    lost: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Each worker's longest waits (node -> figure -> seconds), and their bounds.
    stalls: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    stall_bounds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def violations(self) -> list[Violation]:
        return self.anomalies + [v for t in self.verdicts for v in t.violations]

    def summary(self, header: str = "") -> str:
        lines = [header] if header else []
        kinds = Counter(v.kind for v in self.verdicts)
        lines.append(
            f"tasks: {len(self.verdicts)} ("
            + ", ".join(f"{k} {kinds[k]}" for k in KINDS if kinds[k])
            + ")"
        )
        by_cat: dict[str, Counter[str]] = {}
        for v in self.verdicts:
            by_cat.setdefault(v.category, Counter())[v.status] += 1
        for cat in ("uncancelled", "before start", "raced start", "running", "killed", "finished",
                    "uncertain", "unheard", LOST_BY_BROKER):  # fmt: skip
            if cat in by_cat:
                states = ", ".join(f"{s} {n}" for s, n in sorted(by_cat[cat].items()))
                lines.append(f"  {cat:>13}: {sum(by_cat[cat].values()):5d}  -> {states}")
        methods = Counter(v.method for v in self.verdicts if v.method)
        lines.append("cancelled by: " + ", ".join(f"{m} {n}" for m, n in sorted(methods.items())))
        outcomes = Counter(c.outcome for c in self.cancels)
        lines.append(
            "cancel calls: "
            + ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items()))
            + f"; ledger warnings {sum(c.ledger_warning for c in self.cancels)}"
        )
        kills = Counter(k.what for k in self.kills)
        lines.append(
            f"kills: child {kills['child']}, worker {kills['worker']}; "
            f"warm shutdowns {kills['shutdown']} "
            f"({sum(v.sent_back for v in self.verdicts)} runs sent back); "
            f"workers that exited on their own: {kills['died']}; grace {self.grace:.2f}s"
        )
        dups = Counter(v.duplicate for v in self.verdicts if v.duplicate)
        if dups:
            lines.append(
                "duplicate runs of uncancelled tasks (at-least-once, not failures): "
                + ", ".join(f"{c} {n}" for c, n in sorted(dups.items()))
            )
        raced = [v.raced_delay for v in self.verdicts if v.raced_delay is not None]
        if raced:
            lines.append(
                f"raced starts (started within grace after the cancel): {len(raced)}, "
                f"max {max(raced):.3f}s after the call returned"
            )
        if self.stalls:
            bounds = ", ".join(f"{k} {v:.1f}s" for k, v in self.stall_bounds.items())
            lines.append(f"longest stalls per worker (bounds: {bounds}):")
            for node, figures in sorted(self.stalls.items()):
                shown = ", ".join(
                    f"{k} {float(figures.get(k, 0.0)):.3f}s"
                    for k in ("consumer_s", "tick_gap_s", "tick_s", "ledger_call_s")
                )
                lines.append(f"  {node.split('@')[0]}: {shown}")
        notes = Counter(n for v in self.verdicts for n in v.notes)
        for note, n in sorted(notes.items()):
            lines.append(f"note: {note} ({n})")
        for v in self.verdicts:
            if v.category == LOST_BY_BROKER:
                lines.append(f"  lost {v.task_id}: {self.lost.get(v.task_id, '?')}")
        violations = self.violations
        lines.append(f"violations: {len(violations)}")
        rules = Counter(v.rule for v in violations)
        for rule, n in rules.most_common():
            lines.append(f"  [{n:4d}] {rule}")
            for v in [v for v in violations if v.rule == rule][:5]:
                lines.append(f"         {v.task_id}: {v.detail}")
                lines.extend(f"             {e}" for e in v.evidence)
        return "\n".join(lines)


def runs_of(events: list[dict[str, Any]], kills: list[KillRecord]) -> tuple[list[Run], list[str]]:
    """The executions recorded in one task's event file, and any malformed events."""
    runs: dict[str, Run] = {}
    problems: list[str] = []
    for e in events:
        token = e.get("run")
        if e["ev"] == "started":
            runs[token] = Run(
                token=token,
                pid=int(e["pid"]),
                started=float(e["ts"]),
                last=float(e["ts"]),
                attempt=int(e.get("attempt", 0)),
                redelivered=bool(e.get("redelivered")),
            )
            continue
        run = runs.get(token)
        if run is None:
            problems.append(f"{e['ev']} of run {token} without a started event")
            continue
        run.last = max(run.last, float(e["ts"]))
        if e["ev"] == "finished":
            run.finished = float(e["ts"])
        elif e["ev"] == "checkpoint_raised":
            run.raised = float(e["ts"])
            run.source = e.get("source")
        elif e["ev"] == "hook_ran":
            run.hooks += 1
        elif e["ev"] == "hook_done":
            run.hooks_done += 1
    for run in runs.values():
        if not run.ended:
            run.killed = any(run.pid in k.pids and k.ts >= run.started for k in kills)
    return sorted(runs.values(), key=lambda r: r.started), problems


def killed_after(run: Run, kills: list[KillRecord]) -> bool:
    """A kill record names the run's process, at or after the run began (ended or not)."""
    return any(run.pid in k.pids and k.ts >= run.started for k in kills)


def describe_runs(runs: list[Run], origin: float | None) -> list[str]:
    def at(ts: float | None) -> str:
        if ts is None:
            return "-"
        return f"{ts - origin:+.3f}s" if origin is not None else f"{ts:.3f}"

    return [
        f"run {r.token} pid {r.pid} attempt {r.attempt} redelivered={r.redelivered} "
        f"started {at(r.started)} finished {at(r.finished)} "
        f"raised {at(r.raised)} hooks {r.hooks}/{r.hooks_done} killed={r.killed}"
        + (" sent back (shutdown)" if r.sent_back else "")
        for r in runs
    ]


def mark_unheard(cancels: list[CancelRecord], recorded: set[str]) -> None:
    """Mark issued plain revokes none of whose ids the ledger holds as "unheard".

    Every worker that receives a plain revoke records it in the ledger, so
    such a revoke reached no worker: it was sent while every worker was down
    or reconnecting (the Redis transport keeps no broadcast for absent
    subscribers).  ``recorded``: the task ids the ledger names.
    """
    for record in cancels:
        plain = record.method in ("revoke", "control")
        if plain and record.outcome == "issued" and not recorded & set(record.task_ids):
            record.outcome = "unheard"


def mark_cut_off(
    cancels: list[CancelRecord], cuts: list[tuple[float, float]], grace: float
) -> None:
    """Set `CancelRecord.cut_until` of the calls a connection cut kept from the workers.

    For a soak whose workers' ledger is its Redis, which each cut
    (``(began, ended)``) cuts off with their broker: a call made during the
    cut, or so shortly before it that its broadcast may still have been on
    its way (its grace had not run out when the cut began), reaches the
    workers only from the ledger, once the cut is over.
    """
    for record in cancels:
        for began, ended in cuts:
            if record.t_begin < ended and record.t_end + grace > began:
                record.cut_until = max(record.cut_until or ended, ended)


#: The category of a task whose message the broker lost (see `audit_task`).
LOST_BY_BROKER = "lost by the broker"


#: How long after a worker took a message off the queue its stopping (or
#: Redis going away) can still lose that message: a worker that stops
#: consuming exits once its running tasks are done (warm shutdown), and the
#: driver notices an exit within a second.
LOST_WINDOW = 30.0


@dataclasses.dataclass(frozen=True)
class Fault:
    """A moment a worker stopped consuming or Redis went away."""

    began: float
    ended: float
    what: str


def faults_of(
    kills: list[KillRecord],
    restarts: list[tuple[float, float]],
    cuts: list[tuple[float, float]] | tuple[()] = (),
) -> list[Fault]:
    """The workers killed with ``kill -9`` or that exited on their own, the Redis
    restarts, and the connection cuts (every worker's connections to Redis dropped
    at once, by the soak's proxy: to a worker, Redis went away)."""
    found = [
        Fault(k.ts, k.ts, f"kill -9 of {k.worker}" if k.what == "worker" else f"{k.worker} exited")
        for k in kills
        if k.what in ("worker", "died")
    ]
    found.extend(Fault(began, ended, "a Redis restart") for began, ended in restarts)
    found.extend(Fault(began, ended, "a connection cut") for began, ended in cuts)
    return found


def never_received(
    candidates: list[TaskRecord], events: dict[str, list[dict[str, Any]]], worker_logs: str
) -> list[TaskRecord]:
    """The tasks without a run whose id no worker's log names.

    Celery logs "Task ...[id] received" for every message it takes, even one
    it then discards, so no worker's Celery ever had such a message.
    """
    return [t for t in candidates if not events.get(t.id) and t.id not in worker_logs]


def lost_by_broker(
    candidates: list[TaskRecord],
    events: dict[str, list[dict[str, Any]]],
    worker_logs: str,
    pops: Mapping[str, Pop] | None,
    faults: list[Fault],
) -> dict[str, str]:
    """Of ``candidates`` (tasks not final), those whose message the broker lost, with the evidence.

    Evidence, all required: the task has no run and no worker's log names
    it (`never_received`); the broker's own record (its AOF, `aof.unrecorded_pops`)
    shows its message taken off the queue and never recorded as
    unacknowledged; and a worker stopped (``kill -9``, or exited on its own)
    or Redis went away within `LOST_WINDOW` seconds after that.  kombu's
    Redis transport pops a message (``BRPOP``) and records it as unacknowledged
    in a second round trip; a consumer that stops in between drops it, and
    neither the visibility timeout nor any part of Celery can bring it back.
    ``pops`` None: the AOF could not be read; nothing is excused.
    """
    if pops is None:
        return {}
    found: dict[str, str] = {}
    for task in never_received(candidates, events, worker_logs):
        pop = pops.get(task.id)
        if pop is None or pop.after is None:
            continue
        latest = pop.before if pop.before is not None else pop.after
        # The faults that began at most LOST_WINDOW after the pop and had not
        # ended before it; the nearest one is named.
        near = [
            (max(0.0, fault.began - latest), fault)
            for fault in faults
            if fault.ended >= pop.after and fault.began <= latest + LOST_WINDOW
        ]
        if near:
            _gap, fault = min(near, key=lambda item: item[0])
            found[task.id] = (
                f"taken off the queue after {pop.after:.3f} and before "
                + (f"{pop.before:.3f}" if pop.before is not None else "the end")
                + f" (delivery tag {pop.delivery_tag}), never recorded as unacknowledged; "
                f"{fault.what} at {fault.began:.3f}"
            )
    return found


def audit_task(
    task: TaskRecord,
    events: list[dict[str, Any]],
    meta: dict[str, Any],
    cancel: CancelRecord | None,
    kills: list[KillRecord],
    grace: float,
    lost_by_broker: bool = False,
) -> TaskVerdict:
    """Judge one task; see the module docstring and docs/reliability.md for the rules.

    ``lost_by_broker``: the driver's evidence that the broker lost this task's
    message (see `lost_by_broker`: no worker ever received it, the broker's
    AOF shows it popped and never recorded as unacknowledged, and a worker
    stopped or Redis went away right after).  Such a task is reported in its
    own category; it says nothing about cancellation, for it reached no
    worker, cancelled or not.
    """
    runs, problems = runs_of(events, kills)
    all_runs = runs
    status = str(meta.get("status"))
    result = meta.get("result")
    violations: list[Violation] = []
    notes: list[str] = []
    if lost_by_broker and not runs and not problems and status == "PENDING":
        notes.append("the broker lost its message: a worker popped it and stopped (never received)")
        return TaskVerdict(
            task.id,
            task.kind,
            LOST_BY_BROKER,
            status,
            cancel.method if cancel is not None else None,
            0,
            violations,
            notes,
        )
    origin = cancel.t_end if cancel is not None else task.sent_at

    def flag(rule: str, detail: str) -> None:
        evidence = [f"state {status}, stored result {result!r}"]
        if cancel is not None:
            evidence.append(
                f"cancel #{cancel.seq} by {cancel.method} ({cancel.outcome}), "
                f"file said {cancel.phases.get(task.id)!r}, call took "
                f"{cancel.t_end - cancel.t_begin:.3f}s; times below are relative to its end"
            )
            if cancel.cut_until is not None:
                evidence.append(
                    f"made during a connection cut: the workers could hear of it from "
                    f"{cancel.cut_until - cancel.t_end:+.3f}s"
                )
        else:
            evidence.append("never cancelled; times below are relative to the send")
        evidence.extend(describe_runs(all_runs, origin))
        violations.append(Violation(task.id, rule, detail, evidence))

    for problem in problems:
        flag("malformed event file", problem)
    for run in runs:
        if not run.ended and not run.killed:
            flag(
                "a run vanished", f"run {run.token} (pid {run.pid}) never ended and was not killed"
            )
    # Runs a warm shutdown stopped (docs/shutdown.md) cleaned up.  Every run
    # of the task began only after each earlier run's last event: after a
    # warm shutdown, after a lost connection (Redis redelivers nothing), after
    # anything (`OVERLAP_BOUND`).
    for i, run in enumerate(runs):
        if run.sent_back and not run.hooks_done:
            flag("a run stopped by a warm shutdown did not clean up", f"run {run.token}")
        if not run.sent_back and run.hooks and not run.hooks_done and not killed_after(run, kills):
            flag(
                "an interrupted run did not finish its cleanup",
                f"run {run.token}: hooks begun {run.hooks}, ended {run.hooks_done}",
            )
        for later in runs[i + 1 :]:
            if later.started < run.last - OVERLAP_BOUND:
                flag(
                    "two runs of a task overlapped after a warm shutdown"
                    if run.sent_back
                    else "two runs of a task overlapped",
                    f"run {later.token} started {run.last - later.started:.3f}s before run "
                    f"{run.token}{' (sent back)' if run.sent_back else ''} ended",
                )
    # The rules below judge the runs that were not sent back.
    sent_back = [r for r in runs if r.sent_back]
    runs = [r for r in runs if not r.sent_back]

    if cancel is None:
        verdict = TaskVerdict(
            task.id, task.kind, "uncancelled", status, None, len(all_runs), violations, notes
        )
        verdict.sent_back = len(sent_back)
        if status != "SUCCESS":
            flag("an uncancelled task did not end SUCCESS", f"ended {status}")
        for run in runs:
            if run.hooks or run.raised is not None:
                flag(
                    "an uncancelled task ran its hook or raised at a checkpoint",
                    f"run {run.token}: hooks {run.hooks}, raised {run.raised is not None}",
                )
        if status == "SUCCESS" and not any(r.finished for r in runs):
            flag("SUCCESS without a finished run", "no run recorded finished")
        if len(runs) > 1:
            after_kill = all(any(p.killed for p in runs[:i]) for i in range(1, len(runs)))
            verdict.duplicate = "after a kill -9" if after_kill else "redelivered without a kill"
        if sent_back:
            verdict.duplicate = "after a warm shutdown (sent back)"
        return verdict

    if cancel.outcome in ("uncertain", "unheard"):
        verdict = TaskVerdict(
            task.id,
            task.kind,
            cancel.outcome,
            status,
            cancel.method,
            len(all_runs),
            violations,
            notes,
        )
        verdict.sent_back = len(sent_back)
        if status not in ("SUCCESS", "REVOKED"):
            flag("a task did not end", f"ended {status}")
        if sum(r.hooks for r in runs) > 1:
            flag("a hook ran more than once", f"{sum(r.hooks for r in runs)} hook runs")
        return verdict

    limit = cancel.effective + grace
    file_phase = cancel.phases.get(task.id, "queued")
    early = [r for r in runs if r.started <= limit]
    late = [r for r in runs if r.started > limit]
    if not early:
        category = "before start"
    elif file_phase == "queued":
        category = "raced start"
    else:
        category = file_phase
    verdict = TaskVerdict(
        task.id, task.kind, category, status, cancel.method, len(all_runs), violations, notes
    )
    verdict.sent_back = len(sent_back)
    if category == "raced start":
        verdict.raced_delay = max(0.0, min(r.started for r in early) - cancel.t_end)

    for run in late:
        if cancel.ledger_warning and run.redelivered:
            notes.append("re-run after a non-durable cancel (ledger was down)")
            continue
        if task.id in cancel.finished and run.redelivered:
            # cancel() leaves a finished task alone (its receipt says so); a
            # copy redelivered later (acks_late, its ack lost with its
            # worker) is Celery's at-least-once, which that cancel did not
            # cover (docs/reliability.md).
            notes.append("re-run (redelivered) of a task cancel() found finished")
            continue
        flag(
            "a cancelled task ran after the cancel",
            f"run {run.token} started {run.started - cancel.t_end:.3f}s after the cancel returned "
            f"(file said {file_phase!r} at cancel time)",
        )
    if status not in FINAL:
        flag("a cancelled task did not end", f"still {status}")
    elif status == "FAILURE":
        flag("a cancelled task ended FAILURE", repr(result))
    hooks = sum(r.hooks for r in runs)
    if hooks > 1:
        flag("a hook ran more than once", f"{hooks} hook runs")

    finished_before = [r for r in early if r.finished is not None and r.finished <= limit]
    stored_success = any(
        r.finished < cancel.t_begin - STORED_AFTER for r in finished_before if r.finished
    )
    stopped = [r for r in runs if r.raised is not None]
    if task.kind in CHECKPOINT_KINDS:
        for run in early:
            if run.finished is not None and run.finished > limit:
                flag(
                    "a cancelled task ran on past its checkpoints",
                    f"run {run.token} finished {run.finished - cancel.t_end:.3f}s after the cancel",
                )
            if run.raised is not None and not run.hooks and not run.killed:
                flag("a stopped task did not run its hook", f"run {run.token} raised, no hook_ran")
            if run.hooks and run.raised is None:
                flag("a hook ran without a checkpoint raising", f"run {run.token}")
        if finished_before:
            # A run finished before the cancellation took effect: SUCCESS
            # stands, even if a later duplicate run (a redelivery) was then
            # stopped (the backend keeps a stored SUCCESS).
            expected = "SUCCESS"
        elif stopped:
            expected = "REVOKED"
        else:
            expected = "REVOKED"  # never started, or its runs were killed and not re-run
        if status in FINAL and status != expected:
            if expected == "SUCCESS" and status == "REVOKED" and not stored_success:
                notes.append("REVOKED although its run finished just before the cancel took effect")
            elif status != "FAILURE":
                flag(
                    f"a cancelled task ended {status}, expected {expected}",
                    f"file said {file_phase!r}; {len(stopped)} run(s) stopped at a checkpoint, "
                    f"{len(finished_before)} finished before the cancel took effect",
                )
    else:  # no_checkpoint: cannot be stopped; SUCCESS or REVOKED are both honest
        if status == "REVOKED" and stored_success:
            flag("a finished task was turned REVOKED", "SUCCESS was stored before the cancel")
        if not early and status == "SUCCESS":
            flag(
                "a cancelled task that never ran ended SUCCESS", "no run started before the cancel"
            )
        if status == "SUCCESS" and early and not finished_before:
            notes.append("no-checkpoint task ran to SUCCESS after being cancelled")

    if status == "REVOKED":
        from celery.exceptions import TaskRevokedError

        if not isinstance(result, TaskRevokedError):
            flag("REVOKED without a TaskRevokedError", repr(result))
        else:
            missing = [t for t in cancel.expected_text if t not in str(result)]
            if missing:
                flag(
                    "the stored error lost the reason",
                    f"stored {str(result)!r}, missing {missing} (file said {file_phase!r})",
                )
    return verdict


def audit(
    tasks: dict[str, TaskRecord],
    cancels: list[CancelRecord],
    kills: list[KillRecord],
    events: dict[str, list[dict[str, Any]]],
    metas: dict[str, dict[str, Any]],
    grace: float,
    lost_by_broker: Mapping[str, str] | None = None,
) -> Report:
    """Judge every task.  A task's cancellation is the first call that was issued for it."""
    lost = dict(lost_by_broker or {})
    first: dict[str, CancelRecord] = {}
    anomalies: list[Violation] = []
    for record in sorted(cancels, key=lambda c: c.t_begin):
        if record.outcome == "not_issued":
            continue
        for task_id in record.task_ids:
            if task_id in first:
                anomalies.append(
                    Violation(task_id, "harness: a task was cancelled twice", f"#{record.seq}")
                )
                continue
            first[task_id] = record
    verdicts = [
        audit_task(
            task,
            events.get(tid, []),
            metas.get(tid, {}),
            first.get(tid),
            kills,
            grace,
            lost_by_broker=tid in lost,
        )
        for tid, task in tasks.items()
    ]
    return Report(verdicts, cancels, kills, grace, anomalies, lost)
