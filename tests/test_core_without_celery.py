"""The core works without Celery: ``pip install cancellable`` does not install it.

The nox ``core-*`` sessions run the core suite in a venv made with
``pip install .[core-tests]`` and set ``CANCELLABLE_TEST_NO_CELERY=1``; there
`test_celery_is_not_installed` checks that Celery really is absent.  The other
tests hide Celery from a fresh interpreter (an import hook that refuses it),
so they check the same behaviour in any venv.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
from packaging.requirements import Requirement
from tests.helpers import run_python

#: Makes ``celery`` (and the libraries only it brings) unimportable in a fresh interpreter.
HIDE_CELERY = """
import sys

class HideCelery:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("celery", "kombu", "billiard"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideCelery())
"""

NO_CELERY_VENV = os.environ.get("CANCELLABLE_TEST_NO_CELERY") == "1"


@pytest.mark.skipif(not NO_CELERY_VENV, reason="only in the core venv (nox core-*)")
def test_celery_is_not_installed():
    """In the core venv (``pip install .[core-tests]``), ``import celery`` fails."""
    done = subprocess.run(
        [sys.executable, "-c", "import celery"], capture_output=True, text=True, timeout=60
    )

    assert None is importlib.util.find_spec("celery")
    assert 1 == done.returncode
    assert "No module named 'celery'" in done.stderr


def test_celery_is_required_only_by_the_celery_extra():
    """The installed metadata: Celery comes with the ``celery`` extra, not the core or its tests."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("cancellable") or []]

    def needed(extra: str) -> set[str]:
        return {
            r.name for r in requirements if r.marker is None or r.marker.evaluate({"extra": extra})
        }

    assert {"structlog", "wrapt"} == needed("")
    assert "celery" not in needed("core-tests")
    assert "celery" in needed("celery")


def test_importing_cancellable_does_not_import_celery():
    """The core never imports the integration, nor Celery, on its own."""
    done = run_python(
        """
import sys
import cancellable
from cancellable import cancellable as decorate, checkpoint
decorate(lambda: checkpoint())()
print(sorted(m for m in sys.modules if m == "celery" or m.startswith("cancellable.celery")))
"""
    )
    assert "[]" == done.stdout.strip()


def test_the_core_works_with_celery_hidden():
    """Scopes, checkpoints, hooks, ``@cancellable``, sleep, async, testing and events work."""
    done = run_python(
        HIDE_CELERY
        + textwrap.dedent(
            """
            import asyncio
            import structlog
            import cancellable
            from cancellable import (
                Cancelled, CancelScope, cancellable as decorate, checkpoint, move_on_after,
                on_cancel, sleep,
            )
            from cancellable import events
            from cancellable.testing import cancel_after, capture_events

            structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet stdout
            ran = []

            @decorate
            def work(n):
                on_cancel(ran.append, "hook")
                for _ in range(n):
                    checkpoint()
                return n

            print("plain call:", work(3))
            with capture_events() as captured, cancel_after(2) as scope:
                work(10)
            print("cancelled at a checkpoint:", scope.cancelled_caught, ran)
            print("events:", events.SCOPE_CANCELLED in [e["event"] for e in captured])
            with move_on_after(0.05) as timed:
                sleep(30)
            print("sleep cut short:", timed.cancelled_caught)

            @decorate(timeout=0.05)
            async def waits():
                await asyncio.sleep(30)

            try:
                asyncio.run(waits())
            except Cancelled as exc:
                print("async deadline:", exc.reason.source)
            print("celery loaded:", "celery" in sys.modules)
            """
        )
    )

    assert [
        "plain call: 3",
        "cancelled at a checkpoint: True ['hook']",
        "events: True",
        "sleep cut short: True",
        "async deadline: deadline",
        "celery loaded: False",
    ] == done.stdout.splitlines()


def test_importing_the_integration_names_the_extra():
    """``import cancellable.celery`` without Celery: an ImportError naming the extra."""
    done = run_python(
        HIDE_CELERY
        + textwrap.dedent(
            """
            try:
                import cancellable.celery
            except ImportError as exc:
                print(type(exc).__name__, exc)
            """
        )
    )

    assert "pip install 'cancellable[celery]'" in done.stdout, done.stdout


def test_the_demo_says_it_needs_the_extra():
    """``python -m cancellable demo`` without Celery exits 1 naming the extra, no traceback."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            HIDE_CELERY + "import runpy; runpy.run_module('cancellable', run_name='__main__')",
            "demo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert 1 == done.returncode, done.stdout + done.stderr
    assert "pip install 'cancellable[celery]'" in done.stderr
    assert "Traceback" not in done.stderr
