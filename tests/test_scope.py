"""Tests for cancel scopes: nesting, shields, deadlines, reasons, misuse, events."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Generator

import pytest
import structlog.testing

import cancellable
from cancellable import (
    Cancelled,
    CancelReason,
    CancelScope,
    TooSlowError,
    _scope,
    _timer,
    checkpoint,
    current_scope,
    fail_after,
    fail_at,
    is_cancelled,
    move_on_after,
    move_on_at,
)
from cancellable.events import CANCEL_OBSERVED, CANCEL_REQUESTED, SCOPE_CANCELLED


def checkpoint_until_cancelled(limit: float = 5.0) -> None:
    """Call checkpoint() in a loop, as real work does, until it raises."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        checkpoint()
    raise AssertionError(f"checkpoint() did not raise within {limit}s")


class TestNesting:
    def test_scope_catches_its_own_cancellation(self):
        """The cancelled scope absorbs its Cancelled; code after the block runs."""
        after = []
        with CancelScope() as outer:
            with CancelScope() as inner:
                inner.cancel("stop inner")
                checkpoint()
                after.append("unreachable")
            after.append("after inner")
            checkpoint()

        assert ["after inner"] == after
        assert inner.cancelled_caught
        assert not outer.cancelled_caught
        assert not outer.cancel_called

    def test_outer_cancellation_passes_through_inner(self):
        """A Cancelled caused by the outer scope leaves the inner one and is caught outside."""
        after = []
        with CancelScope() as outer:
            with CancelScope() as inner:
                outer.cancel("stop outer")
                checkpoint()
            after.append("unreachable")

        assert [] == after
        assert not inner.cancelled_caught
        assert outer.cancelled_caught
        assert not inner.cancel_called

    def test_both_cancelled_outer_reason_and_outer_catches(self):
        """With inner and outer cancelled, the outer's reason is raised and the outer catches."""
        with CancelScope() as outer, CancelScope() as inner:
            inner.cancel("inner")
            outer.cancel("outer")
            with pytest.raises(Cancelled) as exc_info:
                checkpoint()
            raise exc_info.value

        assert "outer" == exc_info.value.reason.message
        assert not inner.cancelled_caught
        assert outer.cancelled_caught

    def test_three_levels_middle_catches(self):
        """Cancelling the middle of three scopes unwinds the innermost and stops at the middle."""
        with CancelScope() as outer:
            with CancelScope() as middle, CancelScope() as inner:
                middle.cancel()
                checkpoint()
            checkpoint()

        assert (False, True, False) == (
            outer.cancelled_caught,
            middle.cancelled_caught,
            inner.cancelled_caught,
        )

    def test_scope_entered_inside_cancelled_scope_is_cancelled(self):
        """A scope entered after its parent was cancelled sees the cancellation at once."""
        with CancelScope() as outer:
            outer.cancel()
            with CancelScope() as inner:
                assert is_cancelled()
                checkpoint()

        assert outer.cancelled_caught
        assert not inner.cancelled_caught

    def test_cancelled_before_entering(self):
        """A scope cancelled before its block starts raises at the first checkpoint."""
        scope = CancelScope()
        scope.cancel("early")
        reached = []
        with scope:
            reached.append("body")
            checkpoint()
            reached.append("unreachable")

        assert ["body"] == reached
        assert scope.cancelled_caught
        assert "early" == scope.cancel_reason.message

    def test_cancelled_without_checkpoint_exits_normally(self):
        """A cancelled scope whose body never checks exits without catching anything."""
        with CancelScope() as scope:
            scope.cancel()

        assert scope.cancel_called
        assert not scope.cancelled_caught

    def test_other_exceptions_pass_through_a_cancelled_scope(self):
        """An ordinary exception is not absorbed, even by a cancelled scope."""
        scope = CancelScope()

        def cancel_then_fail():
            with scope:
                scope.cancel()
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            cancel_then_fail()

        assert not scope.cancelled_caught

    def test_cancelled_from_unrelated_scope_passes_through(self):
        """A Cancelled the scope did not cause (raised by hand) is not absorbed."""
        with pytest.raises(Cancelled), CancelScope() as scope:
            raise Cancelled(CancelReason(message="by hand"))

        assert not scope.cancelled_caught

    def test_current_scope_follows_the_stack(self):
        """current_scope() is the innermost entered scope, None outside."""
        seen = [current_scope()]
        with CancelScope() as outer:
            seen.append(current_scope())
            with CancelScope() as inner:
                seen.append(current_scope())
            seen.append(current_scope())
        seen.append(current_scope())

        assert [None, outer, inner, outer, None] == seen

    def test_cancel_from_another_thread(self, spawn):
        """cancel() from another thread makes the owner's next checkpoint raise."""
        entered = threading.Event()
        box = {}

        def work():
            with CancelScope() as scope:
                box["scope"] = scope
                entered.set()
                checkpoint_until_cancelled()
            return scope.cancelled_caught

        runner = spawn(work)
        assert entered.wait(5)
        box["scope"].cancel("from main")

        assert runner.result() is True
        assert "from main" == box["scope"].cancel_reason.message


class TestShield:
    def test_shield_hides_outer_cancellation(self):
        """Inside a shield, checkpoints ignore a cancelled enclosing scope."""
        with CancelScope() as outer:
            outer.cancel()
            with CancelScope(shield=True) as shielded:
                checkpoint()
                checked = is_cancelled()
            with pytest.raises(Cancelled):
                checkpoint()

        assert shielded.shield
        assert not checked
        assert not shielded.cancelled_caught

    def test_shield_keyword(self):
        """Leaving a shield, the enclosing cancellation raises at the next checkpoint."""
        with CancelScope() as outer:
            outer.cancel()
            with CancelScope(shield=True):
                checkpoint()
            reached = True
            checkpoint()

        assert reached
        assert outer.cancelled_caught

    def test_shielded_scope_own_cancel_still_works(self):
        """A shield hides only enclosing scopes; cancelling the shield itself raises."""
        with CancelScope() as outer:
            outer.cancel("outer")
            with CancelScope(shield=True) as shielded:
                shielded.cancel("own")
                with pytest.raises(Cancelled) as exc_info:
                    checkpoint()
                raise exc_info.value
            after_shield = True
            checkpoint()

        assert "own" == exc_info.value.reason.message
        assert shielded.cancelled_caught
        assert after_shield
        assert outer.cancelled_caught

    def test_scope_inside_shield_is_protected(self):
        """Unshielded scopes nested in a shield do not see cancellation outside the shield."""
        with CancelScope() as outer:
            outer.cancel()
            with CancelScope(shield=True), CancelScope():
                checkpoint()
                seen = is_cancelled()
            checkpoint()

        assert not seen
        assert outer.cancelled_caught

    def test_toggling_shield_while_entered(self):
        """Setting .shield while entered takes effect at the next checkpoint."""
        states = []
        with CancelScope() as outer:
            outer.cancel()
            with CancelScope() as inner:
                states.append(is_cancelled())
                inner.shield = True
                states.append(is_cancelled())
                checkpoint()
                inner.shield = False
                states.append(is_cancelled())
                checkpoint()

        assert [True, False, True] == states
        assert outer.cancelled_caught
        assert not inner.cancelled_caught

    def test_toggling_shield_reaches_nested_scopes(self):
        """Shielding a scope also un-cancels the scopes entered inside it."""
        with CancelScope() as outer:
            outer.cancel()
            with CancelScope() as middle, CancelScope():
                before = is_cancelled()
                middle.shield = True
                after = is_cancelled()
                middle.shield = False
            checkpoint()

        assert (True, False) == (before, after)
        assert outer.cancelled_caught

    def test_shield_set_before_entering(self):
        """The shield property can be set on a scope that was not entered yet."""
        scope = CancelScope()
        scope.shield = True
        with CancelScope() as outer:
            outer.cancel()
            with scope:
                checkpoint()
            checkpoint()

        assert scope.shield
        assert outer.cancelled_caught

    def test_shield_must_be_bool(self):
        """shield accepts only a bool, in the constructor and the setter."""
        scope = CancelScope()

        with pytest.raises(TypeError, match="shield must be a bool, got int"):
            CancelScope(shield=1)
        with pytest.raises(TypeError, match="shield must be a bool, got str"):
            scope.shield = "yes"
        assert not scope.shield

    def test_toggling_shield_from_another_thread_never_breaks_checkpoint(self, spawn):
        """Regression: un-cancelling via .shield from another thread mid-checkpoint.

        checkpoint() used to read the scope's flag and then its reason; a
        shield set in between made it fail an internal assertion.
        """
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        stop = threading.Event()
        ready = threading.Event()
        box = {}

        def toggle():
            assert ready.wait(5)
            scope = box["scope"]
            while not stop.is_set():
                scope.shield = not scope.shield

        def work():
            unexpected = []
            with CancelScope() as outer:
                outer.cancel()
                with CancelScope(shield=True) as inner:
                    box["scope"] = inner
                    ready.set()
                    end = time.monotonic() + 1.0
                    while time.monotonic() < end:
                        try:
                            checkpoint()
                        except Cancelled:
                            pass
                        except BaseException as exc:
                            unexpected.append(exc)
                    stop.set()
                    inner.shield = True
            return unexpected

        try:
            toggler = spawn(toggle)
            errors = spawn(work).result(timeout=30)
            toggler.result()
        finally:
            stop.set()
            sys.setswitchinterval(interval)

        assert [] == errors


class TestDeadlines:
    def test_move_on_after(self):
        """move_on_after cancels the block at its deadline; execution continues after it."""
        started = time.monotonic()
        with move_on_after(0.05) as scope:
            checkpoint_until_cancelled()
        elapsed = time.monotonic() - started

        assert scope.cancelled_caught
        assert "deadline" == scope.cancel_reason.source
        assert 0.04 <= elapsed < 2.0

    def test_move_on_after_not_reached(self):
        """A deadline that has not passed leaves the block alone."""
        with move_on_after(60) as scope:
            checkpoint()

        assert not scope.cancel_called
        assert not scope.cancelled_caught

    def test_move_on_at(self):
        """move_on_at takes an absolute time.monotonic() deadline."""
        deadline = time.monotonic() + 0.05
        with move_on_at(deadline) as scope:
            checkpoint_until_cancelled()

        assert deadline == scope.deadline
        assert scope.cancelled_caught

    def test_fail_after_raises_too_slow(self):
        """fail_after turns an expired deadline into TooSlowError, caused by the Cancelled."""
        with pytest.raises(TooSlowError) as exc_info, fail_after(0.05):
            checkpoint_until_cancelled()

        assert isinstance(exc_info.value.__cause__, Cancelled)
        assert "deadline" == exc_info.value.__cause__.reason.source

    def test_fail_at_raises_too_slow(self):
        """fail_at is fail_after with an absolute deadline."""
        with pytest.raises(TooSlowError), fail_at(time.monotonic() - 1):
            checkpoint()

    def test_fail_after_in_time(self):
        """fail_after does nothing when the block finishes in time."""
        with fail_after(60) as scope:
            checkpoint()

        assert not scope.cancel_called

    def test_fail_after_manual_cancel_moves_on(self):
        """A fail_after scope cancelled by hand (not by its deadline) just moves on."""
        with fail_after(60) as scope:
            scope.cancel("by hand")
            checkpoint()

        assert scope.cancelled_caught

    def test_fail_after_lets_outer_cancellation_through(self):
        """An enclosing scope's cancellation passes through fail_after untouched."""
        with CancelScope() as outer, fail_after(60):
            outer.cancel()
            checkpoint()

        assert outer.cancelled_caught

    def test_tightest_deadline_wins_inner(self):
        """When the inner deadline is sooner, the inner scope fires and catches."""
        with move_on_after(60) as outer:
            with move_on_after(0.05) as inner:
                checkpoint_until_cancelled()
            checkpoint()

        assert inner.cancelled_caught
        assert not outer.cancel_called

    def test_tightest_deadline_wins_outer(self):
        """When the outer deadline is sooner, it fires through the inner scope."""
        with move_on_after(0.05) as outer, move_on_after(60) as inner:
            checkpoint_until_cancelled()

        assert outer.cancelled_caught
        assert not inner.cancel_called
        assert not inner.cancelled_caught

    def test_deadline_setter_while_entered(self):
        """Setting a deadline on an entered scope arms it."""
        with CancelScope() as scope:
            assert math.inf == scope.deadline
            scope.deadline = time.monotonic() + 0.05
            checkpoint_until_cancelled()

        assert "deadline" == scope.cancel_reason.source
        assert scope.cancelled_caught

    def test_deadline_setter_in_the_past_cancels_at_once(self):
        """A deadline set in the past cancels before the setter returns."""
        with CancelScope() as scope:
            scope.deadline = time.monotonic() - 1
            cancelled = scope.cancel_called
            checkpoint()

        assert cancelled
        assert scope.cancelled_caught

    def test_deadline_in_the_past_at_construction(self):
        """A scope created with a past deadline is cancelled when entered."""
        with CancelScope(deadline=time.monotonic() - 1) as scope:
            assert is_cancelled()
            checkpoint()

        assert "deadline" == scope.cancel_reason.source
        assert scope.cancelled_caught

    def test_move_on_after_zero(self):
        """move_on_after(0) cancels at the first checkpoint."""
        with move_on_after(0) as scope:
            checkpoint()

        assert scope.cancelled_caught

    def test_disarming_a_deadline(self):
        """Setting the deadline to inf disarms a pending deadline."""
        with CancelScope() as scope:
            scope.deadline = time.monotonic() + 0.05
            scope.deadline = math.inf
            threading.Event().wait(0.15)
            checkpoint()

        assert not scope.cancel_called

    def test_moving_a_deadline_later(self):
        """Re-setting the deadline replaces the earlier one."""
        with CancelScope() as scope:
            scope.deadline = time.monotonic() + 0.05
            scope.deadline = time.monotonic() + 60
            threading.Event().wait(0.15)
            checkpoint()

        assert not scope.cancel_called

    def test_deadline_set_before_entering_arms_on_enter(self):
        """A deadline given to a scope that is not yet entered is armed by entering it."""
        scope = CancelScope()
        scope.deadline = time.monotonic() - 1
        not_yet = scope.cancel_called
        with scope:
            checkpoint()

        assert not not_yet
        assert scope.cancelled_caught

    def test_deadline_set_after_exit_does_nothing(self):
        """Setting the deadline of an exited scope does not cancel it."""
        with CancelScope() as scope:
            pass
        scope.deadline = time.monotonic() - 1

        assert not scope.cancel_called

    def test_deadline_after_manual_cancel_is_ignored(self):
        """A deadline set on an already cancelled scope does not change the reason."""
        with CancelScope() as scope:
            scope.cancel("manual")
            scope.deadline = time.monotonic() - 1
            checkpoint()

        assert "manual" == scope.cancel_reason.source

    def test_deadline_does_not_fire_after_exit(self):
        """A scope that exited before its deadline is never cancelled by it."""
        with CancelScope(deadline=time.monotonic() + 0.05) as scope:
            pass
        threading.Event().wait(0.15)

        assert not scope.cancel_called

    @pytest.mark.parametrize(
        ("value", "error"),
        [(float("nan"), ValueError), (True, TypeError), ("1", TypeError), (None, TypeError)],
    )
    def test_deadline_validation(self, value, error):
        """A deadline must be a number and not NaN, in the constructor and the setter."""
        scope = CancelScope()

        with pytest.raises(error, match="deadline"):
            CancelScope(deadline=value)
        with pytest.raises(error, match="deadline"):
            scope.deadline = value
        with pytest.raises(error, match="deadline"):
            fail_at(value)

    @pytest.mark.parametrize(
        ("value", "error"),
        [(-1, ValueError), (float("nan"), ValueError), (math.inf, ValueError), (True, TypeError)],
    )
    @pytest.mark.parametrize("function", [move_on_after, fail_after])
    def test_relative_timeout_validation(self, function, value, error):
        """move_on_after and fail_after reject negative, NaN, infinite and bool durations."""
        with pytest.raises(error, match="seconds"):
            function(value)

    def test_deadline_negative_infinity_is_already_expired(self):
        """-inf is a valid deadline that has always passed."""
        with CancelScope(deadline=-math.inf) as scope:
            checkpoint()

        assert scope.cancelled_caught


class TestReasons:
    def test_first_reason_wins(self):
        """Later cancel() calls do not change the reason."""
        with CancelScope() as scope:
            scope.cancel("first")
            scope.cancel("second")
            scope.cancel(CancelReason(source="shutdown", message="third"))
            with pytest.raises(Cancelled) as exc_info:
                checkpoint()
            raise exc_info.value

        assert "first" == scope.cancel_reason.message
        assert "first" == exc_info.value.reason.message

    def test_manual_cancel_beats_later_deadline(self):
        """A deadline that passes after a manual cancel does not replace its reason."""
        with CancelScope(deadline=time.monotonic() + 0.05) as scope:
            scope.cancel("manual")
            threading.Event().wait(0.15)
            checkpoint()

        assert "manual" == scope.cancel_reason.source

    def test_concurrent_cancels_agree_on_one_reason(self, spawn):
        """Racing cancel() calls from many threads: exactly one wins, and it sticks."""
        barrier = threading.Barrier(8)
        with structlog.testing.capture_logs() as logs, CancelScope() as scope:

            def cancel(index):
                barrier.wait(5)
                scope.cancel(f"thread {index}")

            runners = [spawn(cancel, index) for index in range(8)]
            for runner in runners:
                runner.result()
            with pytest.raises(Cancelled) as exc_info:
                checkpoint()
            raise exc_info.value
        requested = [log for log in logs if log["event"] == CANCEL_REQUESTED]

        assert 1 == len(requested)
        assert requested[0]["message"] == scope.cancel_reason.message
        assert exc_info.value.reason is scope.cancel_reason

    def test_cancel_accepts_reason_kinds(self):
        """cancel() takes None, a str or a CancelReason."""
        reason = CancelReason(source="shutdown", message="bye", requested_by="ops")
        scopes = [CancelScope(), CancelScope(), CancelScope()]
        scopes[0].cancel()
        scopes[1].cancel("text")
        scopes[2].cancel(reason)

        assert ("manual", "") == (scopes[0].cancel_reason.source, scopes[0].cancel_reason.message)
        assert ("manual", "text") == (
            scopes[1].cancel_reason.source,
            scopes[1].cancel_reason.message,
        )
        assert reason is scopes[2].cancel_reason

    @pytest.mark.parametrize("reason", [42, b"bytes", {"source": "manual"}, ["x"]])
    def test_cancel_rejects_other_reason_types(self, reason):
        """cancel() raises TypeError for a reason of another type and stays uncancelled."""
        scope = CancelScope()

        with pytest.raises(TypeError, match="reason must be None, a str or a CancelReason"):
            scope.cancel(reason)
        assert not scope.cancel_called

    def test_cancel_after_exit_does_nothing(self):
        """Cancelling an exited scope neither records a reason nor logs."""
        with CancelScope() as scope:
            pass
        with structlog.testing.capture_logs() as logs:
            scope.cancel("late")

        assert scope.cancel_reason is None
        assert [] == logs


class TestSticky:
    def test_every_checkpoint_raises_until_exit(self):
        """Catching Cancelled does not clear it: each later checkpoint raises again."""
        raised = 0
        with CancelScope() as scope:
            scope.cancel()
            for _ in range(3):
                try:
                    checkpoint()
                except Cancelled:
                    raised += 1
            still = is_cancelled()

        assert 3 == raised
        assert still
        assert not scope.cancelled_caught

    def test_checkpoints_after_exit_are_noops(self):
        """Once the cancelled scope has exited, checkpoints do not raise."""
        with CancelScope() as scope:
            scope.cancel()
            checkpoint()
        checkpoint()

        assert scope.cancelled_caught
        assert not is_cancelled()
        assert not _scope._pending


class TestMisuse:
    def test_reentering_an_exited_scope(self):
        """A scope is used for one block only; entering it again explains that."""
        scope = CancelScope()
        with scope:
            pass

        with pytest.raises(RuntimeError, match="single 'with' block"), scope:
            pass  # pragma: no cover - never runs

    def test_reentering_an_entered_scope(self):
        """Entering a scope that is still entered fails and leaves it intact."""
        with CancelScope() as scope:
            with pytest.raises(RuntimeError, match="single 'with' block"):
                scope.__enter__()
            inner_is_current = current_scope() is scope

        assert inner_is_current

    def test_exit_without_enter(self):
        """Exiting a scope that was never entered explains the mistake."""
        with pytest.raises(RuntimeError, match="never entered, or was already exited"):
            CancelScope().__exit__(None, None, None)

    def test_exit_twice(self):
        """Exiting a scope a second time is an error."""
        scope = CancelScope()
        with scope:
            pass

        with pytest.raises(RuntimeError, match="already exited"):
            scope.__exit__(None, None, None)

    def test_exit_out_of_order(self):
        """Exiting an outer scope before the inner one is misnesting; bookkeeping recovers."""
        outer = CancelScope()
        inner = CancelScope()
        outer.__enter__()
        inner.__enter__()
        inner.cancel()
        outer.cancel()

        with pytest.raises(RuntimeError, match="exited out of order") as exc_info:
            outer.__exit__(None, None, None)
        assert "reverse order" in str(exc_info.value)
        assert [] == _scope._get_stack()
        assert not _scope._pending
        assert 0 == _scope._cancelled_live
        checkpoint()
        # The inner scope was closed along with the outer one; exiting it now
        # is quiet, so the error above stays the one the user sees.
        assert inner.__exit__(None, None, None) is False
        assert "exited" in repr(inner)

    def test_abandoned_generator_scope(self):
        """A generator that holds a scope and is closed inside a later scope is misnesting."""

        def holds_a_scope() -> Generator[None, None, None]:
            with CancelScope():
                yield

        generator = holds_a_scope()
        next(generator)

        def close_inside_a_cancelled_scope():
            with CancelScope() as later:
                later.cancel()
                generator.close()

        with pytest.raises(RuntimeError, match="exited out of order") as exc_info:
            close_inside_a_cancelled_scope()

        assert "generator" in str(exc_info.value)
        assert [] == _scope._get_stack()
        assert not _scope._pending

    def test_exit_on_another_thread(self, spawn):
        """Exiting on another thread fails there and leaves the owner's scope intact."""
        with CancelScope() as scope:
            scope.cancel("still mine")

            def exit_elsewhere():
                with pytest.raises(RuntimeError, match="thread that did not enter it"):
                    scope.__exit__(None, None, None)

            spawn(exit_elsewhere).result()
            owner_still_has_it = current_scope() is scope
            with pytest.raises(Cancelled):
                checkpoint()
            checkpoint()

        assert owner_still_has_it
        assert scope.cancelled_caught
        assert not _scope._pending

    def test_other_thread_cannot_tear_down_a_running_scope(self, spawn):
        """Another thread's misuse cannot tear down a thread's scopes."""
        entered = threading.Event()
        release = threading.Event()
        box = {}

        def owner():
            with CancelScope() as scope:
                box["scope"] = scope
                entered.set()
                assert release.wait(5)
                return current_scope() is scope

        runner = spawn(owner)
        assert entered.wait(5)
        with pytest.raises(RuntimeError, match="did not enter it"):
            box["scope"].__exit__(None, None, None)
        release.set()

        assert runner.result() is True


class TestRepr:
    def test_repr_states(self):
        """repr shows the state, the reason, the shield and the deadline."""
        scope = CancelScope(shield=True, deadline=time.monotonic() + 60)
        before = repr(scope)
        with scope:
            scope.cancel(CancelReason(message="why", requested_by="alice"))
            during = repr(scope)
        after = repr(scope)

        assert before.startswith("<CancelScope new, shield, deadline in ")
        assert during.startswith("<CancelScope entered, cancelled (manual by alice: why), shield")
        assert after.startswith("<CancelScope exited")


class TestHookTimeoutArgument:
    def test_defaults_to_configured_value(self):
        """A scope takes the process-wide hook budget when it is created, also when
        DEFAULT is passed explicitly."""
        cancellable.configure(hook_timeout=3.5)

        assert 3.5 == CancelScope().hook_timeout
        assert 3.5 == CancelScope(hook_timeout=cancellable.DEFAULT).hook_timeout

    @pytest.mark.parametrize(("value", "expected"), [(None, None), (2, 2.0), (0.5, 0.5)])
    def test_explicit_value(self, value, expected):
        """An explicit hook_timeout is validated and stored as a float (or None)."""
        assert expected == CancelScope(hook_timeout=value).hook_timeout

    @pytest.mark.parametrize(
        ("value", "error"),
        [(-1, ValueError), (math.inf, ValueError), ("x", TypeError), ("default", TypeError)],
    )
    def test_bad_value(self, value, error):
        """A bad hook_timeout is refused when the scope is created."""
        with pytest.raises(error, match="hook_timeout"):
            CancelScope(hook_timeout=value)


class TestEvents:
    def test_cancel_requested(self):
        """cancel() logs cancel.requested once, with the reason fields."""
        scope = CancelScope()
        with structlog.testing.capture_logs() as logs:
            scope.cancel(CancelReason(source="revoked", message="stop", requested_by="bob"))
            scope.cancel("again")

        assert [
            {
                "event": CANCEL_REQUESTED,
                "log_level": "info",
                "scope": hex(id(scope)),
                "source": "revoked",
                "message": "stop",
                "requested_by": "bob",
            }
        ] == logs

    def test_cancel_observed_once_per_scope(self):
        """The first checkpoint that raises logs cancel.observed; later ones are silent."""
        with structlog.testing.capture_logs() as logs, CancelScope() as scope:
            scope.cancel("x")
            for _ in range(3):
                try:
                    checkpoint()
                except Cancelled:
                    pass
            checkpoint()
        observed = [log for log in logs if log["event"] == CANCEL_OBSERVED]

        assert 1 == len(observed)
        assert {
            "event",
            "log_level",
            "scope",
            "observed_ms",
            "source",
            "message",
            "requested_by",
        } == set(observed[0])
        assert hex(id(scope)) == observed[0]["scope"]
        assert observed[0]["observed_ms"] >= 0

    def test_scope_cancelled(self):
        """A cancelled scope logs scope.cancelled when it exits, saying whether it caught."""
        with (
            structlog.testing.capture_logs() as logs,
            CancelScope() as outer,
            CancelScope() as inner,
        ):
            outer.cancel("x")
            checkpoint()
        exits = [log for log in logs if log["event"] == SCOPE_CANCELLED]

        assert [hex(id(inner)), hex(id(outer))] == [log["scope"] for log in exits]
        assert [False, True] == [log["caught"] for log in exits]
        assert {
            "event",
            "log_level",
            "scope",
            "caught",
            "hooks_run",
            "hook_errors",
            "cleanup_ms",
            "source",
            "message",
            "requested_by",
        } == set(exits[1])
        assert ("x", 0, 0) == (exits[1]["message"], exits[1]["hooks_run"], exits[1]["hook_errors"])

    def test_no_events_without_cancellation(self):
        """A scope that is never cancelled logs nothing."""
        with structlog.testing.capture_logs() as logs, CancelScope():
            checkpoint()

        assert [] == logs

    def test_deadline_event_comes_from_the_timer(self):
        """A deadline logs cancel.requested with source 'deadline'."""
        with structlog.testing.capture_logs() as logs, move_on_after(0.02):
            checkpoint_until_cancelled()
        requested = [log for log in logs if log["event"] == CANCEL_REQUESTED]

        assert ["deadline"] == [log["source"] for log in requested]


class TestTimer:
    def test_callbacks_fire_in_deadline_order(self):
        """The timer thread runs callbacks in deadline order, not scheduling order."""
        fired = []
        done = threading.Event()
        now = time.monotonic()
        _timer.schedule(now + 0.06, lambda: (fired.append("late"), done.set()))
        _timer.schedule(now + 0.02, lambda: fired.append("early"))

        assert done.wait(5)
        assert ["early", "late"] == fired

    def test_cancelled_handle_does_not_fire(self):
        """A cancelled TimerHandle is skipped."""
        fired = []
        done = threading.Event()
        now = time.monotonic()
        handle = _timer.schedule(now + 0.01, lambda: fired.append("cancelled"))
        handle.cancel()
        _timer.schedule(now + 0.03, done.set)

        assert not handle.active
        assert done.wait(5)
        assert [] == fired

    def test_handle_inactive_after_firing(self):
        """A handle stops being active once its callback ran."""
        done = threading.Event()
        handle = _timer.schedule(time.monotonic(), done.set)

        assert done.wait(5)
        assert not handle.active

    def test_failing_callback_is_reported_and_timer_survives(self, monkeypatch):
        """An exception in a callback goes to sys.unraisablehook; later callbacks still run."""
        reported = []
        done = threading.Event()
        monkeypatch.setattr(sys, "unraisablehook", reported.append)

        def fail():
            raise ValueError("in callback")

        now = time.monotonic()
        _timer.schedule(now, fail)
        _timer.schedule(now + 0.02, done.set)

        assert done.wait(5)
        assert 1 == len(reported)
        assert ValueError is reported[0].exc_type
        assert "Exception in cancellable timer callback" == reported[0].err_msg
        assert fail is reported[0].object

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_fork_gives_the_child_a_fresh_timer(self):
        """After fork the child has its own working timer, and the parent's entries stay behind."""
        parent_fired = threading.Event()
        _timer.schedule(time.monotonic() + 0.2, parent_fired.set)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which coverage does not follow
            try:
                fired = threading.Event()
                fresh = _timer._timer is None
                _timer.schedule(time.monotonic(), fired.set)
                os._exit(0 if fresh and fired.wait(5) else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)

        assert 0 == os.waitstatus_to_exitcode(status)
        assert parent_fired.wait(5)

    def test_reset_after_fork_replaces_the_timer(self, monkeypatch):
        """The at-fork hook drops the timer; the next schedule makes a new, working one."""
        _timer.schedule(time.monotonic() + 3600, lambda: None)
        monkeypatch.setattr(_timer, "_timer", _timer._timer)
        monkeypatch.setattr(_timer, "_create_lock", _timer._create_lock)
        old = _timer._timer
        _timer._reset_after_fork()
        dropped = _timer._timer
        fired = threading.Event()
        _timer.schedule(time.monotonic(), fired.set)

        assert dropped is None
        assert old is not _timer._timer
        assert fired.wait(5)


class TestDeadlineMovedBeforeTheTimerFired:
    """trio's ``_registered_deadline`` rule: the timer fires for the deadline it was armed
    with, which may have moved since; the scope compares with its current deadline."""

    @staticmethod
    def _record_armings(monkeypatch):
        # The callbacks the scope arms the timer with; the test fires them.
        armed = []

        def recording(when, callback):
            armed.append(callback)
            return _timer.TimerHandle(when, callback)

        monkeypatch.setattr(_timer, "schedule", recording)
        return armed

    def test_a_late_fire_for_a_moved_deadline_does_not_cancel(self, monkeypatch):
        """The callback of the first arming runs after the deadline was extended (the
        timer took it just before the setter disarmed it): the scope stays uncancelled."""
        armed = self._record_armings(monkeypatch)
        with CancelScope(deadline=time.monotonic() + 3600) as scope:
            scope.deadline = time.monotonic() + 7200
            armed[0]()
            checkpoint()
            answer = is_cancelled()

        assert 2 == len(armed)
        assert not answer
        assert not scope.cancel_called
        assert not scope.cancelled_caught

    def test_a_fire_for_a_passed_deadline_cancels(self, monkeypatch):
        """When the current deadline has passed, the timer's callback cancels with "deadline"."""
        armed = self._record_armings(monkeypatch)
        with CancelScope(deadline=time.monotonic() + 0.02) as scope:
            time.sleep(0.05)
            armed[0]()
            checkpoint()

        assert scope.cancelled_caught
        assert "deadline" == scope.cancel_reason.source


class TestIntegrationInterface:
    """The named functions integrations use instead of a scope's private attributes."""

    def test_cancel_with_says_whether_it_cancelled(self):
        """The first call cancels (True, its reason wins); later calls and exited scopes: False."""
        first = CancelReason(message="first")
        with CancelScope() as scope:
            answers = [
                _scope.cancel_with(scope, first),
                _scope.cancel_with(scope, CancelReason(message="second")),
            ]
        exited = CancelScope()
        with exited:
            pass
        answers.append(_scope.cancel_with(exited, first))

        assert [True, False, False] == answers
        assert first == scope.cancel_reason
        assert not exited.cancel_called

    def test_shield_inside_and_is_entered(self):
        """shield_inside sees a shield entered above the scope on its stack, not below it."""
        outer = CancelScope()
        seen = [_scope.is_entered(outer)]
        with outer:
            seen.append(_scope.is_entered(outer))
            seen.append(_scope.shield_inside(outer))
            with CancelScope(), CancelScope(shield=True):
                seen.append(_scope.shield_inside(outer))
            seen.append(_scope.shield_inside(outer))
            with CancelScope(shield=True), CancelScope() as inner:
                seen.append(_scope.shield_inside(inner))
        seen.append(_scope.is_entered(outer))

        assert [False, True, False, True, False, False, False] == seen

    def test_observed_at_and_log_fields(self):
        """observed_at is set by the first checkpoint that raises; log fields reach events
        and are inherited by nested scopes."""
        scope = CancelScope()
        _scope.set_log_fields(scope, {"task_id": "t-1"})
        before = _scope.observed_at(scope)
        with structlog.testing.capture_logs() as logs, scope:
            with CancelScope() as inner:
                inherited = _scope.log_fields(inner)
            scope.cancel("stop")
            checkpoint()
        observed = _scope.observed_at(scope)

        assert before is None
        assert observed is not None
        assert {"task_id": "t-1"} == inherited
        assert ["t-1"] == [e.get("task_id") for e in logs if e["event"] == CANCEL_OBSERVED]

    def test_lock_functions(self, spawn):
        """acquire_lock_if_free takes the core's lock only if it is free; lock_held_here
        tells the holder from the others."""
        taken = _scope.acquire_lock_if_free()
        try:
            held_here = _scope.lock_held_here()
            elsewhere = spawn(lambda: (_scope.lock_held_here(), _scope.acquire_lock_if_free()))
            other_thread = elsewhere.result()
        finally:
            _scope.release_lock()

        assert taken
        assert held_here
        assert (False, False) == other_thread
        assert not _scope.lock_held_here()

    def test_deferred_work_functions(self):
        """deferred_work_waiting is True while queued work waits; run_deferred runs it."""
        ran = []
        idle = _scope.deferred_work_waiting()
        _scope.run_deferred()  # nothing waits: nothing happens
        _scope.request_slow_path(lambda: ran.append("ran"))
        waiting = _scope.deferred_work_waiting()
        _scope.run_deferred()

        assert (False, True) == (idle, waiting)
        assert ["ran"] == ran
        assert not _scope.deferred_work_waiting()
        assert not _scope._pending


class TestSlowPathWakers:
    """`request_slow_path` nudges registered wakers (how a waiting event loop hears of work)."""

    def test_waker_called_after_work_is_queued_and_removable(self):
        """Each queued callback calls every waker once, the work already queued; remove stops it."""
        seen = []
        remove = _scope.add_slow_path_waker(lambda: seen.append(len(_scope._deferred)))
        try:
            _scope.request_slow_path(lambda: None)
            assert [1] == seen
        finally:
            remove()
            remove()  # a second removal is harmless
        _scope.request_slow_path(lambda: None)
        assert [1] == seen
        checkpoint()  # runs the queued callbacks
        assert not _scope._deferred
        assert not _scope._pending

    def test_failing_waker_does_not_break_the_request(self):
        """A waker that raises (a closed loop) neither propagates nor stops the others."""
        seen = []

        def broken():
            raise RuntimeError("Event loop is closed")

        removers = [
            _scope.add_slow_path_waker(broken),
            _scope.add_slow_path_waker(lambda: seen.append(1)),
        ]
        try:
            _scope.request_slow_path(lambda: None)
        finally:
            for remove in removers:
                remove()
        assert [1] == seen
        checkpoint()
        assert not _scope._pending
