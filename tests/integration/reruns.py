"""Helpers for the tests of tasks that run again (shutdowns, lost connections).

The tasks (``cit.rerun.*`` in `tests.integration.app`) write one line per
event of each run (``start``, ``cancelled``, ``cleanup``, ``done``, with the
run's number, pid and time); `StateWatch` records every state the backend
holds for a task while it runs.
"""

from __future__ import annotations

import threading
import time

from celery.result import AsyncResult

from .conftest import Keys, state_of, wait_for

__all__ = ["StateWatch", "log_lines"]


class StateWatch:
    """Every state the backend held for one task while the watch ran."""

    def __init__(self, result: AsyncResult) -> None:
        self.result = result
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            state = state_of(self.result)
            if not self.seen or self.seen[-1] != state:
                self.seen.append(state)
            if state in ("SUCCESS", "FAILURE", "REVOKED"):
                return
            time.sleep(0.02)

    def wait(self, timeout: float) -> list[str]:
        """Wait until the task is in a ready state; return the states seen, in order."""
        wait_for(
            lambda: not self._thread.is_alive(),
            timeout,
            message=lambda: f"task {self.result.id} to end (states seen: {self.seen})",
        )
        return self.seen

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def log_lines(keys: Keys, name: str) -> list[tuple[str, int, int, float]]:
    """The task's log lines: (what, run number, pid, time)."""
    out = []
    for line in keys.list(name, "log"):
        what, run, pid, at = line.split()
        out.append((what, int(run), int(pid), float(at)))
    return out
