"""The cancellation ladder on real workers: grace, then interrupt, then terminate.

Issue 12's "Done when" points 1-3: prefork (interrupt a blocking sleep,
terminate a task stuck in a C call that holds the GIL, ``cancellable.sleep``),
the torture test (hundreds of short tasks whose cancellations race their own
end and the start of the next task), and the threads and solo pools.
"""

from __future__ import annotations

import heapq
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from cancellable.celery import cancel

from .conftest import (
    REPO_ROOT,
    Keys,
    Worker,
    assert_revoked,
    ledger_keys,
    pid_alive,
    task_meta,
    wait_for,
)
from .test_crash import redis_unacked_ids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: What "the normal latency" may add to a step, on this shared 2-CPU machine:
#: the broadcast, the poller's 0.1 s tick, the REVOKED write, our 50 ms polls.
LATENCY = 0.6


def start(worker: Worker, keys: Keys, task: str, name: str, *args: object):
    """Send ``task`` and wait until its body runs (its ``looping`` flag)."""
    result = worker.send(task, keys.key(name), *args)
    wait_for(
        lambda: keys.flag(name, "looping"),
        20,
        message=lambda: f"{task} to start ({task_meta(result)['status']})",
    )
    return result


def timed_revoked(result, *texts: str, timeout: float = 30.0) -> float:
    """Seconds from now until the task is REVOKED (asserting the message texts)."""
    began = time.monotonic()
    assert_revoked(result, *texts, timeout=timeout)
    return time.monotonic() - began


class TestPrefork:
    """Done-when 1, on a real prefork worker over Redis (2 children, kill_after 1 s)."""

    def test_blocking_sleep_is_interrupted_after_the_grace(self, shared_worker, keys: Keys):
        """``time.sleep(3600)``, grace=1: REVOKED within 1 s + latency, hook ran, nobody killed.

        The other child's task runs on untouched and succeeds.  The child the
        interrupt landed in is retired once it has reported the task (a lock
        may be held there for ever) and replaced; the other child stays.
        """
        worker = shared_worker(pool="prefork")
        children = worker.children()
        other = worker.send("cit.plain.sleep", keys.key("other"), 2.5)
        wait_for(lambda: keys.started("other"), 20, message="the other task to start")
        result = start(worker, keys, "cit.ladder.sleep", "s")

        cancel(result, "user pressed stop", grace=1, app=worker.app)
        elapsed = timed_revoked(result, "user pressed stop", "interrupted after 1.")

        assert 1.0 <= elapsed <= 1.0 + LATENCY, elapsed
        assert "Cancelled" == keys.flag("s", "exc")
        assert ["cleanup"] == keys.hooks("s")
        assert keys.flag("s", "done") is None
        assert "slept" == other.get(timeout=20)
        interrupted, other_child = keys.started("s")[0], keys.started("other")[0]
        assert interrupted != other_child
        wait_for(lambda: not pid_alive(interrupted), 10, message="the interrupted child to retire")
        wait_for(
            lambda: len(worker.children()) == worker.concurrency,
            20,
            message="the pool to be back to full strength",
        )
        assert interrupted in children
        assert other_child in worker.children()
        assert "cancel.child_retired" in worker.log_path.read_text(errors="replace")

    def test_gil_holding_call_is_terminated_after_grace_and_kill_after(
        self, shared_worker, keys: Keys
    ):
        """``sum(range(10**12))``, grace=1, kill_after=1: REVOKED "terminated" after ~2 s.

        The child is replaced (the pool is back to two children, without the
        killed one), the task is acknowledged although it is ``acks_late``
        with ``reject_on_worker_lost`` (it never runs again), the
        cancellation is in the ledger (a redelivery would be discarded), and
        the next task runs normally.
        """
        worker = shared_worker(pool="prefork")
        result = start(worker, keys, "cit.ladder.gil", "g")
        victim = keys.started("g")[0]

        cancel(result, "runaway", grace=1, app=worker.app)
        elapsed = timed_revoked(result, "runaway", "terminated after 2.")

        assert 2.0 <= elapsed <= 2.0 + LATENCY + 1.0, elapsed
        wait_for(lambda: not pid_alive(victim), 10, message="the stuck child to be gone")
        wait_for(
            lambda: len(worker.children()) == worker.concurrency,
            20,
            message="the pool to be back to full strength",
        )
        assert victim not in worker.children()
        pids = {worker.send("cit.plain.pid", keys.key("next")).get(timeout=20) for _ in range(4)}
        assert pids <= worker.children()
        assert "REVOKED" == task_meta(result)["status"]
        assert 1 == keys.runs("g")
        assert ledger_keys(result.id)
        time.sleep(1.0)
        assert 0 == worker.queue_length()
        assert result.id not in redis_unacked_ids()
        assert 1 == keys.runs("g")

    def test_cli_grace(self, shared_worker, keys: Keys):
        """``celery cancel ID --grace 1``: the blocked task is interrupted, the command says so."""
        worker = shared_worker(pool="prefork")
        result = start(worker, keys, "cit.ladder.sleep", "s")

        cli = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.integration.app", "cancel", result.id,
             "--reason", "cli grace", "--grace", "1", "--wait", "10"],
            cwd=REPO_ROOT,
            env=worker.env,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip

        assert 0 == cli.returncode, cli.stdout + cli.stderr
        line = next((ln for ln in cli.stdout.splitlines() if result.id in ln), "")
        assert ": interrupted after 1." in line, cli.stdout + cli.stderr
        assert line.endswith("(REVOKED: revoked: cli grace)"), cli.stdout + cli.stderr
        assert_revoked(result, "cli grace", "interrupted after 1.")
        assert ["cleanup"] == keys.hooks("s")

    def test_cancellable_sleep_stops_within_the_normal_latency(self, shared_worker, keys: Keys):
        """``cancellable.sleep(3600)``, no grace: REVOKED at once, by the cooperative path."""
        worker = shared_worker(pool="prefork")
        children = worker.children()
        result = start(worker, keys, "cit.ladder.csleep", "c")

        cancel(result, "stop sleeping", app=worker.app)
        elapsed = timed_revoked(result, "stop sleeping")

        assert elapsed <= LATENCY, elapsed
        message = str(task_meta(result)["result"])
        assert "interrupted" not in message
        assert "terminated" not in message
        assert "Cancelled" == keys.flag("c", "exc")
        assert ["cleanup"] == keys.hooks("c")
        assert children == worker.children()


class TestProcessGroup:
    """The opt-in on the last step: kill what the task started, too."""

    def test_kill_process_group_also_ends_the_tasks_subprocess(self, make_worker, keys: Keys):
        """``cancellable_kill_process_group``: the task's ``sleep 3600`` dies with its child.

        Without the setting (the other prefork tests), subprocesses are
        orphaned, as with Celery's terminate.
        """
        worker = make_worker(pool="prefork", concurrency=2, extra_env={"CIT_KILL_GROUP": "1"})
        result = start(worker, keys, "cit.ladder.gil_with_child", "g")
        sub = int(keys.flag("g", "subprocess") or 0)
        assert pid_alive(sub)

        cancel(result, "with its children", grace=0, app=worker.app)
        timed_revoked(result, "with its children", "terminated after")

        wait_for(lambda: not pid_alive(sub), 10, message="the task's subprocess to be killed")
        wait_for(
            lambda: len(worker.children()) == worker.concurrency,
            20,
            message="the pool to be back to full strength",
        )
        assert 3 == worker.send("cit.plain.add", 1, 2).get(timeout=20)


def not_escalated_lines(worker: Worker, task_id: str) -> list[str]:
    """The worker log's ``cancel.not_escalated`` lines for ``task_id``."""
    log = worker.log_path.read_text(errors="replace")
    return [ln for ln in log.splitlines() if "cancel.not_escalated" in ln and task_id in ln]


class TestInProcessPools:
    """The threads and solo pools are never interrupted at an arbitrary bytecode (issue 18).

    An exception raised there could leave a lock held that a later task,
    or the worker's own consumer and poller, would wait on for ever; there
    is no process to retire.  The ladder says so once per task
    (``cancel.not_escalated``) and the task runs on to its next checkpoint,
    or to its end.
    """

    def test_threads_pool_lets_a_python_loop_run_on_and_says_so(self, shared_worker, keys: Keys):
        """A loop without checkpoints in a pool thread, grace=0: not interrupted, one warning.

        It runs to its end (SUCCESS: it has no checkpoint), no exception was
        raised in it, and the task in the other pool thread succeeds.
        """
        worker = shared_worker(pool="threads")
        other = worker.send("cit.plain.sleep", keys.key("other"), 2.0)
        result = start(worker, keys, "cit.ladder.busy", "b", 1.5)

        cancel(result, "enough", grace=0, app=worker.app)

        assert isinstance(result.get(timeout=20), int)
        assert keys.flag("b", "exc") is None
        lines = wait_for(lambda: not_escalated_lines(worker, result.id), 10)
        assert 1 == len(lines)
        assert "interrupts a task only at its checkpoints" in lines[0]
        assert "slept" == other.get(timeout=20)
        assert worker.alive()

    def test_solo_pool_lets_a_blocking_sleep_run_on_and_says_so(self, shared_worker, keys: Keys):
        """Solo: ``time.sleep(3)`` on the worker's main thread, task grace 1 s: not interrupted.

        A busy solo worker hears of the cancellation through its ledger poll
        (0.5 s here); the task's own ``@cancellable(grace=1.0)`` puts it on
        the ladder, which says it can do no more.  The sleep ends normally
        and the worker then runs the next task.  (With a 1.5-s sleep, a poll
        that came 0.46 s after the start left the grace ending as the sleep
        did, and the ladder never had to say anything.)
        """
        worker = shared_worker(pool="solo")
        result = start(worker, keys, "cit.ladder.sleep_graced", "s", 3.0)

        cancel(result, "solo stop", app=worker.app)

        assert "slept" == result.get(timeout=20)
        assert keys.flag("s", "exc") is None
        lines = wait_for(lambda: not_escalated_lines(worker, result.id), 10)
        assert 1 == len(lines)
        assert "the solo pool interrupts a task only at its checkpoints" in lines[0]
        assert worker.alive()
        assert 3 == worker.send("cit.plain.add", 1, 2).get(timeout=20)

    def test_solo_pool_gets_the_grace_of_the_call_through_the_ledger(
        self, shared_worker, keys: Keys
    ):
        """Solo, a task without a grace of its own: ``cancel(grace=1)`` still reaches the ladder.

        The busy solo worker learns of the cancellation from its ledger
        poll, and the ledger entry carries the grace: the ladder's warning
        for the task is the proof (without a grace it never looks at it).
        """
        worker = shared_worker(pool="solo")
        result = start(worker, keys, "cit.ladder.sleep", "s", 2.5)

        cancel(result, "solo call grace", grace=1, app=worker.app)

        assert "slept" == result.get(timeout=20)
        assert 1 == len(not_escalated_lines(worker, result.id))


class TestTorture:
    """Done-when 2: cancellations that race the end of their task and the start of the next."""

    TASKS = 300
    STUBBORN = 30

    def test_no_task_that_was_not_cancelled_is_ever_interrupted_killed_or_revoked(
        self, make_worker, keys: Keys
    ):
        """300 tasks of 10-50 ms on 2 children; half cancelled with grace=0, kill_after=0.2 s.

        Each chosen task is cancelled at the moment it should end (its start
        plus its duration, give or take 15 ms), so the interrupt and the
        terminate steps land around its end and the start of the next task
        in the same child.  Thirty cancelled tasks are stubborn: they swallow
        the interrupt and block 0.15-0.5 s more, so their natural end races
        the terminate step (0.2-0.3 s after the interrupt): some children are
        killed, others are stopped after their task ended and must be
        continued untouched.  Every task records its start, interrupts and
        end with its pid.  Not one task that was not cancelled may be
        interrupted, killed or end other than SUCCESS; and the test checks
        that the races it is about really happened.
        """
        worker = make_worker(pool="prefork", concurrency=2, extra_env={"CIT_KILL_AFTER": "0.2"})
        rng = random.Random(12)
        durations = [rng.uniform(10.0, 50.0) for _ in range(self.TASKS)]
        chosen = set(rng.sample(range(self.TASKS), self.TASKS // 2))
        stubborn = set(rng.sample(sorted(chosen), self.STUBBORN))
        key = keys.key("t")
        extra = {n: rng.uniform(0.15, 0.5) for n in stubborn}
        results = [
            worker.send("cit.ladder.short", key, n, durations[n], extra.get(n, 0.0))
            for n in range(self.TASKS)
        ]
        fired = self._cancel_as_they_end(keys, worker, results, durations, chosen)
        outcomes = self._outcomes(keys, results)

        innocent = [n for n in range(self.TASKS) if n not in chosen]
        interrupted = {int(item.split(":")[0]) for item in keys.list("t", "interrupted")}
        finished = {int(item.split(":")[0]) for item in keys.list("t", "finished")}
        wrong = {n: outcomes[n] for n in innocent if outcomes[n][0] != "SUCCESS"}
        assert {} == wrong
        assert set() == interrupted - chosen
        assert set(innocent) <= finished
        # Every innocent task returned the pid it ran in, and that child lived
        # until the task had finished (it returned).
        assert all(isinstance(outcomes[n][1], int) for n in innocent)

        how = {n: self._how(outcomes[n]) for n in chosen}
        counts = {kind: sum(1 for v in how.values() if v == kind) for kind in set(how.values())}
        assert counts.get("interrupted", 0) >= 5, counts
        assert counts.get("terminated", 0) >= 1, counts
        assert counts.get("finished first", 0) >= 5, counts
        assert chosen == set(how)
        assert len(chosen) == len(fired)
        wait_for(
            lambda: len(worker.children()) == worker.concurrency,
            30,
            message="the pool to be back to full strength",
        )
        log = worker.log_path.read_text(errors="replace")
        averted = log.count("cancel.terminate_averted")
        killed = log.count("task.terminated")
        assert killed == counts["terminated"]
        print(f"torture: cancelled tasks {counts}; kills {killed}, kills averted {averted}")

    @staticmethod
    def _how(outcome: tuple[str, Any]) -> str:
        state, result = outcome
        if state == "SUCCESS":
            return "finished first"
        text = str(result)
        if "terminated" in text:
            return "terminated"
        if "interrupted" in text:
            return "interrupted"
        return "skipped" if state == "REVOKED" else state

    @staticmethod
    def _cancel_as_they_end(keys, worker, results, durations, chosen) -> list[int]:
        """Cancel each chosen task at its expected end (+-15 ms); return those cancelled."""
        rng = random.Random(34)
        due: list[tuple[float, int]] = []
        seen = 0
        fired: list[int] = []
        deadline = time.monotonic() + 60
        while len(fired) < len(chosen) and time.monotonic() < deadline:
            for item in keys.r.lrange(f"{keys.key('t')}:started", seen, -1):
                seen += 1
                n, _pid, at = item.split(":")
                if int(n) in chosen and int(n) not in fired and all(int(n) != d for _, d in due):
                    end = float(at) + durations[int(n)] / 1000.0 + rng.uniform(-0.015, 0.015)
                    heapq.heappush(due, (end, int(n)))
            while due and due[0][0] <= time.time():
                _at, n = heapq.heappop(due)
                cancel(results[n], "torture", grace=0, app=worker.app)
                fired.append(n)
            if not due:
                # Chosen tasks that never start (cancelled while queued by a
                # neighbour's timing) are cancelled once nothing else is due.
                started = {int(i.split(":")[0]) for i in keys.list("t", "started")}
                if all(r.ready() for n, r in enumerate(results) if n not in chosen) or (
                    len(started) == len(results)
                ):
                    for n in sorted(chosen - set(fired) - started):
                        cancel(results[n], "torture", grace=0, app=worker.app)
                        fired.append(n)
            time.sleep(0.002)
        return fired

    @staticmethod
    def _outcomes(keys, results) -> dict[int, tuple[str, Any]]:
        """Each task's final state and result, once all have ended."""
        outcomes: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + 90
        while len(outcomes) < len(results) and time.monotonic() < deadline:
            for n, result in enumerate(results):
                if n not in outcomes:
                    meta = task_meta(result)
                    if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                        outcomes[n] = (meta["status"], meta["result"])
            time.sleep(0.1)
        assert len(outcomes) == len(results), f"{len(results) - len(outcomes)} never ended"
        return outcomes


class TestWarmShutdown:
    """A warm shutdown waits for the running tasks: their cancellations go on meanwhile."""

    @pytest.mark.parametrize(
        ("pool", "task", "step", "bound"),
        [
            ("prefork", "cit.ladder.gil", "terminated after", 2.0),
            # (The threads pool is never interrupted: see TestInProcessPools.)
            ("prefork", "cit.ladder.sleep", "interrupted after", 1.0),
        ],
    )
    def test_a_cancellation_escalates_while_the_pool_drains(
        self, make_worker, keys: Keys, pool: str, task: str, step: str, bound: float
    ):
        """Cancelled with grace=1, then SIGTERM: the ladder still ends the task, the worker exits.

        Celery stops the integration's bootstep before the pool, whose stop
        waits for the running task.  If the poller stopped with the step, the
        ladder stopped too: the task (which never reaches a checkpoint) kept
        the warm shutdown waiting, and ended SUCCESS if it ever ended.
        """
        worker = make_worker(pool=pool, concurrency=2)
        result = start(worker, keys, task, "s")
        cancel(result, "during a warm shutdown", grace=1, app=worker.app)
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)

        elapsed = timed_revoked(result, "during a warm shutdown", step)

        assert elapsed <= bound + LATENCY + 1.0, elapsed
        assert 1 == keys.runs("s")
        worker.proc.wait(timeout=20)
