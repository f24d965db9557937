"""``python -m cancellable demo``: the README's first command, run for real."""

from __future__ import annotations

import os
import subprocess
import sys


class TestDemo:
    """The demo runs a real prefork worker on the filesystem transport."""

    def test_demo_cancels_a_running_and_a_queued_task(self) -> None:
        """Exit 0; the running task ends REVOKED with its reason, the queued one never ran."""
        run = subprocess.run(
            [sys.executable, "-m", "cancellable", "demo"],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        assert 0 == run.returncode, run.stdout + run.stderr
        out = run.stdout
        assert "first  REVOKED  TaskRevokedError('revoked by alice: user pressed stop')" in out
        assert "third  REVOKED  TaskRevokedError('revoked')" in out
        assert "second SUCCESS" in out
        assert "cleanup hook of 'first' ran: True" in out
        assert "'third' ever started: False" in out
        for event in ("cancel.delivered", "cancel.observed", "task.cancelled"):
            assert event in out

    def test_usage(self) -> None:
        """Without a command it prints usage; an unknown command exits 2."""
        plain = subprocess.run(
            [sys.executable, "-m", "cancellable"], capture_output=True, text=True, timeout=60
        )
        unknown = subprocess.run(
            [sys.executable, "-m", "cancellable", "frobnicate"],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert 2 == plain.returncode
        assert "usage: python -m cancellable demo" in plain.stdout
        assert 2 == unknown.returncode
        assert "unknown command 'frobnicate'" in unknown.stderr
