"""Deadlines under gevent and eventlet monkey-patching, and the timer's two modes.

Under monkey-patching ``threading.Thread`` starts a greenlet, which runs only
when the running code yields to the hub; the timer must be a real OS thread
so that a deadline fires around a loop that never yields.  The real thing
runs in a subprocess (monkey-patching cannot be undone); the detection and
the hand-over are also checked in-process with stand-ins for the two
libraries' detection functions, which is the only way to reach eventlet's
branch where eventlet is not installed.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import _thread
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import types
import warnings

import pytest

from cancellable import CancelScope, _hooks, _scope, _timer, checkpoint, on_cancel

#: Runs in a fresh interpreter: patch everything first, then a deadline
#: around a loop that calls checkpoint() and never yields to the hub.
GEVENT_PROBE = """
from gevent import monkey
monkey.patch_all()

import json, threading, time, warnings
import structlog, logging
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

import cancellable
from cancellable import CancelScope, _timer, checkpoint, move_on_after, on_cancel

started = time.monotonic()
with move_on_after(0.2) as scope:
    while True:
        checkpoint()
elapsed = time.monotonic() - started

# A hook budget is enforced only where the library controls the landing
# point: a hook in cancellable.sleep stops, one in gevent's sleep runs on.
ran = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        with CancelScope(hook_timeout=0.01) as hooked:
            on_cancel(lambda: (time.sleep(0.05), ran.append("hook")))
            hooked.cancel()
            checkpoint()
    hook_started = time.monotonic()
    with CancelScope(hook_timeout=0.05) as slept:
        on_cancel(cancellable.sleep, 5)
        slept.cancel()
        checkpoint()
    hook_elapsed = time.monotonic() - hook_started

print(json.dumps({
    "caught": scope.cancelled_caught,
    "source": scope.cancel_reason.source,
    "elapsed": elapsed,
    "hand_over": _timer._timer.hand_over,
    "timer_is_a_greenlet_thread": any(
        t.name == "cancellable-timer" for t in threading.enumerate()
    ),
    "warnings": [str(w.message) for w in caught],
    "ran": ran,
    "hook_errors": len(hooked.cleanup_errors),
    "slept_errors": [type(e).__name__ for e in slept.cleanup_errors],
    "hook_elapsed": hook_elapsed,
}))
"""


def run_probe(source: str) -> dict[str, object]:
    """Run ``source`` in a fresh interpreter (bounded in time); return the JSON it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")}
    run = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )

    assert 0 == run.returncode, run.stderr
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(importlib.util.find_spec("gevent") is None, reason="needs gevent")
class TestUnderGevent:
    def test_deadline_fires_in_a_loop_that_never_yields(self):
        """After ``monkey.patch_all()``, move_on_after(0.2) stops a non-yielding loop in time.

        The timer runs on a real OS thread (not a greenlet, which this loop
        would never let run), and the deadline's cancel runs at the loop's
        next checkpoint.
        """
        result = run_probe(GEVENT_PROBE)

        assert result["caught"] is True
        assert "deadline" == result["source"]
        assert 0.2 <= result["elapsed"] < 2.0  # type: ignore[operator]
        assert result["hand_over"] is True
        assert result["timer_is_a_greenlet_thread"] is False

    def test_hook_budgets_stop_hooks_only_where_the_library_waits(self):
        """Under gevent a budget stops a hook in cancellable.sleep; one in gevent's sleep runs on.

        A budget never raises at an arbitrary bytecode there (all greenlets
        share one OS thread), and no warning is given any more.
        """
        result = run_probe(GEVENT_PROBE)

        assert ["hook", "hook"] == result["ran"]
        assert 0 == result["hook_errors"]
        assert ["HookTimeoutError"] == result["slept_errors"]
        assert 0.05 <= result["hook_elapsed"] < 2.0  # type: ignore[operator]
        assert [] == result["warnings"]


@pytest.fixture(name="patched_by")
def _patched_by(monkeypatch):
    """Pretend gevent or eventlet patched threading: install a stand-in detection module.

    The stand-ins hand out the real ``_thread`` functions as "originals",
    which is what the real libraries do, and the process's timer is replaced
    by a fresh one for the test.
    """

    def install(library: str) -> None:
        if library == "gevent":
            monkey = types.ModuleType("gevent.monkey")
            monkey.is_module_patched = lambda name: name == "threading"  # type: ignore[attr-defined]
            monkey.get_original = lambda module, names: [  # type: ignore[attr-defined]
                getattr(_thread, name) for name in names
            ]
            monkeypatch.setitem(sys.modules, "gevent.monkey", monkey)
        else:
            patcher = types.ModuleType("eventlet.patcher")
            patcher.is_monkey_patched = lambda name: name == "thread"  # type: ignore[attr-defined]
            patcher.original = lambda name: _thread  # type: ignore[attr-defined]
            monkeypatch.setitem(sys.modules, "eventlet.patcher", patcher)
        monkeypatch.setattr(_timer, "_timer", None)

    return install


class TestTimerModes:
    def test_not_patched_here(self):
        """In this test process nothing is monkey-patched: callbacks run on a named thread."""
        fired_on = []
        done = threading.Event()
        _timer.schedule(
            time.monotonic(), lambda: (fired_on.append(threading.current_thread().name), done.set())
        )

        assert not _timer.monkey_patched()
        assert done.wait(5)
        assert ["cancellable-timer"] == fired_on
        assert _timer._timer is not None
        assert not _timer._timer.hand_over

    @pytest.mark.parametrize("library", ["gevent", "eventlet"])
    def test_patched_callbacks_run_at_the_next_checkpoint(self, patched_by, library):
        """Monkey-patched: the timer hands its callback over; a checkpoint runs it on our thread."""
        patched_by(library)
        ran_on = []
        _timer.schedule(time.monotonic(), lambda: ran_on.append(threading.get_ident()))
        deadline = time.monotonic() + 5
        while not _scope._deferred and time.monotonic() < deadline:
            time.sleep(0.005)
        handed_over = list(_scope._deferred)
        checkpoint()

        assert _timer.monkey_patched()
        assert 1 == len(handed_over)
        assert [threading.get_ident()] == ran_on
        assert not _scope._pending

    @pytest.mark.parametrize("library", ["gevent", "eventlet"])
    def test_patched_deadline_cancels_a_busy_loop(self, patched_by, library):
        """Monkey-patched: a deadline still ends a loop of checkpoints, through the hand-over."""
        patched_by(library)
        started = time.monotonic()
        with CancelScope(deadline=started + 0.05) as scope:
            while time.monotonic() - started < 5:
                checkpoint()

        assert scope.cancelled_caught
        assert "deadline" == scope.cancel_reason.source
        assert time.monotonic() - started < 2

    def test_patched_hook_budget_is_enforced_at_checkpoints_only(self, patched_by):
        """Monkey-patched: a spent budget stops a hook at its checkpoint, never elsewhere.

        The budget's expiry is handed over like any timer callback and runs
        at a checkpoint; a hook without one runs to its end, and no
        RuntimeWarning is given.
        """
        patched_by("gevent")
        ran = []

        def checking() -> None:
            give_up = time.monotonic() + 5
            while time.monotonic() < give_up:
                checkpoint()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with CancelScope(hook_timeout=0.01) as slow:
                on_cancel(lambda: (time.sleep(0.05), ran.append("hook")))
                slow.cancel()
                checkpoint()
            with CancelScope(hook_timeout=0.01) as looping:
                on_cancel(checking)
                looping.cancel()
                checkpoint()

        assert not _hooks.async_raise_allowed()
        assert ["hook"] == ran
        assert () == slow.cleanup_errors
        assert ["HookTimeoutError"] == [type(e).__name__ for e in looping.cleanup_errors]
        assert [] == [str(w.message) for w in caught]


class TestTimerWakeUps:
    def test_an_earlier_entry_cuts_a_long_sleep_short(self):
        """Scheduling an entry earlier than the one the thread sleeps for wakes it up."""
        done = threading.Event()
        late = _timer.schedule(time.monotonic() + 3600, lambda: None)
        time.sleep(0.02)  # let the thread settle into its hour-long sleep
        started = time.monotonic()
        _timer.schedule(time.monotonic() + 0.01, done.set)

        assert done.wait(5)
        assert time.monotonic() - started < 2
        late.cancel()

    def test_many_wake_ups_are_never_lost(self):
        """Entries scheduled from several threads at once all fire, in deadline order."""
        fired = []
        lock = threading.Lock()
        count = 200
        all_done = threading.Event()

        def record(i):
            with lock:
                fired.append(i)
                if len(fired) == count:
                    all_done.set()

        now = time.monotonic()

        def schedule_some(offset):
            for i in range(offset, count, 4):
                _timer.schedule(now + 0.0001 * i, lambda i=i: record(i))

        threads = [threading.Thread(target=schedule_some, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert all_done.wait(10)
        assert sorted(fired) == list(range(count))

    def test_a_deadline_beyond_the_lock_timeout_limit_is_fine(self):
        """A deadline further away than the lock's longest timeout sleeps in steps, no error."""
        reported = []
        hook = sys.unraisablehook
        sys.unraisablehook = reported.append
        try:
            far = _timer.schedule(time.monotonic() + _thread.TIMEOUT_MAX * 10, lambda: None)
            done = threading.Event()
            _timer.schedule(time.monotonic() + 0.01, done.set)

            assert done.wait(5)
        finally:
            sys.unraisablehook = hook
            far.cancel()

        assert [] == reported
