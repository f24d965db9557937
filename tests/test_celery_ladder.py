"""The race-free core of the ladder's terminate step, on real forked processes.

`cancellable.celery._ladder.stop_check_kill` stops a process, reads its row
in the shared `ChildTable` and kills it only if the row names the task.
Here the "child" flips its row between task ids as fast as it can, the
worst case for a check-then-kill; every kill must have found the victim's
id in the row, frozen, and every process that was spared must run on.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from cancellable import DEFAULT, Cancelled, CancelReason, CancelScope, checkpoint
from cancellable.celery import _ladder
from cancellable.celery._childtable import ROW_SIZE, ChildTable
from cancellable.celery._ladder import Ladder
from cancellable.celery._mailbox import KEY_SIZE, key_of
from cancellable.celery._registry import RunningTask
from cancellable.celery._runtime import WorkerRuntime
from cancellable.celery._settings import SettingError
from cancellable.events import CANCEL_NOT_ESCALATED

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def row_key(table: ChildTable, row: int) -> bytes:
    """The key bytes in ``row`` of ``table``, as the main process would read them."""
    at = row * ROW_SIZE + 5  # after the pid and the busy byte
    return bytes(table._map[at : at + KEY_SIZE])


def flipping_child(table: ChildTable) -> int:
    """Fork a process that publishes task-0, clears, publishes task-1, ... forever."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            table.claim(0)
            n = 0
            while True:
                table.publish(f"task-{n % 7}")
                table.clear()
                n += 1
        finally:
            os._exit(0)
    deadline = time.monotonic() + 5
    while not table.knows(pid):
        assert time.monotonic() < deadline, "the child never claimed its row"
        time.sleep(0.001)
    return pid


def reap(pid: int) -> int:
    """Wait for ``pid`` to exit; return the signal that ended it (0 if none)."""
    _pid, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


class TestStopCheckKill:
    """`stop_check_kill` against a process that races it on purpose."""

    def test_kills_only_a_process_that_still_runs_the_task(self) -> None:
        """300 tries on flipping children (more, up to 3,000, until both a kill and a
        spare were seen): each kill froze the victim's id; the rest ran on.

        A kill needs the stop to land while the row names the victim, about one
        try in 14 on an idle machine; on a loaded one a CI run saw none in 300."""
        table = ChildTable()
        pid = flipping_child(table)
        outcomes: dict[str, int] = {}
        try:
            for attempt in range(3000):
                if attempt >= 300 and outcomes.get("killed") and outcomes.get("moved_on"):
                    break
                victim = f"task-{attempt % 7}"
                outcome = _ladder.stop_check_kill(table, pid, victim)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "killed":
                    assert signal.SIGKILL == reap(pid)
                    # The row is as the child left it when it was killed.
                    assert key_of(victim) == row_key(table, 0)
                    pid = flipping_child(table)
                else:
                    # Spared: it ran another task, or was stopped mid-write
                    # of its row (asked again later); either way continued.
                    assert outcome in ("moved_on", "retry"), outcome
                    before = row_key(table, 0)
                    deadline = time.monotonic() + 2
                    while row_key(table, 0) == before:  # it was continued: it runs on
                        assert time.monotonic() < deadline, "a spared child did not run on"
        finally:
            os.kill(pid, signal.SIGKILL)
            reap(pid)

        print(f"stop_check_kill outcomes: {outcomes}")
        assert outcomes.get("killed", 0) >= 1, outcomes
        assert outcomes.get("moved_on", 0) >= 1, outcomes

    def test_a_process_between_tasks_is_continued(self) -> None:
        """A row that names no task: the process is stopped, found idle, continued."""
        table = ChildTable()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            table.claim(1)
            time.sleep(30)
            os._exit(0)
        try:
            deadline = time.monotonic() + 5
            while not table.knows(pid):
                assert time.monotonic() < deadline
                time.sleep(0.001)

            assert "moved_on" == _ladder.stop_check_kill(table, pid, "task-x")
            stat = Path(f"/proc/{pid}/stat").read_text()
            state = stat.rsplit(")", 1)[1].split()[0]
            assert state in ("S", "R")
        finally:
            os.kill(pid, signal.SIGKILL)
            reap(pid)

    def test_a_process_stopped_while_writing_its_row_is_continued(self) -> None:
        """Stopped mid-write (busy byte set): never killed on a torn key, asked again later.

        The row holds ``report-1`` and the busy byte, as if the child had been
        stopped while publishing ``report-10``: a blend that equals another
        task's key.  The answer is "retry", and the child runs on.
        """
        table = ChildTable()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                table.claim(0)
                table.publish("report-1")
                table._map[4] = 1  # the busy byte, as in the middle of a write
                time.sleep(30)
            finally:
                os._exit(0)
        try:
            deadline = time.monotonic() + 5
            while not table.busy(pid):
                assert time.monotonic() < deadline, "the child never marked its row"
                time.sleep(0.001)
            assert table.runs(pid, "report-1")  # what a reader without the busy byte would see

            outcome = _ladder.stop_check_kill(table, pid, "report-1")

            assert "retry" == outcome
            assert _ladder._stopped(pid) is False  # continued, alive
        finally:
            os.kill(pid, signal.SIGKILL)
            reap(pid)

    def test_a_gone_process_is_not_an_error(self) -> None:
        """A pid that no longer exists: "moved_on", nothing raised."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os._exit(0)
        reap(pid)

        assert "moved_on" == _ladder.stop_check_kill(ChildTable(), pid, "task-x")


def _make_app(**conf: Any) -> Any:
    """A real Celery app with two @cancellable tasks, and ``conf`` as its settings."""
    from celery import Celery

    from cancellable import cancellable

    app = Celery("ladder-unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(conf)

    @app.task(name="ladder-unit.graced", shared=False)
    @cancellable(grace=3.0)
    def graced() -> None:
        """A task with its own grace."""

    @app.task(bind=True, name="ladder-unit.plain", shared=False)
    @cancellable
    def plain(self: Any) -> None:
        """A bound task without a grace of its own."""

    @app.task(name="ladder-unit.undecorated", shared=False)
    def undecorated() -> None:
        """A task without ``@cancellable``."""

    return app


def threads_worker(pool_kind: str = "threads", **conf: Any) -> WorkerRuntime:
    """The runtime of a worker of a new app with ``conf`` (not made this process's)."""
    return WorkerRuntime(_make_app(**conf), pool_kind=pool_kind)


def graces(ladder: Ladder, task_name: str, call_grace: float | None) -> float | None:
    """The grace the ladder applies to ``task_name`` when the call gives ``call_grace``."""
    return ladder.resolve_grace(call_grace, ladder.task_grace(task_name))


class TestSettings:
    """Which grace applies: the call's, then the task's, then the app's."""

    def test_the_calls_grace_wins(self) -> None:
        """A grace given to cancel() is used whatever the task and app say."""
        ladder = threads_worker(cancellable_grace=9.0).ladder

        assert 1.0 == graces(ladder, "ladder-unit.graced", 1.0)

    def test_then_the_tasks_own(self) -> None:
        """``@cancellable(grace=3.0)`` is found through the app's task registry."""
        ladder = threads_worker(cancellable_grace=9.0).ladder

        assert 3.0 == graces(ladder, "ladder-unit.graced", None)

    def test_then_the_apps(self) -> None:
        """A task without a grace (bound task, wrapper in the registry) takes the app's."""
        ladder = threads_worker(cancellable_grace=9.0).ladder

        assert ladder.task_grace("ladder-unit.plain") is DEFAULT
        assert 9.0 == graces(ladder, "ladder-unit.plain", None)

    def test_none_by_default(self) -> None:
        """No grace anywhere: cooperative only, the task is not put on the ladder."""
        ladder = threads_worker().ladder
        ladder.start("id-1", CancelReason(), "ladder-unit.plain", None)

        assert {} == ladder.rungs()

    def test_a_bad_setting_fails_the_worker_and_names_it(self) -> None:
        """``cancellable_grace = -1``: the worker's runtime is not built, and the error
        names the setting (never a worker that cooperates but silently cannot escalate)."""
        with pytest.raises(SettingError) as caught:
            threads_worker(cancellable_grace=-1)

        assert ("cancellable_grace",) == caught.value.settings
        assert "cancellable_grace=-1" in str(caught.value)

    def test_a_task_this_worker_does_not_hold_leaves_the_ladder(self) -> None:
        """On the ladder, then neither held nor running here: the next tick drops it."""
        ladder = threads_worker().ladder
        ladder.start("id-3", CancelReason(), "ladder-unit.graced", None)
        assert ["id-3"] == list(ladder.rungs())

        ladder.tick()

        assert {} == ladder.rungs()

    def test_a_task_without_cancellable_is_never_on_the_ladder(self) -> None:
        """An undecorated task has no boundary to interrupt at: no rung, whatever the grace."""
        ladder = threads_worker(cancellable_grace=1.0).ladder
        ladder.start("id-4", CancelReason(), "ladder-unit.undecorated", 5.0)

        assert {} == ladder.rungs()

    def test_a_task_name_the_app_does_not_know_takes_the_calls_grace(self) -> None:
        """A name missing from the registry: the call's grace (then the app's) applies."""
        ladder = threads_worker().ladder
        ladder.start("id-5", CancelReason(), "no.such.task", 2.0)

        assert 2.0 == ladder.rungs()["id-5"].grace


def _loop_as_a_pool_thread(
    rt: WorkerRuntime,
    entries: list[Any],
    ready: threading.Event,
    outcome: dict[str, object],
    seconds: float,
) -> None:
    """A threads-pool task: a loop without checkpoints for ``seconds``, then a checkpoint."""
    with CancelScope() as scope:
        entry = RunningTask(f"ladder-{threading.get_ident()}", "t", scope)
        rt.tasks.running.register(entry)
        entries.append(entry)
        rt.tasks.interrupts.open_window(entry)
        try:
            ready.set()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass
            outcome["loop done"] = True
            checkpoint()
            outcome["finished"] = True
        except Cancelled as exc:
            outcome["cancelled"] = exc.reason
        finally:
            rt.tasks.interrupts.close_window(entry)
            rt.tasks.running.unregister(entry)


class TestThreadsPool:
    """The ladder in a threads-pool worker, on a real pool-like thread."""

    def test_never_raises_in_a_pool_thread_and_says_so_once(self) -> None:
        """Grace 0 in the threads pool: nothing is raised in the thread's loop.

        An exception at an arbitrary bytecode could leave a lock held that a
        later task (or the worker's own threads) would wait on for ever.  So
        the loop runs to its end, the task stops at its checkpoint (the
        cooperative path), and the ladder says once why it did no more, then
        drops the task.
        """
        rt = threads_worker(cancellable_kill_after=0)
        entries: list[Any] = []
        ready = threading.Event()
        outcome: dict[str, object] = {}
        thread = threading.Thread(
            target=_loop_as_a_pool_thread, args=(rt, entries, ready, outcome, 0.5), daemon=True
        )
        thread.start()
        assert ready.wait(5)
        reason = CancelReason(message="stop")
        try:
            with structlog.testing.capture_logs() as logs:
                entries[0].scope.cancel(reason)
                rt.ladder.start(entries[0].task_id, reason, "ladder-unit.plain", 0.0)
                deadline = time.monotonic() + 8
                while thread.is_alive() and time.monotonic() < deadline:
                    rt.ladder.tick()
                    time.sleep(0.05)
        finally:
            thread.join(12)

        assert {"loop done": True, "cancelled": reason} == outcome
        assert {} == rt.ladder.rungs()
        whys = [e.get("why", "") for e in logs if e["event"] == CANCEL_NOT_ESCALATED]
        assert 1 == len(whys)
        assert whys[0].startswith("the threads pool interrupts a task only at its checkpoints")


class TestStopped:
    """How the terminate step tells that a child is stopped."""

    def test_a_stopped_and_a_running_process(self) -> None:
        """/proc says T for a stopped child, not for a running one; None once it is gone."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            time.sleep(30)
            os._exit(0)
        try:
            running = _ladder._stopped(pid)
            os.kill(pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while not _ladder._stopped(pid) and time.monotonic() < deadline:
                time.sleep(0.001)
            stopped = _ladder._stopped(pid)
            by_waitid = _ladder._stopped_waitid(pid)
        finally:
            os.kill(pid, signal.SIGKILL)
            reap(pid)

        assert (False, True, True) == (running, stopped, by_waitid)
        assert _ladder._stopped(pid) is None

    def test_a_zombie_is_gone_and_a_stranger_cannot_be_asked(self) -> None:
        """A dead, unreaped child reads as gone (None); waitid on a process that is not our
        child cannot tell (None), rather than raise."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os._exit(0)
        deadline = time.monotonic() + 5
        while _ladder._stopped(pid) is not None:  # running, then a zombie
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.001)
        reap(pid)

        assert _ladder._stopped_waitid(1) is None  # init: not our child
        assert _ladder._stopped(pid) is None  # reaped: no /proc entry


class TestTerminateStep:
    """When the terminate step cannot act, it says so and leaves the process alone."""

    def test_a_gone_process_has_moved_on(self) -> None:
        """Stopping a pid that no longer exists: "moved_on", nothing raised."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os._exit(0)
        reap(pid)

        assert "moved_on" == _ladder.stop_check_kill(ChildTable(), pid, "t")

    def test_no_table_or_no_row_is_unavailable(self) -> None:
        """Outside a prefork worker (no table), or for a pid without a row: "unavailable"."""
        assert "unavailable" == threads_worker().ladder.terminate(os.getpid(), "t")
        assert "unavailable" == threads_worker("prefork").ladder.terminate(os.getpid(), "t")

    @pytest.mark.parametrize("pool", ["gevent", "eventlet", "solo"])
    def test_an_in_process_pool_is_not_interrupted_and_says_so_once(self, pool: str) -> None:
        """gevent, eventlet, solo: past the grace, one ``cancel.not_escalated``, no more steps."""
        rung = _ladder._Rung("g-1", "t", CancelReason(message="x"), time.monotonic(), 0.0, 0.0)
        entry = RunningTask("g-1", "t", CancelScope())
        ladder = threads_worker(pool).ladder
        with structlog.testing.capture_logs() as logs:
            ladder._advance(rung, None, entry, time.monotonic())
            ladder._advance(rung, None, entry, time.monotonic() + 1.0)

        whys = [e["why"] for e in logs if e["event"] == CANCEL_NOT_ESCALATED]
        assert [_ladder._in_process_limit(pool)] == whys
        assert f"the {pool} pool interrupts a task only at its checkpoints" in whys[0]
        assert "done" == rung.step
        assert [] == [e for e in logs if e["event"] == "cancel.escalated"]


class TestChildTableEdges:
    """The child table outside its normal use: no row, rows out of range, unknown pids."""

    def test_a_pool_index_out_of_range_gets_no_row(self) -> None:
        """Indexes beyond the table cannot be terminated race-free: no row, writes ignored."""
        from cancellable.celery._childtable import ROWS

        table = ChildTable()
        assert not table.claim(ROWS)
        assert not table.claim(-1)
        assert table.row is None
        table.publish("t")  # no row: nothing written
        table.clear()
        assert not table.knows(os.getpid())
        assert not table.busy(os.getpid())
        assert not table.runs(os.getpid(), "t")

    def test_a_claimed_row_says_what_runs(self) -> None:
        """publish / clear as the task boundary does; never busy between writes."""
        table = ChildTable()
        assert table.claim(3)
        table.publish("task-a")
        assert table.runs(os.getpid(), "task-a")
        assert not table.runs(os.getpid(), "task-b")
        assert not table.busy(os.getpid())
        table.clear()
        assert not table.runs(os.getpid(), "task-a")
        assert table.knows(os.getpid())


def test_a_child_that_cannot_be_stopped_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Terminate keeps failing to see the child stopped (uninterruptible sleep): after
    `MAX_STOP_TRIES` ticks the ladder gives up, says so once, and stops holding up the poller.

    (The terminate step itself is replaced: a process in uninterruptible
    sleep cannot be made to order; what is tested is the ladder's counting.)
    """
    calls: list[int] = []
    ladder = threads_worker("prefork").ladder
    monkeypatch.setattr(ladder, "terminate", lambda pid, *rest: calls.append(pid) or "retry")
    rung = _ladder._Rung("d-1", "t", CancelReason(message="x"), time.monotonic(), 0.0, 0.0)
    rung.step = "terminate"

    class Held:
        """Only what the terminate step reads of a held request: its child's pid."""

        worker_pid = 4242

    with structlog.testing.capture_logs() as logs:
        for _ in range(_ladder.MAX_STOP_TRIES + 5):
            if rung.step == "done":
                break
            ladder._advance(rung, Held(), None, time.monotonic())

    assert [4242] * _ladder.MAX_STOP_TRIES == calls
    assert "done" == rung.step
    whys = [e["why"] for e in logs if e["event"] == CANCEL_NOT_ESCALATED]
    assert 1 == len(whys)
    assert "could not be stopped" in whys[0]
