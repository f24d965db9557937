"""Tests for cleanup hooks: order, isolation, time budgets, shielding, and configure()."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import structlog.testing

import cancellable
from cancellable import (
    Cancelled,
    CancelScope,
    HookHandle,
    HookTimeoutError,
    _config,
    _hooks,
    _scope,
    checkpoint,
    current_scope,
    is_cancelled,
    on_cancel,
)
from cancellable.events import CLEANUP_FAILED, CLEANUP_OVERRAN, CLEANUP_TIMED_OUT, SCOPE_CANCELLED


def spin(limit: float = 10.0) -> None:
    """A hook that hangs in pure Python (until ``limit``, so a broken budget fails, not hangs)."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        pass


def cancel_and_check(scope: CancelScope) -> None:
    """Cancel ``scope`` and reach a checkpoint, so the Cancelled unwinds through it."""
    scope.cancel()
    checkpoint()


def unwind(scope: CancelScope, *hooks: Callable[[], object]) -> None:
    """Enter ``scope``, register ``hooks`` in that order, cancel it and reach a checkpoint."""
    with scope:
        for hook in hooks:
            on_cancel(hook)
        cancel_and_check(scope)


def unwind_from_outside(inner: CancelScope, *hooks: Callable[[], object]) -> Cancelled:
    """Like `unwind`, but cancel an enclosing scope; return the Cancelled that leaves ``inner``."""

    def run(outer: CancelScope) -> None:
        with inner:
            for hook in hooks:
                on_cancel(hook)
            cancel_and_check(outer)

    with CancelScope() as outer, pytest.raises(Cancelled) as exc_info:
        run(outer)
    return exc_info.value


class TestOrder:
    def test_last_registered_runs_first(self):
        """Hooks run in reverse order of registration."""
        ran = []
        with CancelScope() as scope:
            for name in ("first", "second", "third"):
                on_cancel(ran.append, name)
            cancel_and_check(scope)

        assert ["third", "second", "first"] == ran

    def test_arguments_are_passed(self):
        """on_cancel(fn, *args, **kwargs) calls fn(*args, **kwargs)."""
        calls = []
        with CancelScope() as scope:
            on_cancel(lambda *args, **kwargs: calls.append((args, kwargs)), 1, 2, key="value")
            cancel_and_check(scope)

        assert [((1, 2), {"key": "value"})] == calls

    def test_inner_hooks_run_before_outer_hooks(self):
        """An outer cancellation runs the inner scope's hooks, then the outer's."""
        ran = []
        with CancelScope() as outer:
            on_cancel(ran.append, "outer")
            with CancelScope():
                on_cancel(ran.append, "inner")
                cancel_and_check(outer)

        assert ["inner", "outer"] == ran

    def test_hooks_run_once(self):
        """Each hook runs exactly once, even though every checkpoint after cancel raises."""
        ran = []
        with CancelScope() as scope:
            on_cancel(ran.append, "hook")
            scope.cancel()
            for _ in range(3):
                try:
                    checkpoint()
                except Cancelled:
                    pass
            checkpoint()

        assert ["hook"] == ran

    def test_hooks_run_on_the_scope_thread(self, spawn):
        """Hooks run on the thread that owns the scope, even when another thread cancels."""
        registered = threading.Event()
        ran_on = []
        box = {}

        def work():
            with CancelScope() as scope:
                box["scope"] = scope
                on_cancel(lambda: ran_on.append(threading.get_ident()))
                registered.set()
                give_up = time.monotonic() + 5
                while time.monotonic() < give_up:
                    checkpoint()
            return threading.get_ident()

        runner = spawn(work)
        assert registered.wait(5)
        box["scope"].cancel()

        assert [runner.result()] == ran_on


class TestIsolation:
    def test_failing_hook_does_not_stop_the_others(self):
        """A hook that raises is recorded; the hooks after it still run."""
        ran = []

        def fail():
            raise ValueError("hook broke")

        with CancelScope() as scope:
            on_cancel(ran.append, "registered first")
            on_cancel(fail)
            on_cancel(ran.append, "registered last")
            cancel_and_check(scope)

        assert ["registered last", "registered first"] == ran
        assert [ValueError] == [type(error) for error in scope.cleanup_errors]
        assert scope.cancelled_caught

    def test_errors_reach_the_cancelled_and_the_scope(self):
        """Hook errors are attached to the propagating Cancelled and to the scope, in run order."""
        first = ValueError("a")
        second = KeyError("b")

        def raise_(error):
            raise error

        inner = CancelScope()
        exc = unwind_from_outside(inner, partial(raise_, second), partial(raise_, first))

        assert (first, second) == exc.hook_errors
        assert (first, second) == inner.cleanup_errors

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are 3.11+")
    def test_errors_are_noted_on_the_cancelled(self):
        """Each hook error adds a note to the Cancelled's traceback."""

        def fail():
            raise ValueError("a")

        exc = unwind_from_outside(CancelScope(), fail)

        assert ["cleanup hook failed: ValueError('a')"] == exc.__notes__

    def test_failure_is_logged(self):
        """A failing hook logs cleanup.failed with the hook and the error."""

        def fail():
            raise ValueError("hook broke")

        with structlog.testing.capture_logs() as logs, CancelScope() as scope:
            on_cancel(fail)
            cancel_and_check(scope)
        failed = [log for log in logs if log["event"] == CLEANUP_FAILED]
        exited = [log for log in logs if log["event"] == SCOPE_CANCELLED]

        assert 1 == len(failed)
        assert "warning" == failed[0]["log_level"]
        assert repr(fail) == failed[0]["hook"]
        assert "ValueError('hook broke')" == failed[0]["error"]
        assert failed[0]["exc_info"] is scope.cleanup_errors[0]
        assert (1, 1) == (exited[0]["hooks_run"], exited[0]["hook_errors"])

    def test_keyboard_interrupt_is_reraised_after_the_other_hooks(self):
        """KeyboardInterrupt from a hook propagates, but only once every hook has run.

        Regression: the scope also used to stay on the thread's stack (and the
        process-wide pending flag stayed up) when a hook re-raised.
        """
        ran = []

        def interrupt():
            raise KeyboardInterrupt

        scope = CancelScope()
        first = partial(ran.append, "registered first")
        last = partial(ran.append, "registered last")
        with pytest.raises(KeyboardInterrupt) as exc_info:
            unwind(scope, first, interrupt, last)

        assert ["registered last", "registered first"] == ran
        assert isinstance(exc_info.value.__context__, Cancelled)
        assert [] == _scope._get_stack()
        assert not _scope._pending
        assert "exited" in repr(scope)

    def test_first_fatal_exception_wins(self):
        """Of several hooks raising SystemExit or KeyboardInterrupt, the first to run wins."""

        def exit_():
            raise SystemExit(3)

        def interrupt():
            raise KeyboardInterrupt

        with pytest.raises(SystemExit) as exc_info:
            unwind(CancelScope(), interrupt, exit_)

        assert 3 == exc_info.value.code
        assert not _scope._pending


def spin_checking(limit: float = 10.0) -> None:
    """A hook that loops in pure Python with a checkpoint each turn (until ``limit``)."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        checkpoint()


@pytest.fixture
def raise_anywhere() -> Iterator[list[str]]:
    """This process lets budgets raise at an arbitrary bytecode; yields the calls of on_raised."""
    raised: list[str] = []
    take_back = _hooks.allow_async_raise(lambda: raised.append("raised"))
    yield raised
    take_back()


class TestTimeBudget:
    def test_hook_stops_at_its_checkpoint_once_its_budget_is_spent(self):
        """Without the permission, a spent budget raises at the hook's next checkpoint.

        The runner records HookTimeoutError, logs ``cleanup.timed_out``, and
        logs the overrun once (``cleanup.overran``) with the scope's log fields.
        """
        ran = []
        scope = CancelScope(hook_timeout=0.2)
        _scope.set_log_fields(scope, {"task_id": "t-1"})
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            with scope:
                on_cancel(ran.append, "after the hanging one")
                on_cancel(spin_checking)
                cancel_and_check(scope)
            elapsed = time.monotonic() - started
        timed_out = [log for log in logs if log["event"] == CLEANUP_TIMED_OUT]
        overran = [log for log in logs if log["event"] == CLEANUP_OVERRAN]

        assert not _hooks.async_raise_allowed()
        assert 0.15 <= elapsed < 3.0
        assert ["after the hanging one"] == ran
        assert [HookTimeoutError] == [type(error) for error in scope.cleanup_errors]
        assert "ran longer than its budget of 0.2s" in str(scope.cleanup_errors[0])
        assert [{"hook": repr(spin_checking), "budget_s": 0.2, "task_id": "t-1"}] == [
            {key: log[key] for key in ("hook", "budget_s", "task_id")} for log in timed_out
        ]
        assert [("warning", repr(spin_checking), "t-1")] == [
            (log["log_level"], log["hook"], log["task_id"]) for log in overran
        ]
        assert scope.cancelled_caught

    def test_cancellable_sleep_in_a_hook_is_woken_when_its_budget_is_spent(self):
        """A hook blocked in cancellable.sleep or wait stops at once when its budget is spent."""
        event = threading.Event()

        def waits():
            cancellable.wait(event, 10)

        started = time.monotonic()
        with CancelScope(hook_timeout=0.1) as scope:
            on_cancel(cancellable.sleep, 10)
            on_cancel(waits)
            cancel_and_check(scope)
        elapsed = time.monotonic() - started

        assert [HookTimeoutError, HookTimeoutError] == [type(e) for e in scope.cleanup_errors]
        assert 0.15 <= elapsed < 3.0

    def test_hook_without_checkpoint_is_never_raised_into_without_the_permission(self):
        """Outside a process that will be retired, pure Python past its budget runs to its end.

        The budget is never raised at an arbitrary bytecode there (it could
        leave a lock held for ever): the hook finishes, no error is recorded,
        and one ``cleanup.overran`` warning says what happened.
        """
        ran = []

        def slow():
            spin(0.3)
            ran.append("finished")

        with structlog.testing.capture_logs() as logs, CancelScope(hook_timeout=0.05) as scope:
            on_cancel(slow)
            cancel_and_check(scope)

        assert ["finished"] == ran
        assert () == scope.cleanup_errors
        assert 1 == sum(log["event"] == CLEANUP_OVERRAN for log in logs)
        assert not any(log["event"] == CLEANUP_TIMED_OUT for log in logs)

    def test_with_the_permission_a_hanging_hook_is_raised_into(self, raise_anywhere):
        """Where an integration allows it, pure Python is interrupted shortly after its budget.

        The integration hears of it (``on_raised``) once, before the raise,
        and no ``cleanup.overran`` warning is logged: the hook was stopped.
        """
        ran = []
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            with CancelScope(hook_timeout=0.2) as scope:
                on_cancel(ran.append, "after the hanging one")
                on_cancel(spin)
                cancel_and_check(scope)
            elapsed = time.monotonic() - started

        assert _hooks.async_raise_allowed()
        assert 0.2 + _hooks.INTERRUPT_AFTER <= elapsed < 3.0
        assert ["after the hanging one"] == ran
        assert ["raised"] == raise_anywhere
        assert [HookTimeoutError] == [type(error) for error in scope.cleanup_errors]
        assert "ran longer than its budget of 0.2s" in str(scope.cleanup_errors[0])
        assert 1 == sum(log["event"] == CLEANUP_TIMED_OUT for log in logs)
        assert not any(log["event"] == CLEANUP_OVERRAN for log in logs)

    def test_with_the_permission_a_checkpoint_still_comes_first(self, raise_anywhere):
        """A hook that reaches a checkpoint within INTERRUPT_AFTER is never raised into."""
        with CancelScope(hook_timeout=0.05) as scope:
            on_cancel(spin_checking)
            cancel_and_check(scope)
        # Outlive the second step in Python code: a stray injection would land here.
        spin(_hooks.INTERRUPT_AFTER + 0.1)

        assert [] == raise_anywhere
        assert [HookTimeoutError] == [type(error) for error in scope.cleanup_errors]

    def test_permission_taken_back(self):
        """allow_async_raise returns the function that takes the permission back."""
        take_back = _hooks.allow_async_raise(lambda: None)
        allowed = _hooks.async_raise_allowed()
        take_back()

        assert (True, False) == (allowed, _hooks.async_raise_allowed())

    def test_except_exception_in_hook_does_not_absorb_the_timeout(self, raise_anywhere):
        """HookTimeoutError is a BaseException: a hook's ``except Exception`` cannot swallow it."""
        swallowed = []

        def stubborn():
            try:
                spin()
            except Exception as exc:  # pragma: no cover - must not happen
                swallowed.append(exc)
            spin()

        with CancelScope(hook_timeout=0.1) as scope:
            on_cancel(stubborn)
            cancel_and_check(scope)

        assert [] == swallowed
        assert [HookTimeoutError] == [type(error) for error in scope.cleanup_errors]

    def test_each_hook_has_its_own_budget(self):
        """Two hanging hooks are each stopped after their own budget."""
        started = time.monotonic()
        with CancelScope(hook_timeout=0.1) as scope:
            on_cancel(spin_checking)
            on_cancel(spin_checking)
            cancel_and_check(scope)
        elapsed = time.monotonic() - started

        assert [HookTimeoutError, HookTimeoutError] == [type(e) for e in scope.cleanup_errors]
        assert 0.15 <= elapsed < 3.0

    def test_budget_comes_from_configure(self):
        """The process-wide hook_timeout applies to scopes created after configure()."""
        cancellable.configure(hook_timeout=0.1)
        started = time.monotonic()
        with CancelScope() as scope:
            on_cancel(spin_checking)
            cancel_and_check(scope)

        assert time.monotonic() - started < 3.0
        assert [HookTimeoutError] == [type(e) for e in scope.cleanup_errors]

    def test_fast_hook_is_never_interrupted_later(self, raise_anywhere):
        """A hook that finishes in time leaves no pending interruption behind."""
        with CancelScope(hook_timeout=0.05) as scope:
            on_cancel(lambda: None)
            cancel_and_check(scope)
        # Outlive the budget in Python code: a stray injection would land here.
        spin(0.2 + _hooks.INTERRUPT_AFTER)

        assert () == scope.cleanup_errors
        assert [] == raise_anywhere

    def test_budget_expiring_after_the_hook_finished_injects_nothing(self, raise_anywhere):
        """The timer losing the race against a finished hook must not interrupt anything."""
        budget = _hooks._Budget()
        budget.raise_anywhere = True
        budget.running = False
        budget.expire()
        budget.interrupt()
        # A stray injection would be raised in this thread while it runs Python code.
        spin(0.05)

        assert not budget.fired
        assert [] == raise_anywhere

    def test_own_hook_timeout_error_is_not_a_budget_expiry(self):
        """A hook that raises HookTimeoutError itself is reported as that error, unchanged."""
        mine = HookTimeoutError("raised by the hook")

        def raise_it():
            raise mine

        with CancelScope(hook_timeout=30) as scope:
            on_cancel(raise_it)
            cancel_and_check(scope)

        assert (mine,) == scope.cleanup_errors

    def test_no_budget(self):
        """hook_timeout=None runs hooks without a timer."""
        ran = []
        with CancelScope(hook_timeout=None) as scope:
            on_cancel(ran.append, "ran")
            cancel_and_check(scope)

        assert ["ran"] == ran
        assert () == scope.cleanup_errors

    def test_run_hooks_directly(self):
        """run_hooks returns the errors of the hooks it ran, in order."""
        error = ValueError("x")

        def fail():
            raise error

        with CancelScope() as scope:
            handles = [HookHandle(scope, fail, (), {}), HookHandle(scope, lambda: None, (), {})]

        assert (error,) == _hooks.run_hooks(handles, None, None, _scope._budget_scope)
        assert () == _hooks.run_hooks([], 1.0, None, _scope._budget_scope)


class TestLateRegistration:
    def test_registered_after_cancel_runs(self):
        """A hook registered after the scope was cancelled runs when it unwinds."""
        ran = []
        with CancelScope() as scope:
            scope.cancel()
            on_cancel(ran.append, "late")
            checkpoint()

        assert ["late"] == ran

    def test_registered_while_handling_the_cancelled(self):
        """A hook registered in an ``except Cancelled`` block still runs."""
        ran = []
        with CancelScope() as scope:
            scope.cancel()
            try:
                checkpoint()
            except Cancelled:
                on_cancel(ran.append, "in except")
                raise

        assert ["in except"] == ran


class TestRemove:
    def test_removed_hook_does_not_run(self):
        """handle.remove() unregisters the hook."""
        ran = []
        with CancelScope() as scope:
            handle = on_cancel(ran.append, "removed")
            on_cancel(ran.append, "kept")
            handle.remove()
            handle.remove()
            cancel_and_check(scope)

        assert ["kept"] == ran

    def test_remove_after_running_is_harmless(self):
        """Removing a hook that already ran does nothing."""
        ran = []
        with CancelScope() as scope:
            handle = on_cancel(ran.append, "ran")
            cancel_and_check(scope)
        handle.remove()

        assert ["ran"] == ran

    def test_handle_fields_and_repr(self):
        """The handle exposes the scope, the function and its arguments."""

        def hook(*args, **kwargs):
            pass

        with CancelScope() as scope:
            handle = on_cancel(hook, 1, key=2)

        assert (scope, hook, (1,), {"key": 2}) == (
            handle.scope,
            handle.fn,
            handle.args,
            handle.kwargs,
        )
        assert f"<HookHandle {hook!r}>" == repr(handle)


class TestWhenHooksDoNotRun:
    def test_normal_exit(self):
        """Hooks are dropped when the scope exits normally."""
        ran = []
        with CancelScope():
            on_cancel(ran.append, "hook")

        assert [] == ran

    def test_cancelled_but_never_checked(self):
        """A cancelled scope that exits without a Cancelled passing through runs no hooks."""
        ran = []
        with CancelScope() as scope:
            on_cancel(ran.append, "hook")
            scope.cancel()

        assert [] == ran

    def test_other_exception(self):
        """An ordinary exception leaving the scope does not run the hooks."""
        ran = []

        def fail_with_a_hook():
            with CancelScope():
                on_cancel(ran.append, "hook")
                raise ValueError("not a cancellation")

        with pytest.raises(ValueError, match="not a cancellation"):
            fail_with_a_hook()

        assert [] == ran


class TestHooksAreShielded:
    def test_checkpoint_in_hook_does_not_raise(self):
        """Inside a hook the cancellation is hidden: checkpoints pass, is_cancelled is False."""
        seen = []

        def hook():
            checkpoint()
            seen.append((is_cancelled(), current_scope().shield))

        with CancelScope() as outer:
            with CancelScope() as inner:
                on_cancel(hook)
                cancel_and_check(inner)
            outer.cancel()
            on_cancel(hook)
            checkpoint()

        assert [(False, True), (False, True)] == seen


class TestValidation:
    @pytest.mark.parametrize("fn", [None, 42, "print"])
    def test_hook_must_be_callable(self, fn):
        """on_cancel() refuses a non-callable."""
        with pytest.raises(TypeError, match="on_cancel\\(\\) needs a callable"), CancelScope():
            on_cancel(fn)

    def test_outside_any_scope(self):
        """on_cancel() outside a scope explains that nothing could run the hook."""
        with pytest.raises(RuntimeError, match="outside any cancel scope"):
            on_cancel(print)


class TestConfigure:
    def test_default(self):
        """The default hook budget is 30 seconds."""
        assert 30.0 == _config.DEFAULT_HOOK_TIMEOUT == _config.get_hook_timeout()

    def test_set_and_reset(self):
        """configure() changes the budget; reset_defaults() puts it back; no argument, no change."""
        cancellable.configure(hook_timeout=5)
        configured = _config.get_hook_timeout()
        _config.reset_defaults()
        reset = _config.get_hook_timeout()
        cancellable.configure(hook_timeout=None)
        unbounded = _config.get_hook_timeout()
        cancellable.configure()

        assert (5.0, 30.0, None, None) == (configured, reset, unbounded, _config.get_hook_timeout())

    @pytest.mark.parametrize(
        ("value", "error", "match"),
        [
            (-1, ValueError, "non-negative"),
            (float("nan"), ValueError, "non-negative"),
            (math.inf, ValueError, "finite"),
            (True, TypeError, "number of seconds, got bool"),
            ("5", TypeError, "number of seconds, got str"),
        ],
    )
    def test_bad_values(self, value, error, match):
        """configure() rejects bad budgets and keeps the old one."""
        with pytest.raises(error, match=match):
            cancellable.configure(hook_timeout=value)

        assert 30.0 == _config.get_hook_timeout()


class TestOtherThreadsDuringCleanup:
    """While one thread's hooks run, the other threads' checkpoints stay on the fast path."""

    def test_pending_drops_while_hooks_run_and_comes_back(self):
        """Inside a hook the flag is down (nothing else pending); the scope still exits cleanly."""
        seen = []

        def hook():
            seen.append((_scope._pending, _scope._cancelled_live))
            checkpoint()  # under the hooks' shield: must not raise

        outer = CancelScope()
        inner = CancelScope()
        with outer:
            with inner:
                on_cancel(hook)
                cancel_and_check(outer)
            # The inner scope's Cancelled belongs to the outer scope: after the
            # inner scope exited, the outer one counts again.
            assert _scope._pending
            assert 1 == _scope._cancelled_live
        assert [(False, 0)] == seen
        assert outer.cancelled_caught
        assert not _scope._pending
        assert 0 == _scope._cancelled_live

    def test_other_thread_sees_nothing_pending_during_cleanup(self):
        """Another thread checking while a hook runs finds the flag down, and never raises."""
        in_hook = threading.Event()
        release = threading.Event()
        observed: list[bool] = []

        def hook():
            in_hook.set()
            assert release.wait(10)

        def other():
            assert in_hook.wait(10)
            observed.append(_scope._pending)
            with CancelScope():
                for _ in range(1000):
                    checkpoint()
            release.set()

        thread = threading.Thread(target=other)
        thread.start()
        scope = CancelScope()
        unwind(scope, hook)
        thread.join(10)
        assert [False] == observed
        assert scope.cancelled_caught

    def test_cancel_arriving_during_cleanup_still_counts(self):
        """A scope below the shield cancelled while hooks run raises the flag, and stays counted."""
        seen = []
        outer = CancelScope()

        def hook():
            outer.cancel("late")
            seen.append((_scope._pending, _scope._cancelled_live))
            checkpoint()  # still shielded

        inner = CancelScope()
        with outer:
            with pytest.raises(Cancelled):
                unwind(inner, hook)
            assert 1 == _scope._cancelled_live
            with pytest.raises(Cancelled):
                checkpoint()
        assert [(True, 1)] == seen
        assert 0 == _scope._cancelled_live
        assert not _scope._pending

    def test_counts_restored_when_a_hook_raises_keyboard_interrupt(self):
        """A fatal exception out of the hooks leaves no scope set aside or counted twice."""
        outer = CancelScope()

        def interrupt():
            raise KeyboardInterrupt

        def run() -> None:
            with outer, CancelScope():
                on_cancel(interrupt)
                cancel_and_check(outer)

        with pytest.raises(KeyboardInterrupt):
            run()
        assert [] == _scope._get_stack()
        assert 0 == _scope._cancelled_live
        assert not _scope._pending
