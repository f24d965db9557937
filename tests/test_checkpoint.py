"""Tests for checkpoint(), ``with checkpoint():``, is_cancelled() and request_slow_path()."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from _hotpath import bodies as _bodies
from cancellable import Cancelled, CancelScope, _scope, checkpoint, is_cancelled, shield
from cancellable._scope import request_slow_path
from cancellable.testing import capture_events


class TestOutsideScopes:
    def test_checkpoint_is_a_noop(self):
        """Outside any scope, checkpoint() returns without raising."""
        for _ in range(3):
            checkpoint()

        assert _scope._CHECKPOINT_CONTEXT is checkpoint()

    def test_is_cancelled_is_false(self):
        """Outside any scope, is_cancelled() is False."""
        assert is_cancelled() is False

    def test_noop_even_while_something_is_pending(self, spawn):
        """With another thread's scope cancelled, a scope-less thread still never raises."""
        cancelled = threading.Event()
        release = threading.Event()

        def hold_a_cancelled_scope():
            with CancelScope() as scope:
                scope.cancel()
                cancelled.set()
                assert release.wait(5)
                checkpoint()

        runner = spawn(hold_a_cancelled_scope)
        assert cancelled.wait(5)
        pending = _scope._pending
        checkpoint()
        with checkpoint():
            pass
        answer = is_cancelled()
        release.set()
        runner.result()

        assert pending
        assert not answer


#: Prints whether a tracer is on, then the opcode of a loop's call to
#: checkpoint() after warming up, before and after one cancellation.
SPECIALISATION_PROBE = """
import dis, logging, sys
import structlog
from cancellable import Cancelled, CancelScope, checkpoint

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

def loop(iterations):
    for _ in iterations:
        checkpoint()

def call_op():
    ops = [i.opname for i in dis.get_instructions(loop, adaptive=True)]
    (op,) = [name for name in ops if name.startswith("CALL")]
    return op

loop(range(100))
before = call_op()
with CancelScope() as scope:
    scope.cancel()
    try:
        loop(range(100))
    except Cancelled:
        pass
loop(range(100))
print("untraced" if sys.gettrace() is None else "traced", before, call_op())
"""


def _armed():
    """Whether the next checkpoint would take the slow path."""
    return _scope._pending and all(f.__code__ is full for f, _idle, full in _scope._SWITCHED)


switching = pytest.mark.skipif(
    not _scope._SWITCH_BODIES, reason="bodies are switched on CPython 3.10-3.12 only"
)


class FakeFunction:
    """Stands in for a switched function and records every body written to it."""

    def __init__(self, code):
        self._code = code
        self.writes = []

    @property
    def __code__(self):
        return self._code

    @__code__.setter
    def __code__(self, code):
        self.writes.append(code)
        self._code = code


class TestHotPath:
    def test_full_checkpoint_reads_one_global(self):
        """checkpoint()'s full body touches only the flag, the slow path and the context object.

        This pins the hot path: anything else it looked up would cost every
        caller on every check.
        """
        _idle, full = _bodies(checkpoint)

        assert ("_pending", "_slow_checkpoint", "_CHECKPOINT_CONTEXT") == full.co_names

    @switching
    def test_idle_checkpoint_reads_only_its_context(self):
        """With nothing pending, checkpoint() runs a body that loads one name and returns it."""
        idle, _full = _bodies(checkpoint)

        assert idle is checkpoint.__code__
        assert ("_CHECKPOINT_CONTEXT",) == idle.co_names
        assert () == idle.co_varnames
        assert "checkpoint" == idle.co_name

    @switching
    def test_idle_is_cancelled_reads_nothing(self):
        """With nothing pending, is_cancelled() runs a body that only returns False."""
        idle, _full = _bodies(is_cancelled)

        assert idle is is_cancelled.__code__
        assert () == idle.co_names
        assert "is_cancelled" == idle.co_name

    @switching
    def test_bodies_follow_the_pending_flag(self):
        """Both functions run their full bodies exactly while _pending is True."""
        seen = []

        def record():
            seen.append(
                (_scope._pending, checkpoint.__code__, is_cancelled.__code__),
            )

        record()
        with CancelScope() as scope:
            record()
            scope.cancel()
            record()
            request_slow_path(record)  # runs, armed, at the next checkpoint
            with pytest.raises(Cancelled):
                checkpoint()
        record()

        (c_idle, c_full), (i_idle, i_full) = _bodies(checkpoint), _bodies(is_cancelled)
        idle, armed = (False, c_idle, i_idle), (True, c_full, i_full)
        assert [idle, idle, armed, armed, idle] == seen

    @switching
    def test_bodies_are_written_only_when_the_flag_changes(self, monkeypatch):
        """Scopes that come and go uncancelled write no body; a cancellation writes two.

        Every write makes CPython re-specialise the call sites, so entering
        and exiting scopes (which recomputes the flag each time) must not.
        """
        idle, full = _bodies(checkpoint)
        fake = FakeFunction(idle)
        monkeypatch.setattr(_scope, "_SWITCHED", ((fake, idle, full),))

        for _ in range(3):
            with CancelScope():
                checkpoint()
        quiet = list(fake.writes)
        with CancelScope() as scope:
            scope.cancel()
        with CancelScope():
            pass

        assert [] == quiet
        assert [full, idle] == fake.writes

    def test_full_bodies_alone_cancel(self, monkeypatch):
        """Without the switch (as on CPython 3.13+), the full bodies alone see cancellation."""
        for function, _idle, full in _scope._SWITCHED:
            monkeypatch.setattr(function, "__code__", full)
        monkeypatch.setattr(_scope, "_SWITCHED", ())
        seen = []
        with CancelScope() as scope:
            checkpoint()
            seen.append(is_cancelled())
            scope.cancel()
            seen.append(is_cancelled())
            checkpoint()
            seen.append("not reached")  # pragma: no cover - checkpoint() must raise

        assert [False, True] == seen
        assert scope.cancelled_caught

    @switching
    @pytest.mark.skipif(sys.version_info < (3, 11), reason="no specialising interpreter")
    def test_call_sites_specialise_again_after_a_switch(self):
        """After a cancellation came and went, a loop's call to checkpoint() is specialised again.

        CPython resets a function's version when its ``__code__`` is
        assigned; on 3.11 and 3.12 the call site re-specialises, which is why
        the switch pays there (on 3.13 it would not, see _SWITCH_BODIES).
        Runs in a fresh interpreter without coverage: CPython does not
        specialise while a tracer is installed.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")}
        run = subprocess.run(
            [sys.executable, "-c", SPECIALISATION_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

        assert 0 == run.returncode, run.stderr
        tracer, before, after = run.stdout.split()
        assert "untraced" == tracer
        assert "CALL_PY_EXACT_ARGS" == before
        assert "CALL_PY_EXACT_ARGS" == after

    def test_slow_path_not_taken_when_nothing_pending(self, monkeypatch):
        """Inside an uncancelled scope, checkpoint() does not enter the slow path."""

        def slow():
            raise AssertionError("slow path taken")

        monkeypatch.setattr(_scope, "_slow_checkpoint", slow)
        with CancelScope():
            checkpoint()
            with checkpoint():
                pass
            result = is_cancelled()

        assert not result
        assert not _scope._pending

    def test_pending_follows_live_cancelled_scopes(self):
        """_pending is set while a cancelled scope is entered and cleared when it exits."""
        states = [_scope._pending]
        with CancelScope() as outer:
            states.append(_scope._pending)
            with CancelScope() as inner:
                inner.cancel()
                states.append(_scope._pending)
                checkpoint()
            states.append(_scope._pending)
            with CancelScope() as inner:
                outer.cancel()
                states.append(_scope._pending)
                checkpoint()
        states.append(_scope._pending)

        assert [False, False, True, False, True, False] == states
        assert outer.cancelled_caught


class TestWithCheckpoint:
    def test_checks_on_entry(self):
        """``with checkpoint():`` raises before the body when already cancelled."""
        ran = []
        with CancelScope() as scope:
            scope.cancel()
            with checkpoint():
                ran.append("body")  # pragma: no cover - must not run

        assert [] == ran
        assert scope.cancelled_caught

    def test_checks_on_exit(self):
        """A cancellation during the body raises when the block ends."""
        ran = []
        with CancelScope() as scope:
            with checkpoint():
                scope.cancel()
                ran.append("body")
            ran.append("unreachable")  # pragma: no cover - must not run

        assert ["body"] == ran
        assert scope.cancelled_caught

    def test_does_not_replace_a_propagating_exception(self):
        """An exception leaving the block is not replaced by Cancelled."""
        scope = CancelScope()

        def cancel_then_fail():
            with scope, checkpoint():
                scope.cancel()
                raise KeyError("original")

        with pytest.raises(KeyError, match="original"):
            cancel_then_fail()

        assert not scope.cancelled_caught

    def test_quiet_when_not_cancelled(self):
        """Without cancellation, ``with checkpoint():`` is transparent."""
        with CancelScope() as scope, checkpoint() as value:
            pass

        assert value is None
        assert not scope.cancel_called


class TestIsCancelled:
    def test_tracks_the_innermost_scope(self):
        """is_cancelled() answers for the innermost scope, honouring shields."""
        answers = []
        with CancelScope() as outer:
            answers.append(is_cancelled())
            outer.cancel()
            answers.append(is_cancelled())
            with shield():
                answers.append(is_cancelled())
            with CancelScope():
                answers.append(is_cancelled())
            checkpoint()

        assert [False, True, False, True] == answers

    def test_does_not_raise(self):
        """is_cancelled() never raises, so a loop can wind down by hand."""
        steps = 0
        with CancelScope() as scope:
            while not is_cancelled():
                steps += 1
                if steps == 5:
                    scope.cancel()

        assert 5 == steps
        assert not scope.cancelled_caught


class TestThreadIndependence:
    def test_cancelling_thread_a_never_raises_in_thread_b(self, spawn):
        """While A's cancelled scope is open, B's checkpoints take the slow path, never raise."""
        a_cancelled = threading.Event()
        b_done = threading.Event()

        def thread_a():
            with CancelScope() as scope:
                scope.cancel("only A")
                a_cancelled.set()
                assert b_done.wait(5)
                checkpoint()
            return scope.cancelled_caught

        def thread_b():
            with CancelScope() as scope:
                assert a_cancelled.wait(5)
                saw_pending = _scope._pending
                for _ in range(1000):
                    checkpoint()
                answer = is_cancelled()
            b_done.set()
            return saw_pending, answer, scope.cancel_called

        runner_a = spawn(thread_a)
        runner_b = spawn(thread_b)

        assert (True, False, False) == runner_b.result()
        assert runner_a.result() is True

    def test_each_thread_has_its_own_stack(self, spawn):
        """Scopes entered on one thread are invisible to another."""
        entered = threading.Event()
        release = threading.Event()

        def hold():
            with CancelScope():
                entered.set()
                assert release.wait(5)

        runner = spawn(hold)
        assert entered.wait(5)
        stack = list(_scope._get_stack())
        release.set()
        runner.result()

        assert [] == stack

    def test_many_threads_cancel_only_their_own(self, spawn):
        """Of several threads, only the cancelled ones stop."""
        count = 6
        barrier = threading.Barrier(count + 1)
        go = threading.Event()
        scopes = [None] * count

        def work(index):
            with CancelScope() as scope:
                scopes[index] = scope
                barrier.wait(5)
                assert go.wait(5)
                for _ in range(200):
                    checkpoint()
                return "finished"

        runners = [spawn(work, index) for index in range(count)]
        barrier.wait(5)
        for index in range(0, count, 2):
            scopes[index].cancel()
        go.set()
        results = [runner.result() for runner in runners]

        assert [None, "finished"] * (count // 2) == results
        assert [True, False] * (count // 2) == [scope.cancelled_caught for scope in scopes]


class TestRequestSlowPath:
    def test_callback_runs_at_next_checkpoint(self):
        """The callback runs at the next checkpoint; the flag goes back down."""
        calls = []
        request_slow_path(lambda: calls.append(threading.get_ident()))
        raised_flag = _scope._pending
        checkpoint()

        assert raised_flag
        assert [threading.get_ident()] == calls
        assert not _scope._pending

    def test_flag_stays_up_while_a_callback_waits(self):
        """A scope exiting must not lower the flag while a callback is still waiting."""
        calls = []
        request_slow_path(lambda: calls.append("ran"))
        with CancelScope() as scope:
            scope.cancel()
        still_pending = _scope._pending
        checkpoint()

        assert still_pending
        assert ["ran"] == calls
        assert not _scope._pending

    def test_callback_runs_at_is_cancelled(self):
        """is_cancelled() also runs pending callbacks."""
        calls = []
        request_slow_path(lambda: calls.append("ran"))

        assert not is_cancelled()
        assert ["ran"] == calls
        assert not _scope._pending

    def test_callback_that_cancels_raises_at_the_same_checkpoint(self):
        """A callback that cancels the current scope makes that very checkpoint raise."""
        with CancelScope() as scope:
            request_slow_path(lambda: scope.cancel("deferred"))
            checkpoint()

        assert scope.cancelled_caught
        assert "deferred" == scope.cancel_reason.message
        assert not _scope._pending

    def test_failing_callback_is_reported_not_raised(self, monkeypatch):
        """A callback's exception goes to sys.unraisablehook; later callbacks still run."""
        reported = []
        calls = []
        monkeypatch.setattr(sys, "unraisablehook", reported.append)

        def fail():
            raise ValueError("bad callback")

        request_slow_path(fail)
        request_slow_path(lambda: calls.append("second"))
        checkpoint()

        assert ["second"] == calls
        assert [ValueError] == [report.exc_type for report in reported]
        assert "Exception in cancellable deferred callback" == reported[0].err_msg
        assert not _scope._pending

    @pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="needs POSIX signals")
    def test_from_a_signal_handler(self):
        """A signal handler can cancel the running scope through request_slow_path."""
        handled = threading.Event()
        box = {}

        def handler(signum, frame):
            request_slow_path(lambda: box["scope"].cancel("signal"))
            handled.set()

        previous = signal.signal(signal.SIGUSR2, handler)
        try:
            with CancelScope() as scope:
                box["scope"] = scope
                os.kill(os.getpid(), signal.SIGUSR2)
                assert handled.wait(5)
                for _ in range(1000):
                    checkpoint()
        finally:
            signal.signal(signal.SIGUSR2, previous)

        assert scope.cancelled_caught
        assert "signal" == scope.cancel_reason.message
        assert not _scope._pending

    @pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
    def test_no_wake_up_is_lost_while_scopes_come_and_go(self):
        """Signals that request the slow path mid-bookkeeping are never overwritten.

        A timer signal fires every 50 µs while this thread keeps cancelling and
        exiting scopes, which rewrites ``_pending`` and the hot-path bodies each
        time.  A handler that runs between the read and the write of that
        bookkeeping must still leave the hot path armed: every requested
        callback runs at a later checkpoint, none is left waiting behind an
        idle checkpoint.
        """
        requested = []
        ran = []
        lost = 0

        def handler(signum, frame):
            requested.append(None)
            request_slow_path(lambda: ran.append(None))

        previous = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.00005, 0.00005)
        # Captured events cost far less than printed ones, which leaves more
        # of each iteration to the bookkeeping the signals should land in.
        try:
            with capture_events():
                for _ in range(20_000):
                    with CancelScope() as scope:
                        scope.cancel()
                    # A callback waits, yet the next checkpoint would not run
                    # it?  (A signal landing between the two reads arms, never
                    # disarms, so this cannot misfire.)
                    if _scope._deferred and not _armed():
                        lost += 1
                    checkpoint()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        checkpoint()  # run what the last signals asked for

        assert len(requested) > 100  # the timer really interrupted the loop
        assert 0 == lost
        assert len(requested) == len(ran)
        assert not _scope._deferred
        assert not _scope._pending
        assert _bodies(checkpoint)[0] is checkpoint.__code__
        assert _bodies(is_cancelled)[0] is is_cancelled.__code__
