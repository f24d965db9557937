"""Tests for the public test helpers in cancellable.testing."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import threading
import time

import pytest
import structlog

from cancellable import (
    CancelReason,
    CancelScope,
    _scope,
    cancellable,
    checkpoint,
    events,
    is_cancelled,
    move_on_after,
    on_cancel,
)
from cancellable.testing import (
    CheckpointCounter,
    cancel_after,
    capture_events,
    count_checkpoints,
)


def run_steps(limit: int = 100) -> int:
    """A loop that checks once per step; returns how many steps started."""
    started = 0
    for _ in range(limit):
        started += 1
        checkpoint()
    return started


class TestCancelAfter:
    @pytest.mark.parametrize("n", [1, 2, 5, 17])
    def test_cancels_at_the_nth_checkpoint(self, n):
        """The n-th checkpoint raises; the scope catches it and the code after runs."""
        progress = []
        with cancel_after(n) as scope:
            for step in range(1, 100):
                progress.append(step)
                checkpoint()
        after = is_cancelled()

        assert list(range(1, n + 1)) == progress
        assert scope.cancelled_caught
        assert not after

    def test_default_reason(self):
        """Without a reason, the scope is cancelled manually with a message naming the helper."""
        with cancel_after(3) as scope:
            run_steps()

        assert ("manual", "cancel_after(3)") == (
            scope.cancel_reason.source,
            scope.cancel_reason.message,
        )

    def test_custom_reasons(self):
        """A str becomes the message; a CancelReason is used as is."""
        reason = CancelReason(source="revoked", message="stop", requested_by="test")
        with cancel_after(1, reason) as first:
            run_steps()
        with cancel_after(1, reason="text") as second:
            run_steps()

        assert reason is first.cancel_reason
        assert "text" == second.cancel_reason.message

    def test_not_reached(self):
        """Fewer checkpoints than n leave the scope uncancelled."""
        with cancel_after(10) as scope:
            steps = run_steps(limit=9)

        assert 9 == steps
        assert not scope.cancel_called

    def test_counts_inside_nested_scopes_and_calls(self):
        """Checkpoints in nested scopes and @cancellable calls count; the outer scope catches."""

        @cancellable
        def one_step():
            checkpoint()

        progress = []
        with cancel_after(4) as scope:
            with CancelScope():
                checkpoint()
                progress.append(1)
            one_step()
            progress.append(2)
            one_step()
            progress.append(3)
            one_step()
            progress.append("unreachable")

        assert [1, 2, 3] == progress
        assert scope.cancelled_caught

    def test_shielded_checkpoints_count_but_do_not_raise(self):
        """The n-th checkpoint inside a shield cancels; the next unshielded one raises."""
        progress = []
        with cancel_after(2) as scope:
            with CancelScope(shield=True):
                checkpoint()
                checkpoint()
                progress.append("shield finished")
            checkpoint()
            progress.append("unreachable")

        assert ["shield finished"] == progress
        assert scope.cancelled_caught

    def test_with_checkpoint_counts_twice(self):
        """``with checkpoint():`` checks on entry and exit, so it counts two."""
        progress = []
        with cancel_after(2) as scope:
            with checkpoint():
                progress.append("body")
            progress.append("unreachable")  # pragma: no cover - must not run

        assert ["body"] == progress
        assert scope.cancelled_caught

    def test_other_threads_do_not_count(self, spawn):
        """Checkpoints on other threads while the block is open are not counted."""
        inside = threading.Event()
        others_done = threading.Event()

        def other_thread():
            assert inside.wait(5)
            with CancelScope() as scope:
                run_steps(limit=50)
            others_done.set()
            return scope.cancel_called

        runner = spawn(other_thread)
        progress = []
        with cancel_after(3) as scope:
            inside.set()
            assert others_done.wait(5)
            for step in range(1, 100):
                progress.append(step)
                checkpoint()

        assert [1, 2, 3] == progress
        assert runner.result() is False
        assert scope.cancelled_caught

    def test_hooks_run(self):
        """Cleanup hooks registered in the block run when it is cancelled."""
        ran = []
        with cancel_after(2):
            on_cancel(ran.append, "cleaned")
            run_steps()

        assert ["cleaned"] == ran

    def test_probe_removed_after_the_block(self):
        """After the block the probe is gone and checkpoints are free again."""
        with cancel_after(2):
            during = (len(_scope._probes), _scope._pending)
            run_steps(limit=1)

        assert (1, True) == during
        assert [] == _scope._probes
        assert not _scope._pending

    def test_probe_removed_when_the_block_raises(self):
        """An exception leaving the block still removes the probe."""
        with pytest.raises(KeyError), cancel_after(5):
            raise KeyError("out")

        assert [] == _scope._probes
        assert not _scope._pending

    @pytest.mark.parametrize(
        ("n", "error", "match"),
        [
            (0, ValueError, "counts checkpoints from 1, got 0"),
            (-3, ValueError, "counts checkpoints from 1, got -3"),
            (True, TypeError, "needs an int, got bool"),
            (1.5, TypeError, "needs an int, got float"),
            ("3", TypeError, "needs an int, got str"),
        ],
    )
    def test_bad_n(self, n, error, match):
        """n must be a positive int."""
        with pytest.raises(error, match=match), cancel_after(n):
            pass  # pragma: no cover - never runs

    def test_bad_reason(self):
        """A reason of the wrong type is refused before the block runs."""
        with pytest.raises(TypeError, match="reason must be"), cancel_after(1, reason=b"x"):
            pass  # pragma: no cover - never runs


class TestCountCheckpoints:
    def test_counts(self):
        """Each checkpoint adds one, inside or outside scopes; ``with checkpoint()`` adds two."""
        with count_checkpoints() as counter:
            checkpoint()
            with CancelScope():
                checkpoint()
                with checkpoint():
                    pass
            checkpoint()

        assert 5 == counter.count

    def test_is_cancelled_does_not_count(self):
        """is_cancelled() is not a checkpoint."""
        with count_checkpoints() as counter:
            is_cancelled()
            is_cancelled()

        assert 0 == counter.count

    def test_only_the_calling_thread(self, spawn):
        """Another thread's checkpoints are not counted."""
        with count_checkpoints() as counter:
            spawn(run_steps, 30).result()
            run_steps(limit=4)

        assert 4 == counter.count

    def test_count_stops_after_the_block(self):
        """Checkpoints after the block are not counted and the probe is gone."""
        with count_checkpoints() as counter:
            checkpoint()
        checkpoint()

        assert 1 == counter.count
        assert [] == _scope._probes
        assert not _scope._pending

    def test_nested_counters(self):
        """Counters can nest; each sees its own block."""
        with count_checkpoints() as outer:
            checkpoint()
            with count_checkpoints() as inner:
                checkpoint()

        assert (2, 1) == (outer.count, inner.count)

    def test_combines_with_cancel_after(self):
        """The counter also sees the checkpoint that cancel_after makes raise."""
        with count_checkpoints() as counter, cancel_after(3):
            run_steps()

        assert 3 == counter.count

    def test_repr(self):
        """The counter's repr shows the count."""
        counter = CheckpointCounter()
        counter.count = 7

        assert "<CheckpointCounter count=7>" == repr(counter)


class TestCaptureEvents:
    def test_captures_cancellable_events_only(self):
        """Events from other loggers and other event names are left out."""
        with capture_events() as captured:
            structlog.get_logger("myapp").info("user.event", x=1)
            with CancelScope() as scope:
                scope.cancel("why")
                checkpoint()

        assert [events.CANCEL_REQUESTED, events.CANCEL_OBSERVED, events.SCOPE_CANCELLED] == [
            event["event"] for event in captured
        ]
        assert {"why"} == {event["message"] for event in captured}
        assert {"info"} == {event["log_level"] for event in captured}

    def test_list_fills_while_the_block_runs(self):
        """The list is live: events from the timer thread show up inside the block."""
        with capture_events() as captured:
            with move_on_after(0.02):
                give_up = time.monotonic() + 5
                while time.monotonic() < give_up:
                    checkpoint()
            seen_inside = [event["event"] for event in captured]

        assert events.CANCEL_REQUESTED == seen_inside[0]
        assert "deadline" == captured[0]["source"]

    def test_warning_events(self):
        """Warnings such as cleanup.failed are captured with their level and fields."""

        def fail():
            raise ValueError("x")

        with capture_events() as captured, cancel_after(1):
            on_cancel(fail)
            run_steps()
        failed = [event for event in captured if event["event"] == events.CLEANUP_FAILED]

        assert 1 == len(failed)
        assert "warning" == failed[0]["log_level"]
        assert "ValueError('x')" == failed[0]["error"]

    def test_nothing_captured_without_cancellation(self):
        """An uncancelled scope emits no events."""
        with capture_events() as captured, CancelScope():
            checkpoint()

        assert [] == captured

    def test_configuration_is_restored(self):
        """After the block, structlog's processors are what they were."""
        before = list(structlog.get_config()["processors"])
        with capture_events():
            pass

        assert before == structlog.get_config()["processors"]
