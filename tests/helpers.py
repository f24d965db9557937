"""Small helpers shared by test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from cancellable import CancelScope

__all__ = ["cancel_from_thread", "run_python"]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter; fail with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == done.returncode, done.stdout + done.stderr
    return done


def cancel_from_thread(scope: CancelScope, reason: str, delay: float = 0.05) -> threading.Thread:
    """Cancel ``scope`` from another thread after ``delay`` seconds."""

    def run() -> None:
        time.sleep(delay)
        scope.cancel(reason)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
