"""The soak's audit rules on synthetic records: correct behaviour passes, each
kind of broken behaviour is flagged.  No processes; fast."""

from __future__ import annotations

from typing import Any, ClassVar

from celery.exceptions import TaskRevokedError

from .aof import Pop
from .audit import (
    CancelRecord,
    KillRecord,
    TaskRecord,
    audit_task,
    faults_of,
    lost_by_broker,
    mark_cut_off,
)

T0 = 1_000_000.0
GRACE = 1.0


def ev(name: str, ts: float, run: str = "r1", pid: int = 100, **fields: Any) -> dict[str, Any]:
    return {"ev": name, "ts": T0 + ts, "run": run, "pid": pid, **fields}


def started(ts: float, run: str = "r1", pid: int = 100, attempt: int = 1) -> dict[str, Any]:
    return ev("started", ts, run, pid, attempt=attempt, redelivered=attempt > 1)


def cancel_at(ts: float, phase: str, method: str = "cancel") -> CancelRecord:
    reason = "soak 1/1: stop" if method in ("cancel", "group") else None
    by = "soak-user-1" if reason else None
    return CancelRecord(1, method, ["t"], T0 + ts, T0 + ts + 0.01, {"t": phase}, reason, by)


def revoked(text: str = "revoked by soak-user-1: soak 1/1: stop") -> dict[str, Any]:
    return {"status": "REVOKED", "result": TaskRevokedError(text)}


SUCCESS = {"status": "SUCCESS", "result": "ok"}


def rules(verdict: Any) -> list[str]:
    return [v.rule for v in verdict.violations]


def judge(kind: str, events: list[dict[str, Any]], meta: dict[str, Any], cancel=None, kills=()):
    task = TaskRecord("t", kind, [], T0)
    return audit_task(task, events, meta, cancel, list(kills), GRACE)


class TestUncancelled:
    def test_success_passes(self) -> None:
        """A task nobody cancelled that ran once to SUCCESS is fine."""
        verdict = judge("long", [started(1), ev("finished", 4)], SUCCESS)

        assert [] == rules(verdict)

    def test_revoked_or_hook_is_flagged(self) -> None:
        """Nobody cancelled it, yet it ended REVOKED and ran its hook."""
        events = [started(1), ev("checkpoint_raised", 2), ev("hook_ran", 2.1), ev("hook_done", 2.2)]
        verdict = judge("long", events, revoked("revoked"))

        assert {
            "an uncancelled task did not end SUCCESS",
            "an uncancelled task ran its hook or raised at a checkpoint",
        } == set(rules(verdict))

    def test_duplicate_after_kill_is_counted_not_failed(self) -> None:
        """At-least-once: a run killed with SIGKILL, then a redelivered run."""
        events = [started(1, "r1", 100), started(3, "r2", 200, 2), ev("finished", 5, "r2", 200)]
        kill = KillRecord(T0 + 2, "child", {100}, "w1")
        verdict = judge("long", events, SUCCESS, kills=[kill])

        assert [] == rules(verdict)
        assert "after a kill -9" == verdict.duplicate

    def test_run_that_vanished_is_flagged(self) -> None:
        """A run that never ended although nobody killed its process."""
        events = [started(1, "r1", 100), started(3, "r2", 200, 2), ev("finished", 5, "r2", 200)]
        verdict = judge("long", events, SUCCESS)

        assert ["a run vanished"] == rules(verdict)


class TestCancelledBeforeStart:
    def test_never_started_revoked_with_reason_passes(self) -> None:
        verdict = judge("short", [], revoked(), cancel_at(1, "queued"))

        assert [] == rules(verdict)
        assert "before start" == verdict.category

    def test_started_after_the_cancel_is_flagged(self) -> None:
        """The body ran 5 s after a cancel issued while it was queued."""
        events = [started(6), ev("finished", 6.3)]
        verdict = judge("short", events, SUCCESS, cancel_at(1, "queued"))

        assert "a cancelled task ran after the cancel" in rules(verdict)

    def test_reason_lost_is_flagged(self) -> None:
        verdict = judge("short", [], revoked("revoked"), cancel_at(1, "queued"))

        assert ["the stored error lost the reason"] == rules(verdict)

    def test_plain_revoke_needs_only_revoked(self) -> None:
        verdict = judge("short", [], revoked("revoked"), cancel_at(1, "queued", "control"))

        assert [] == rules(verdict)

    def test_raced_start_judged_as_running(self) -> None:
        """Started 0.2 s after the call: the broadcast may not have arrived yet."""
        events = [
            started(1.2),
            ev("checkpoint_raised", 1.25),
            ev("hook_ran", 1.26),
            ev("hook_done", 1.27),
        ]
        verdict = judge("long", events, revoked(), cancel_at(1, "queued"))

        assert [] == rules(verdict)
        assert "raced start" == verdict.category

    def test_stuck_pending_is_flagged(self) -> None:
        verdict = judge("short", [], {"status": "PENDING", "result": None}, cancel_at(1, "queued"))

        assert ["a cancelled task did not end"] == rules(verdict)


class TestCancelledRunning:
    def test_stopped_once_passes(self) -> None:
        events = [
            started(0),
            ev("checkpoint_raised", 1.05),
            ev("hook_ran", 1.06),
            ev("hook_done", 1.8),
        ]
        verdict = judge("slow_cleanup", events, revoked(), cancel_at(1, "running"))

        assert [] == rules(verdict)

    def test_ran_on_is_flagged(self) -> None:
        """A checkpointing task that finished 3 s after the cancel did not stop."""
        verdict = judge("long", [started(0), ev("finished", 4)], SUCCESS, cancel_at(1, "running"))

        assert "a cancelled task ran on past its checkpoints" in rules(verdict)

    def test_finished_just_before_the_cancel_took_effect_passes(self) -> None:
        """Its last checkpoint passed before the broadcast arrived."""
        verdict = judge(
            "short", [started(0.8), ev("finished", 1.05)], SUCCESS, cancel_at(1, "running")
        )

        assert [] == rules(verdict)

    def test_stopped_duplicate_of_a_finished_task_keeps_success(self) -> None:
        """Run 1 succeeded, a redelivery (lost ack) ran again and was cancelled."""
        events = [
            started(-20), ev("finished", -18),
            started(0.5, "r2", 200, 2), ev("checkpoint_raised", 1.05, "r2", 200),
            ev("hook_ran", 1.06, "r2", 200), ev("hook_done", 1.07, "r2", 200),
        ]  # fmt: skip
        verdict = judge("long", events, SUCCESS, cancel_at(1, "running"))

        assert [] == rules(verdict)

    def test_hook_twice_is_flagged(self) -> None:
        events = [
            started(0), ev("checkpoint_raised", 1.05), ev("hook_ran", 1.06),
            ev("hook_ran", 1.07), ev("hook_done", 1.1),
        ]  # fmt: skip
        verdict = judge("long", events, revoked(), cancel_at(1, "running"))

        assert ["a hook ran more than once"] == rules(verdict)

    def test_killed_then_discarded_passes(self) -> None:
        """kill -9 after the cancel, before a checkpoint; the redelivery is discarded."""
        kill = KillRecord(T0 + 1.02, "child", {100}, "w1")
        verdict = judge("long", [started(0)], revoked(), cancel_at(1, "running"), [kill])

        assert [] == rules(verdict)

    def test_killed_then_rerun_is_flagged(self) -> None:
        kill = KillRecord(T0 + 1.02, "worker", {100}, "w1")
        events = [started(0), started(25, "r2", 200, 2), ev("finished", 30, "r2", 200)]
        verdict = judge("long", events, SUCCESS, cancel_at(1, "running"), [kill])

        assert "a cancelled task ran after the cancel" in rules(verdict)

    def test_no_checkpoint_may_succeed(self) -> None:
        verdict = judge(
            "no_checkpoint", [started(0), ev("finished", 2)], SUCCESS, cancel_at(1, "running")
        )

        assert [] == rules(verdict)


class TestCancelledFinished:
    def test_left_alone_passes(self) -> None:
        verdict = judge(
            "short", [started(0), ev("finished", 0.3)], SUCCESS, cancel_at(5, "finished")
        )

        assert [] == rules(verdict)

    def test_turned_revoked_is_flagged(self) -> None:
        events = [started(0), ev("finished", 0.3)]
        verdict = judge("short", events, revoked(), cancel_at(5, "finished"))

        assert ["a cancelled task ended REVOKED, expected SUCCESS"] == rules(verdict)


class TestLostByBroker:
    def test_a_message_the_broker_lost_is_its_own_category(self) -> None:
        """A cancelled task the broker lost (the driver's evidence) is reported, not
        failed; without that evidence the same record is a violation."""
        task = TaskRecord("t", "short", [], T0)
        meta = {"status": "PENDING", "result": None}
        cancel = cancel_at(2, "queued")

        lost = audit_task(task, [], meta, cancel, [], GRACE, lost_by_broker=True)
        plain = audit_task(task, [], meta, cancel, [], GRACE)

        assert ("lost by the broker", []) == (lost.category, lost.violations)
        assert ["a cancelled task did not end"] == rules(plain)

    def test_it_needs_a_task_that_never_ran(self) -> None:
        """A task with a run is judged as usual even if the driver called it lost."""
        task = TaskRecord("t", "short", [], T0)
        events = [started(1)]

        verdict = audit_task(
            task, events, {"status": "PENDING"}, None, [], GRACE, lost_by_broker=True
        )

        assert "uncancelled" == verdict.category
        assert "an uncancelled task did not end SUCCESS" in rules(verdict)


class TestLostByBrokerEvidence:
    """`lost_by_broker`: which PENDING tasks the driver may call lost, from the
    broker's AOF (a pop never recorded as unacknowledged) and the faults."""

    TASK: ClassVar[TaskRecord] = TaskRecord("t", "short", [], T0)
    POP: ClassVar[dict[str, Pop]] = {"t": Pop("t", "tag-1", T0 + 10.0, T0 + 10.2)}

    def lost(
        self, pops: Any, kills: list[KillRecord], restarts=(), logs: str = "", events=None, cuts=()
    ):
        faults = faults_of(kills, list(restarts), list(cuts))
        return lost_by_broker([self.TASK], events or {}, logs, pops, faults)

    def test_a_pop_then_a_worker_kill_is_lost(self) -> None:
        """Popped at +10 s, never recorded; a worker killed at +10.1 s: lost, with the evidence."""
        found = self.lost(self.POP, [KillRecord(T0 + 10.1, "worker", {1}, "w3")])

        assert ["t"] == list(found)
        assert "tag-1" in found["t"]
        assert "kill -9 of w3" in found["t"]

    def test_a_worker_that_exited_or_a_restart_counts_too(self) -> None:
        """A worker noticed dead 20 s after the pop, or a Redis restart around it."""
        died = self.lost(self.POP, [KillRecord(T0 + 30, "died", {1}, "w1")])
        restart = self.lost(self.POP, [], restarts=[(T0 + 9.0, T0 + 12.0)])

        assert "w1 exited" in died["t"]
        assert "Redis restart" in restart["t"]

    def test_a_connection_cut_counts_too(self) -> None:
        """The proxy cut every worker connection 0.1 s after the pop: to the
        worker that popped it, Redis went away before it recorded the message."""
        found = self.lost(self.POP, [], cuts=[(T0 + 10.1, T0 + 12.0)])
        before = self.lost(self.POP, [], cuts=[(T0 + 2.0, T0 + 4.0)])

        assert "a connection cut" in found["t"]
        assert {} == before

    def test_the_nearest_fault_is_named(self) -> None:
        """A Redis restart around the pop and a worker killed 3 s later: the restart."""
        kills = [KillRecord(T0 + 13.0, "worker", {1}, "w2")]

        found = self.lost(self.POP, kills, restarts=[(T0 + 10.1, T0 + 16.0)])

        assert "a Redis restart" in found["t"]

    def test_no_fault_near_the_pop_is_not_excused(self) -> None:
        """A child kill, a worker killed before the pop or long after it: not lost."""
        kills = [
            KillRecord(T0 + 10.1, "child", {2}, "w1"),
            KillRecord(T0 + 5.0, "worker", {1}, "w2"),
            KillRecord(T0 + 60.0, "worker", {3}, "w3"),
        ]

        assert {} == self.lost(self.POP, kills)

    def test_it_needs_the_aof_and_a_message_nobody_received(self) -> None:
        """No AOF evidence, a worker log naming the task, or a run: not lost."""
        kill = [KillRecord(T0 + 10.1, "worker", {1}, "w3")]

        assert {} == self.lost(None, kill)
        assert {} == self.lost({}, kill)
        assert {} == self.lost(self.POP, kill, logs="Task soak.short[t] received")
        assert {} == self.lost(self.POP, kill, events={"t": [started(10)]})


class TestUnheardRevoke:
    def test_an_unheard_plain_revoke_promises_only_an_ending(self) -> None:
        """A plain revoke no worker received: the task may run to SUCCESS, but must end."""
        cancel = cancel_at(2, "queued", method="control")
        cancel.outcome = "unheard"
        ran = judge("short", [started(4), ev("finished", 5)], SUCCESS, cancel)
        stuck = judge("short", [], {"status": "PENDING"}, cancel)

        assert ("unheard", []) == (ran.category, rules(ran))
        assert ["a task did not end"] == rules(stuck)


class TestWarmShutdown:
    """Runs a warm shutdown stopped (``checkpoint_raised`` with source ``shutdown``)."""

    @staticmethod
    def sent_back(at: float, run: str = "r1", pid: int = 100, cleanup: bool = True) -> list[Any]:
        raised = ev("checkpoint_raised", at + 1, run, pid, source="shutdown")
        events = [started(at, run, pid), raised]
        if cleanup:
            events += [ev("hook_ran", at + 1.1, run, pid), ev("hook_done", at + 1.2, run, pid)]
        return events

    def test_sent_back_then_run_again_passes(self) -> None:
        """Stopped by a shutdown with its cleanup, then run again to SUCCESS afterwards."""
        events = [*self.sent_back(1), started(2.5, "r2", 200, 2), ev("finished", 4, "r2", 200)]
        verdict = judge("long", events, SUCCESS)

        assert [] == rules(verdict)
        assert "after a warm shutdown (sent back)" == verdict.duplicate

    def test_overlapping_runs_are_flagged(self) -> None:
        """The next run started before the stopped run's cleanup was over."""
        events = [*self.sent_back(1), started(2.15, "r2", 200, 2), ev("finished", 4, "r2", 200)]
        verdict = judge("long", events, SUCCESS)

        assert ["two runs of a task overlapped after a warm shutdown"] == rules(verdict)

    def test_no_cleanup_is_flagged(self) -> None:
        events = self.sent_back(1, cleanup=False)
        events += [started(2.5, "r2", 200, 2), ev("finished", 4, "r2", 200)]
        verdict = judge("long", events, SUCCESS)

        assert ["a run stopped by a warm shutdown did not clean up"] == rules(verdict)

    def test_never_run_again_is_flagged(self) -> None:
        """Sent back, but the task never ran again: lost (it stays PENDING)."""
        verdict = judge("long", self.sent_back(1), {"status": "PENDING", "result": None})

        assert ["an uncancelled task did not end SUCCESS"] == rules(verdict)

    def test_a_cancelled_task_sent_back_is_judged_by_its_other_runs(self) -> None:
        """Sent back by a shutdown, then cancelled while queued: REVOKED, one hook run
        per run is fine."""
        verdict = judge("long", self.sent_back(1), revoked(), cancel_at(3, "queued"))

        assert [] == rules(verdict)


class TestShutdownBounds:
    """`Soak.check_shutdowns`: the library's part (runs end within the grace and
    `SHUTDOWN_BOUND`) apart from Celery's teardown (exit within `SHUTDOWN_EXIT_BOUND`)."""

    @staticmethod
    def check(
        tmp_path: Any, events: dict[str, list[dict[str, Any]]], took: float, **soak: Any
    ) -> list[str]:
        from .driver import Soak
        from .plan import make_plan, mode_from_env

        run = Soak(make_plan(mode_from_env()), tmp_path)
        run.kills = soak.get("kills", [])
        run.hangs = soak.get("hangs", [])
        run.shutdowns = [("w1", T0 + 10, took, frozenset({100, 101}))]
        report = audit_mod_report()
        run.check_shutdowns(report, events)
        return [v.rule for v in report.anomalies]

    def test_a_slow_exit_after_the_runs_ended_passes(self, tmp_path: Any) -> None:
        """Runs stopped 1.2 s after SIGTERM, the process exited 10.03 s after it: no violation."""
        events = {"t": TestWarmShutdown.sent_back(9.9, pid=101)}

        assert [] == self.check(tmp_path, events, took=10.03)

    def test_a_run_that_outlived_the_grace_is_flagged(self, tmp_path: Any) -> None:
        """A run on the worker whose cleanup ended 9 s after SIGTERM is a violation."""
        events = {
            "t": [started(8, pid=101), ev("hook_ran", 18.5, pid=101), ev("hook_done", 19, pid=101)],
            "u": TestWarmShutdown.sent_back(9.9, run="r2", pid=100),
        }

        assert ["a run outlived a warm shutdown's grace"] == self.check(tmp_path, events, 9.5)

    def test_an_exit_past_its_bound_and_a_run_that_never_ended_are_flagged(
        self, tmp_path: Any
    ) -> None:
        """No end event and a process killed at its exit bound: both rules fire; runs of
        other pids, and runs that ended before SIGTERM, are not counted."""
        events = {
            "t": [started(8, pid=101)],
            "u": [started(1, run="r2", pid=100), ev("finished", 2, run="r2", pid=100)],
            "v": [started(9, run="r3", pid=555)],
        }

        assert [
            "a run outlived a warm shutdown's grace",
            "a warm shutdown overran its exit bound",
        ] == self.check(tmp_path, events, took=40.0)

    def test_a_run_killed_before_the_shutdown_is_not_counted(self, tmp_path: Any) -> None:
        """A child killed (-9) before SIGTERM left a run without an end: not the shutdown's."""
        events = {"t": [started(8, pid=101)]}
        kills = [KillRecord(T0 + 9, "child", {101}, "w1")]

        assert [] == self.check(tmp_path, events, took=3.0, kills=kills)

    def test_a_shutdown_during_a_redis_outage_is_noted_not_flagged(self, tmp_path: Any) -> None:
        """A Redis hang overlapping the shutdown: the bounds are not applied."""
        events = {"t": [started(8, pid=101)]}

        assert [] == self.check(tmp_path, events, took=40.0, hangs=[(T0 + 12, T0 + 30)])


def audit_mod_report() -> Any:
    """An empty audit report (what `Soak.audit` adds its anomalies to)."""
    from .audit import audit

    return audit({}, [], [], {}, {}, GRACE)


class TestOverlap:
    """No two runs of one task at once, whatever ended the first (`OVERLAP_BOUND`)."""

    def test_a_second_run_while_the_first_still_ran_is_flagged(self) -> None:
        """Nobody cancelled or killed it, yet a second run started while the first
        still checkpointed (a redelivery while it ran, e.g. after a lost connection)."""
        events = [
            started(1, "r1", 100), started(2, "r2", 200, 2),
            ev("finished", 3, "r2", 200), ev("finished", 4, "r1", 100),
        ]  # fmt: skip
        verdict = judge("long", events, SUCCESS)

        assert ["two runs of a task overlapped"] == rules(verdict)

    def test_a_killed_run_counts_until_its_last_event(self) -> None:
        """The first run was killed, but it still wrote an event after the
        redelivered run had started: they overlapped."""
        events = [
            started(1, "r1", 100), started(2, "r2", 200, 2),
            ev("hook_ran", 2.5, "r1", 100), ev("finished", 4, "r2", 200),
        ]  # fmt: skip
        kill = KillRecord(T0 + 3, "child", {100}, "w1")
        verdict = judge("long", events, SUCCESS, kills=[kill])

        assert "two runs of a task overlapped" in rules(verdict)

    def test_runs_one_after_the_other_pass(self) -> None:
        """A run that finished (its ack lost), then a redelivered run: at-least-once."""
        events = [
            started(1, "r1", 100), ev("finished", 2, "r1", 100),
            started(25, "r2", 200, 2), ev("finished", 26, "r2", 200),
        ]  # fmt: skip
        verdict = judge("long", events, SUCCESS)

        assert [] == rules(verdict)
        assert "redelivered without a kill" == verdict.duplicate


class TestInterruptedCleanup:
    """Every interrupted run finished its cleanup, unless its process was killed."""

    EVENTS: ClassVar[list[dict[str, Any]]] = [
        started(0), ev("checkpoint_raised", 1.05), ev("hook_ran", 1.06),
    ]  # fmt: skip

    def test_a_hook_that_never_ended_is_flagged(self) -> None:
        """Stopped at a checkpoint, its hook began and never ended, and nothing killed it."""
        verdict = judge("slow_cleanup", self.EVENTS, revoked(), cancel_at(1, "running"))

        assert ["an interrupted run did not finish its cleanup"] == rules(verdict)

    def test_a_killed_process_is_excused(self) -> None:
        """kill -9 of the child in the middle of the hook: the cleanup could not end."""
        kill = KillRecord(T0 + 1.3, "child", {100}, "w1")
        verdict = judge("slow_cleanup", self.EVENTS, revoked(), cancel_at(1, "running"), [kill])

        assert [] == rules(verdict)


class TestCancelDuringACut:
    """A cancel() made while the proxy had cut the workers off from Redis (their
    broker and, with the Redis ledger, their ledger) counts from the cut's end."""

    @staticmethod
    def during_cut(until: float | None) -> CancelRecord:
        cancel = cancel_at(1, "running")
        cancel.cut_until = None if until is None else T0 + until
        return cancel

    def test_stopped_after_the_cut_passes(self) -> None:
        """Cut from before +1 s to +3 s; the task stopped at +3.4 s, within the grace after it."""
        events = [started(0), ev("checkpoint_raised", 3.4), ev("hook_ran", 3.41),
                  ev("hook_done", 3.42)]  # fmt: skip
        verdict = judge("long", events, revoked(), self.during_cut(3.0))

        assert [] == rules(verdict)

    def test_the_same_run_without_a_cut_is_flagged(self) -> None:
        """Without the cut, a run that finished 2.4 s after the call ran on."""
        events = [started(0), ev("finished", 3.4)]
        verdict = judge("long", events, SUCCESS, self.during_cut(None))

        assert "a cancelled task ran on past its checkpoints" in rules(verdict)

    def test_running_on_past_the_cut_and_the_grace_is_flagged(self) -> None:
        """The cut ended at +3 s; the task still finished at +4.5 s."""
        events = [started(0), ev("finished", 4.5)]
        verdict = judge("long", events, SUCCESS, self.during_cut(3.0))

        assert "a cancelled task ran on past its checkpoints" in rules(verdict)

    def test_a_start_after_the_cut_and_the_grace_is_flagged(self) -> None:
        """Cancelled while queued during the cut; it started 2 s after the cut ended."""
        cancel = self.during_cut(3.0)
        cancel.phases = {"t": "queued"}
        verdict = judge("short", [started(5), ev("finished", 5.2)], SUCCESS, cancel)

        assert "a cancelled task ran after the cancel" in rules(verdict)

    def test_mark_cut_off_names_the_calls_the_cut_kept_from_the_workers(self) -> None:
        """A cut from +5 s to +8 s (grace 1 s): the calls made during it and the one
        that returned 0.5 s before it count from +8 s; one 2 s before it, or after
        it, does not."""
        calls = {at: cancel_at(at, "running") for at in (3.0, 4.5, 6.0, 8.5)}
        mark_cut_off(list(calls.values()), [(T0 + 5.0, T0 + 8.0)], GRACE)

        assert {3.0: None, 4.5: T0 + 8.0, 6.0: T0 + 8.0, 8.5: None} == {
            at: c.cut_until for at, c in calls.items()
        }
        assert T0 + 8.0 == calls[4.5].effective
