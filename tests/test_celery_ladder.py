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
import time
from pathlib import Path

import pytest

from cancellable.celery import _ladder
from cancellable.celery._childtable import ROW_SIZE, ChildTable
from cancellable.celery._mailbox import KEY_SIZE, key_of

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def row_key(table: ChildTable, row: int) -> bytes:
    """The key bytes in ``row`` of ``table``, as the main process would read them."""
    at = row * ROW_SIZE + 4
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
        """300 tries on flipping children: each kill froze the victim's id; the rest ran on."""
        table = ChildTable()
        pid = flipping_child(table)
        outcomes: dict[str, int] = {}
        try:
            for attempt in range(300):
                victim = f"task-{attempt % 7}"
                outcome = _ladder.stop_check_kill(table, pid, victim)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "killed":
                    assert signal.SIGKILL == reap(pid)
                    # The row is as the child left it when it was killed.
                    assert key_of(victim) == row_key(table, 0)
                    pid = flipping_child(table)
                else:
                    assert "moved_on" == outcome
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

    def test_a_gone_process_is_not_an_error(self) -> None:
        """A pid that no longer exists: "moved_on", nothing raised."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os._exit(0)
        reap(pid)

        assert "moved_on" == _ladder.stop_check_kill(ChildTable(), pid, "task-x")
