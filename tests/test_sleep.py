"""Tests for `cancellable.sleep` and `cancellable.wait`: cancel-aware blocking waits."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import signal
import threading
import time

import pytest

import cancellable
from cancellable import Cancelled, CancelScope, _scope, move_on_after

#: How late a wake-up may be on this shared machine (seconds).
SLACK = 0.3


def later(seconds: float, fn: object) -> threading.Timer:
    """Run ``fn()`` on another thread after ``seconds``."""
    timer = threading.Timer(seconds, fn)  # type: ignore[arg-type]
    timer.start()
    return timer


class TestSleep:
    """`cancellable.sleep`."""

    def test_outside_any_scope_it_is_a_plain_sleep(self) -> None:
        """No scope: it sleeps the whole time and returns None."""
        began = time.monotonic()

        cancellable.sleep(0.1)

        assert time.monotonic() - began >= 0.1

    def test_cancel_from_another_thread_ends_it_at_once(self) -> None:
        """A 60 s sleep raises Cancelled as soon as another thread cancels the scope."""
        began = time.monotonic()
        with CancelScope() as scope:
            later(0.1, lambda: scope.cancel("stop"))
            cancellable.sleep(60)
        elapsed = time.monotonic() - began

        assert scope.cancelled_caught
        assert 0.1 <= elapsed < 0.1 + SLACK

    def test_the_reason_travels_with_the_exception(self) -> None:
        """The Cancelled raised out of the sleep carries the scope's reason."""
        with CancelScope() as scope:
            later(0.05, lambda: scope.cancel("why not"))
            with pytest.raises(Cancelled) as info, CancelScope():
                cancellable.sleep(60)

        assert "why not" == info.value.reason.message

    def test_a_deadline_ends_it(self) -> None:
        """``move_on_after(0.1)`` around a long sleep: it ends after about 0.1 s."""
        began = time.monotonic()
        with move_on_after(0.1) as scope:
            cancellable.sleep(60)

        assert scope.cancelled_caught
        assert time.monotonic() - began < 0.1 + SLACK

    def test_an_already_cancelled_scope_raises_before_sleeping(self) -> None:
        """A cancelled scope: the sleep raises at once, without waiting."""
        began = time.monotonic()
        with CancelScope() as scope:
            scope.cancel()
            cancellable.sleep(60)

        assert scope.cancelled_caught
        assert time.monotonic() - began < SLACK

    def test_a_shield_sleeps_on(self) -> None:
        """Inside a shield, the outer scope's cancellation does not end the sleep."""
        with CancelScope() as outer:
            later(0.05, outer.cancel)
            began = time.monotonic()
            with CancelScope(shield=True):
                cancellable.sleep(0.3)
            slept = time.monotonic() - began
            cancellable.sleep(0)  # outside the shield: raises at once

        assert slept >= 0.3
        assert outer.cancelled_caught

    def test_a_nested_scope_is_woken_by_its_parent(self) -> None:
        """Cancelling the outer scope wakes a sleep in an inner one."""
        began = time.monotonic()
        with CancelScope() as outer:
            later(0.1, outer.cancel)
            with CancelScope():
                cancellable.sleep(60)

        assert outer.cancelled_caught
        assert time.monotonic() - began < 0.1 + SLACK

    def test_another_threads_cancel_does_not_wake_this_one(self) -> None:
        """Two threads sleep in their own scopes; cancelling one leaves the other alone."""
        outcome: dict[str, object] = {}
        ready = threading.Event()
        scopes: list[CancelScope] = []

        def other() -> None:
            with CancelScope() as scope:
                scopes.append(scope)
                ready.set()
                cancellable.sleep(60)
            outcome["other"] = scope.cancelled_caught

        thread = threading.Thread(target=other)
        thread.start()
        ready.wait(5)
        began = time.monotonic()
        with CancelScope():
            later(0.05, scopes[0].cancel)
            cancellable.sleep(0.3)
        thread.join(5)

        assert time.monotonic() - began >= 0.3
        assert {"other": True} == outcome

    def test_a_signal_handler_can_wake_it(self) -> None:
        """A handler that hands a cancel to the core wakes the sleep, which raises.

        This is what the Celery wake-up signal does in a prefork child: the
        handler may not take locks, so it only queues the cancel with
        ``request_slow_path``; the core wakes the sleepers (they are one of
        its slow-path wakers), and their checkpoint runs it.
        """
        began = time.monotonic()
        with CancelScope() as scope:

            def handler(signum: int, frame: object) -> None:
                _scope.request_slow_path(lambda: scope.cancel("from a signal"))

            previous = signal.signal(signal.SIGALRM, handler)
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.1)
                cancellable.sleep(60)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

        assert scope.cancelled_caught
        assert "from a signal" == scope.cancel_reason.message  # type: ignore[union-attr]
        assert time.monotonic() - began < 0.1 + SLACK

    def test_a_signal_for_other_work_does_not_end_it(self) -> None:
        """A wake-up whose work does not cancel the scope: the sleep goes on to its end."""
        ran: list[bool] = []
        with CancelScope():

            def handler(signum: int, frame: object) -> None:
                _scope.request_slow_path(lambda: ran.append(True))

            previous = signal.signal(signal.SIGALRM, handler)
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.05)
                began = time.monotonic()
                cancellable.sleep(0.3)
                slept = time.monotonic() - began
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

        assert [True] == ran
        assert slept >= 0.3

    @pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
    def test_bad_durations_are_refused(self, bad: float) -> None:
        """Negative, NaN and infinite durations raise ValueError."""
        with pytest.raises(ValueError, match="seconds"):
            cancellable.sleep(bad)

    def test_a_bool_is_not_a_duration(self) -> None:
        """``sleep(True)`` raises TypeError."""
        with pytest.raises(TypeError):
            cancellable.sleep(True)


class TestWait:
    """`cancellable.wait` on a `threading.Event`."""

    def test_outside_any_scope_it_is_event_wait(self) -> None:
        """No scope: True when set, False on timeout."""
        event = threading.Event()

        assert cancellable.wait(event, 0.05) is False
        event.set()
        assert cancellable.wait(event, 0.05) is True

    def test_returns_true_when_the_event_is_set(self) -> None:
        """In a scope, another thread sets the event: True, at once."""
        event = threading.Event()
        began = time.monotonic()
        with CancelScope():
            later(0.1, event.set)
            got = cancellable.wait(event, 60)

        assert got is True
        assert time.monotonic() - began < 0.1 + SLACK

    def test_returns_false_on_timeout(self) -> None:
        """In a scope, nobody sets the event: False after the timeout."""
        event = threading.Event()
        began = time.monotonic()
        with CancelScope():
            got = cancellable.wait(event, 0.1)

        assert got is False
        assert time.monotonic() - began >= 0.1

    def test_cancel_ends_the_wait(self) -> None:
        """Cancelling the scope from another thread ends a wait without timeout."""
        event = threading.Event()
        began = time.monotonic()
        with CancelScope() as scope:
            later(0.1, scope.cancel)
            cancellable.wait(event)

        assert scope.cancelled_caught
        assert time.monotonic() - began < 0.1 + SLACK
        assert not event.is_set()

    def test_a_set_event_wins_over_a_cancelled_scope(self) -> None:
        """An event already set returns True even in a cancelled scope."""
        event = threading.Event()
        event.set()
        with CancelScope() as scope:
            scope.cancel()
            got = cancellable.wait(event)
            assert got is True

    def test_a_deadline_ends_the_wait(self) -> None:
        """``move_on_after(0.1)``: the wait ends after about 0.1 s."""
        event = threading.Event()
        with move_on_after(0.1) as scope:
            cancellable.wait(event)

        assert scope.cancelled_caught

    def test_other_waiters_of_the_same_event_are_not_disturbed(self) -> None:
        """A cancelled wait leaves the event's plain waiters waiting; set() still works.

        The cancelled waiter's stand-in may still be in the event's list when
        ``set()`` runs: ``set()`` must not raise, and the plain waiter must
        see True only once the event is really set.
        """
        event = threading.Event()
        seen: list[bool] = []
        plain = threading.Thread(target=lambda: seen.append(event.wait(5)))
        plain.start()
        with CancelScope() as scope:
            later(0.05, scope.cancel)
            cancellable.wait(event)
        time.sleep(0.1)
        assert [] == seen
        event.set()
        plain.join(5)

        assert scope.cancelled_caught
        assert [True] == seen

    def test_an_event_without_internals_is_waited_in_slices(self) -> None:
        """An object that only has ``wait``/``is_set`` still works, cancel seen within 50 ms."""

        class Minimal:
            def __init__(self) -> None:
                self._event = threading.Event()

            def wait(self, timeout: float | None = None) -> bool:
                return self._event.wait(timeout)

            def is_set(self) -> bool:
                return self._event.is_set()

        event = Minimal()
        began = time.monotonic()
        with CancelScope() as scope:
            later(0.1, scope.cancel)
            cancellable.wait(event)  # type: ignore[arg-type]

        assert scope.cancelled_caught
        assert time.monotonic() - began < 0.1 + 0.05 + SLACK


class TestEdges:
    """Zero timeouts and event objects without `threading.Event`'s internals."""

    def test_zero_seconds_in_a_scope_returns_at_once(self) -> None:
        """``sleep(0)`` in a live scope returns without blocking (and checks once)."""
        with CancelScope():
            began = time.monotonic()
            cancellable.sleep(0)
        assert time.monotonic() - began < SLACK

    def test_an_event_set_while_joining_returns_true(self) -> None:
        """The event is set by another thread at once: the wait sees it and returns True."""
        event = threading.Event()
        threading.Timer(0.01, event.set).start()
        with CancelScope():
            assert cancellable.wait(event, timeout=5)

    def test_an_event_like_object_is_waited_on_in_slices(self) -> None:
        """An object with only ``is_set`` and ``wait`` (no Condition inside): a timeout
        returns False, a set returns True, and a cancel still raises."""

        class Flag:
            """The least an event must offer."""

            def __init__(self) -> None:
                self._flag = threading.Event()  # hidden: no `_cond` on Flag itself

            def is_set(self) -> bool:
                return self._flag.is_set()

            def wait(self, timeout: float | None = None) -> bool:
                return self._flag.wait(timeout)

            def set(self) -> None:
                self._flag.set()

        flag = Flag()
        with CancelScope():
            assert not cancellable.wait(flag, timeout=0.12)  # type: ignore[arg-type]
            threading.Timer(0.02, flag.set).start()
            assert cancellable.wait(flag, timeout=5)  # type: ignore[arg-type]
        with CancelScope() as scope:
            threading.Timer(0.05, scope.cancel, args=("stop",)).start()
            cancellable.wait(Flag(), timeout=5)  # type: ignore[arg-type]
        assert scope.cancelled_caught
