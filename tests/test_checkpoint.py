"""Tests for checkpoint(), ``with checkpoint():``, is_cancelled() and request_slow_path()."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import sys
import threading

import pytest

from cancellable import (
    Cancelled,
    CancelScope,
    _scope,
    cancellable,
    checkpoint,
    current_scope,
    is_cancelled,
)
from cancellable._scope import request_slow_path
from cancellable.testing import capture_events


class TestOutsideScopes:
    def test_checkpoint_is_a_noop(self):
        """Outside any scope, checkpoint() returns without raising."""
        for _ in range(3):
            checkpoint()

        assert checkpoint() is checkpoint()

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
        answer = is_cancelled()
        release.set()
        runner.result()

        assert pending
        assert not answer


class TestHotPath:
    def test_slow_path_not_taken_when_nothing_pending(self, monkeypatch):
        """Inside an uncancelled scope, checkpoint() does not enter the slow path."""

        def slow():
            raise AssertionError("slow path taken")

        monkeypatch.setattr(_scope, "_slow_checkpoint", slow)
        with CancelScope():
            checkpoint()
            result = is_cancelled()

        assert not result
        assert not _scope._pending

    def test_shared_work_follows_deferred_work_and_probes(self):
        """_shared_work is up exactly while a deferred callback or a probe waits."""
        states = [_scope._shared_work]
        request_slow_path(lambda: states.append(_scope._shared_work))
        states.append(_scope._shared_work)
        checkpoint()  # runs the callback, which records the flag while it runs
        states.append(_scope._shared_work)
        with CancelScope() as scope:
            scope.cancel()
            states.append(_scope._shared_work)  # a cancelled scope is not shared work
        states.append(_scope._shared_work)

        assert [False, True, True, False, False, False] == states

    def test_innermost_follows_the_stack(self):
        """current_scope() is the top of this thread's stack through nesting and exits."""
        seen = [current_scope()]
        with CancelScope() as outer:
            seen.append(current_scope())
            with CancelScope() as inner:
                seen.append(current_scope())
            seen.append(current_scope())
        seen.append(current_scope())

        assert [None, outer, inner, outer, None] == seen

    def test_innermost_is_reset_when_scopes_are_abandoned(self):
        """Misnested exits close the abandoned scopes, and the innermost scope follows."""
        outer = CancelScope()
        inner = CancelScope()
        outer.__enter__()
        inner.__enter__()
        with pytest.raises(RuntimeError, match="out of order"):
            outer.__exit__(None, None, None)
        after = current_scope()
        inner.__exit__(None, None, None)  # silent: already closed by the abandon

        assert after is None
        assert [] == _scope._get_stack()

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
            ran.append("after the block")  # pragma: no cover - must not run

        assert ["body"] == ran
        assert scope.cancelled_caught

    def test_checks_on_exit_for_another_threads_cancel(self, spawn):
        """A cancel from another thread during the body raises when the block ends."""
        ran = []
        with CancelScope() as scope:
            with checkpoint():
                spawn(scope.cancel, "from another thread").result()
                ran.append("body")
            ran.append("after the block")  # pragma: no cover - must not run

        assert ["body"] == ran
        assert scope.cancelled_caught
        assert "from another thread" == scope.cancel_reason.message

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
        """Without cancellation, ``with checkpoint():`` runs the body and binds None."""
        ran = []
        with CancelScope() as scope, checkpoint() as value:
            ran.append("body")

        assert ["body"] == ran
        assert value is None
        assert not scope.cancel_called

    def test_noop_outside_any_scope(self, spawn):
        """Outside any scope the block runs and exits quietly, even while another
        thread's cancelled scope keeps the pending flag up."""
        cancelled = threading.Event()
        release = threading.Event()

        def hold_a_cancelled_scope():
            with CancelScope() as scope:
                scope.cancel()
                cancelled.set()
                assert release.wait(5)

        runner = spawn(hold_a_cancelled_scope)
        assert cancelled.wait(5)
        ran = []
        try:
            with checkpoint():
                ran.append("pending" if _scope._pending else "idle")
            ran.append("after")
        finally:
            release.set()
            runner.result()

        assert ["pending", "after"] == ran

    def test_shielded_block_is_quiet(self):
        """Inside a shield, an outer cancellation does not raise at entry or exit."""
        ran = []
        with CancelScope() as outer:
            outer.cancel()
            with CancelScope(shield=True), checkpoint():
                ran.append("body")
            ran.append("after the shield")
            checkpoint()

        assert ["body", "after the shield"] == ran
        assert outer.cancelled_caught


class TestPendingPathEdges:
    """The "nothing for this thread" test inside checkpoint(), case by case."""

    @staticmethod
    def _hold_cancelled_scope(spawn):
        # Another thread's cancelled scope keeps the flag up until released.
        cancelled = threading.Event()
        release = threading.Event()

        def hold():
            with CancelScope() as scope:
                scope.cancel("another thread")
                cancelled.set()
                assert release.wait(5)

        runner = spawn(hold)
        assert cancelled.wait(5)
        return release, runner

    def test_attribute_error_from_inside_the_test_propagates(self, monkeypatch, spawn):
        """An AttributeError raised during the test (as a signal handler may) is not
        mistaken for a thread's first use: it propagates and the stack stays intact."""

        class RaisingVar:
            def get(self):
                raise AttributeError("raised by a signal handler")

        release, runner = self._hold_cancelled_scope(spawn)
        try:
            with CancelScope() as mine:
                monkeypatch.setattr(_scope, "_bindings_live", 1)
                monkeypatch.setattr(_scope, "_bound", RaisingVar())
                with pytest.raises(AttributeError, match="signal handler"):
                    checkpoint()
                monkeypatch.undo()
                stack = list(_scope._get_stack())
                innermost = current_scope()
        finally:
            release.set()
            runner.result()

        assert [mine] == stack
        assert mine is innermost

    def test_bound_coroutine_answers_without_the_slow_path(self, monkeypatch, spawn):
        """In a @cancellable coroutine, while another thread's scope is cancelled, the
        checkpoint answers from the bound scope in place; cancelling that scope raises."""
        slow_calls = []
        real_slow = _scope._slow_checkpoint

        def counting_slow():
            slow_calls.append(1)
            real_slow()

        @cancellable
        async def work():
            for _ in range(50):
                checkpoint()
            quiet = len(slow_calls)
            scope = current_scope()
            assert scope is not None
            scope.cancel("the coroutine's own")
            checkpoint()
            return quiet  # pragma: no cover - the checkpoint raised

        release, runner = self._hold_cancelled_scope(spawn)
        monkeypatch.setattr(_scope, "_slow_checkpoint", counting_slow)
        try:
            with pytest.raises(Cancelled, match="the coroutine's own"):
                asyncio.run(work())
        finally:
            release.set()
            runner.result()

        assert [1] == slow_calls

    def test_first_checkpoint_of_a_thread_in_a_bound_context_raises(self):
        """A fresh thread running in a cancelled coroutine's context: its very first
        library call, a checkpoint, raises Cancelled."""
        seen = []

        def helper():
            try:
                checkpoint()
            except Cancelled as exc:
                seen.append(str(exc))

        @cancellable
        async def work():
            scope = current_scope()
            assert scope is not None
            scope.cancel("stop the fresh thread")
            thread = threading.Thread(target=contextvars.copy_context().run, args=(helper,))
            thread.start()
            thread.join(5)
            assert not thread.is_alive()
            checkpoint()

        with pytest.raises(Cancelled):
            asyncio.run(work())

        assert 1 == len(seen)
        assert "stop the fresh thread" in seen[0]


class TestIsCancelled:
    def test_tracks_the_innermost_scope(self):
        """is_cancelled() answers for the innermost scope, honouring shields."""
        answers = []
        with CancelScope() as outer:
            answers.append(is_cancelled())
            outer.cancel()
            answers.append(is_cancelled())
            with CancelScope(shield=True):
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

    def test_first_checkpoint_of_a_thread_runs_shared_work(self, spawn):
        """A thread's very first checkpoint still runs work queued for every thread."""
        ran_on = []

        def fresh_thread():
            checkpoint()
            return threading.get_ident()

        request_slow_path(lambda: ran_on.append(threading.get_ident()))
        fresh_ident = spawn(fresh_thread).result()

        assert [fresh_ident] == ran_on
        assert not _scope._pending

    def test_other_threads_answer_without_the_slow_path(self, spawn, monkeypatch):
        """While A's scope is cancelled, B's checkpoints return without calling the slow path.

        This is the cross-thread case the hot path answers in place: inside a
        live scope, outside any scope, and on a thread that never used the
        library before (whose first checkpoint sets its thread-local state up).
        """
        a_cancelled = threading.Event()
        release = threading.Event()
        slow_calls = []
        real_slow = _scope._slow_checkpoint

        def counting_slow():
            slow_calls.append(threading.get_ident())
            real_slow()

        def thread_a():
            with CancelScope() as scope:
                scope.cancel("only A")
                a_cancelled.set()
                assert release.wait(5)
                checkpoint()

        def fresh_thread():
            checkpoint()
            return is_cancelled()

        runner_a = spawn(thread_a)
        assert a_cancelled.wait(5)
        monkeypatch.setattr(_scope, "_slow_checkpoint", counting_slow)
        pending = _scope._pending
        fresh_answer = spawn(fresh_thread).result()
        checkpoint()
        with CancelScope() as mine:
            for _ in range(100):
                checkpoint()
            answer = is_cancelled()
        own_thread_calls = list(slow_calls)
        release.set()
        runner_a.result()

        assert pending
        assert not fresh_answer
        assert not answer
        assert not mine.cancel_called
        # Neither the fresh thread nor this one went to the slow path.
        assert [] == own_thread_calls

    def test_cancelling_another_threads_scope_reaches_it(self, spawn):
        """A cancel from this thread reaches a scope another thread is looping in."""
        entered = threading.Event()
        box = {}

        def loop():
            with CancelScope() as scope:
                box["scope"] = scope
                entered.set()
                while True:
                    checkpoint()
            return scope.cancelled_caught

        runner = spawn(loop)
        assert entered.wait(5)
        box["scope"].cancel("from outside")

        assert runner.result() is True

    def test_deferred_work_runs_on_a_live_thread_while_another_is_cancelled(self, spawn):
        """Deferred work still runs at the next checkpoint of a thread with nothing to raise."""
        a_cancelled = threading.Event()
        release = threading.Event()
        ran = []

        def thread_a():
            with CancelScope() as scope:
                scope.cancel()
                a_cancelled.set()
                assert release.wait(5)
                checkpoint()

        runner_a = spawn(thread_a)
        assert a_cancelled.wait(5)
        with CancelScope():
            request_slow_path(lambda: ran.append(threading.get_ident()))
            checkpoint()
        release.set()
        runner_a.result()

        assert [threading.get_ident()] == ran

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

        A timer signal fires every 200 µs while this thread keeps cancelling and
        exiting scopes, which rewrites ``_pending`` and ``_shared_work`` each
        time.  A handler that runs between the read and the write of that
        bookkeeping must still leave both flags up: every requested callback
        runs at a later checkpoint, none is left waiting behind a checkpoint
        that returns at once.
        """
        requested = []
        ran = []
        lost = 0

        def handler(signum, frame):
            requested.append(None)
            request_slow_path(lambda: ran.append(None))

        previous = signal.signal(signal.SIGALRM, handler)
        # Every 200 µs: often enough to land in the bookkeeping thousands of
        # times, yet slower than the handler on a loaded machine (at 50 µs
        # handlers nested until a RecursionError dropped a request).
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
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
                    if _scope._deferred and not (_scope._pending and _scope._shared_work):
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
        assert not _scope._shared_work
