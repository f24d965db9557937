"""Tests for ``@cancellable`` on ``async def``, what it refuses, and `add_cancel_callback`."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs
from tests.helpers import cancel_from_thread

from cancellable import (
    Cancelled,
    CancelReason,
    CancelScope,
    cancellable,
    checkpoint,
    current_scope,
    on_cancel,
)

needs_asyncio_timeout = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11"
)


class TestCoroutineFunctions:
    """``@cancellable`` on an ``async def``, awaited outside Celery."""

    def test_still_a_coroutine_function_that_returns_its_value(self) -> None:
        """The decorated function is a coroutine function; its result comes back."""

        @cancellable
        async def double(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        assert inspect.iscoroutinefunction(double)
        assert 42 == asyncio.run(double(21))

    def test_cancel_from_another_thread_cancels_at_the_await(self) -> None:
        """CancelledError (reason as message) at the await; finally, then hooks; Cancelled out."""
        seen: list[str] = []

        @cancellable
        async def work() -> None:
            scope = current_scope()
            assert scope is not None
            on_cancel(seen.append, "hook")
            cancel_from_thread(scope, "user pressed stop")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError as exc:
                seen.append(f"CancelledError: {exc}")
                raise
            finally:
                seen.append("finally")

        began = time.monotonic()
        with pytest.raises(Cancelled) as info:
            asyncio.run(work())

        assert time.monotonic() - began < 5
        assert "user pressed stop" == info.value.reason.message
        assert ["CancelledError: manual: user pressed stop", "finally", "hook"] == seen

    def test_timeout_is_a_deadline(self) -> None:
        """``timeout=`` cancels the awaiting coroutine with source "deadline"."""

        @cancellable(timeout=0.1)
        async def overrun() -> None:
            await asyncio.sleep(30)

        began = time.monotonic()
        with pytest.raises(Cancelled) as info:
            asyncio.run(overrun())

        assert "deadline" == info.value.reason.source
        assert time.monotonic() - began < 5

    def test_two_concurrent_calls_have_their_own_scopes(self) -> None:
        """Interleaving coroutines each see their own scope; cancelling one leaves the other."""
        scopes: dict[str, CancelScope | None] = {}

        @cancellable
        async def work(name: str, rounds: int) -> str:
            for _ in range(rounds):
                scopes[name] = current_scope()
                await asyncio.sleep(0.005)
                assert scopes[name] is current_scope()
            return name

        async def main() -> list[Any]:
            first = asyncio.ensure_future(work("first", 400))
            second = asyncio.ensure_future(work("second", 20))
            await asyncio.sleep(0.02)
            scope = scopes["first"]
            assert scope is not None
            cancel_from_thread(scope, "only the first", delay=0)
            return list(await asyncio.gather(first, second, return_exceptions=True))

        first, second = asyncio.run(main())

        assert isinstance(first, Cancelled)
        assert "second" == second
        assert scopes["first"] is not scopes["second"]
        assert current_scope() is None

    def test_sync_checkpoint_inside_the_coroutine_sees_the_scope(self) -> None:
        """Synchronous code the coroutine calls raises Cancelled at its checkpoint."""

        def sync_library_code(scope: CancelScope) -> None:
            scope.cancel("stop")
            checkpoint()

        @cancellable
        async def work() -> None:
            scope = current_scope()
            assert scope is not None
            sync_library_code(scope)

        with pytest.raises(Cancelled, match="stop"):
            asyncio.run(work())

    def test_to_thread_helper_checkpoints_see_the_scope(self) -> None:
        """A helper run with asyncio.to_thread inherits the call's scope: awaited to its
        end (asyncio does not wait for threads), its checkpoint raises Cancelled."""
        helper_saw: list[str] = []

        def helper(scope: CancelScope) -> None:
            assert scope is current_scope()
            scope.cancel("stop the helper")
            try:
                checkpoint()
            except Cancelled:
                helper_saw.append("Cancelled")
                raise

        @cancellable
        async def work() -> None:
            scope = current_scope()
            assert scope is not None
            helper_done = asyncio.ensure_future(asyncio.to_thread(helper, scope))
            try:
                await asyncio.shield(helper_done)
            except asyncio.CancelledError:
                await helper_done  # the call's scope is still entered here
                raise

        with pytest.raises(Cancelled, match="stop the helper"):
            asyncio.run(work())

        assert ["Cancelled"] == helper_saw

    def test_failing_hook_reported_like_a_synchronous_scope(self) -> None:
        """A hook that fails in an async call's cleanup: its error is on the scope and the
        Cancelled (and in its notes on 3.11+), and the other hooks still run, as for a
        ``with CancelScope()`` block (the same cleanup code runs both)."""
        ran: list[str] = []
        error = ValueError("hook broke")
        scopes: list[CancelScope] = []

        def fail() -> None:
            raise error

        @cancellable
        async def work() -> None:
            scope = current_scope()
            assert scope is not None
            scopes.append(scope)
            on_cancel(ran.append, "first registered")
            on_cancel(fail)
            scope.cancel("stop")
            await asyncio.sleep(30)

        with pytest.raises(Cancelled) as info:
            asyncio.run(work())

        assert ["first registered"] == ran
        assert (error,) == info.value.hook_errors
        assert (error,) == scopes[0].cleanup_errors
        if sys.version_info >= (3, 11):
            assert [f"cleanup hook failed: {error!r}"] == info.value.__notes__

    def test_someone_elses_cancel_passes_through_and_runs_hooks(self) -> None:
        """task.cancel() by other code stays a CancelledError; the call's hooks still run."""
        ran: list[str] = []

        @cancellable
        async def work() -> None:
            on_cancel(ran.append, "hook")
            await asyncio.sleep(30)

        async def main() -> None:
            task = asyncio.ensure_future(work())
            await asyncio.sleep(0.01)
            task.cancel("by someone else")
            await task

        with pytest.raises(asyncio.CancelledError):
            asyncio.run(main())

        assert ["hook"] == ran

    def test_enclosing_cancellation_reaches_nested_calls(self) -> None:
        """Cancelling an outer call: a nested call's checkpoints raise, and a nested
        call running in a task of its own (create_task) is cancelled too."""
        seen: list[str] = []

        @cancellable
        async def in_own_task() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("own task cancelled")
                raise

        @cancellable
        async def nested(outer: CancelScope) -> None:
            inner = current_scope()
            assert inner is not None
            assert outer is not inner
            outer.cancel("outer stop")
            assert inner.cancel_called is False
            try:
                checkpoint()
            except Cancelled as exc:
                seen.append(f"checkpoint: {exc.reason.message}")
            await asyncio.sleep(30)

        @cancellable
        async def outer_call() -> None:
            outer = current_scope()
            assert outer is not None
            child = asyncio.ensure_future(in_own_task())
            await asyncio.sleep(0.01)
            try:
                await nested(outer)
            finally:
                await asyncio.gather(child, return_exceptions=True)

        with pytest.raises(Cancelled, match="outer stop"):
            asyncio.run(outer_call())

        assert ["checkpoint: outer stop", "own task cancelled"] == seen

    @needs_asyncio_timeout
    def test_asyncio_timeout_around_the_call(self) -> None:
        """asyncio.timeout() outside the call expires as TimeoutError, counts balanced."""

        @cancellable(timeout=30)
        async def work() -> None:
            await asyncio.sleep(30)

        async def main() -> int:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await work()
            task = asyncio.current_task()
            assert task is not None
            return task.cancelling()

        assert 0 == asyncio.run(main())

    @needs_asyncio_timeout
    def test_our_deadline_inside_asyncio_timeout(self) -> None:
        """The call's deadline inside a longer asyncio.timeout() is Cancelled, not TimeoutError."""

        @cancellable(timeout=0.05)
        async def work() -> None:
            async with asyncio.timeout(30):
                await asyncio.sleep(30)

        async def main() -> tuple[str, int]:
            try:
                await work()
            except Cancelled as exc:
                task = asyncio.current_task()
                assert task is not None
                return exc.reason.source, task.cancelling()
            raise AssertionError("not cancelled")

        assert ("deadline", 0) == asyncio.run(main())

    @needs_asyncio_timeout
    def test_asyncio_timeout_inside_the_call(self) -> None:
        """An asyncio.timeout() inside the call works as always; the scope is not cancelled."""
        scopes: list[CancelScope | None] = []

        @cancellable(timeout=30)
        async def work() -> str:
            scopes.append(current_scope())
            try:
                async with asyncio.timeout(0.02):
                    await asyncio.sleep(30)
            except TimeoutError:
                return "timed out"
            return "no timeout"

        assert "timed out" == asyncio.run(work())
        assert scopes[0] is not None
        assert not scopes[0].cancel_called


class TestAnyio:
    """anyio's cancel scopes (asyncio backend) nest with a decorated call without surprises."""

    def test_anyio_scope_around_the_call(self) -> None:
        """anyio.move_on_after around the call: it moves on; our hooks ran; counts balanced."""
        ran: list[str] = []

        @cancellable(timeout=30)
        async def work() -> None:
            on_cancel(ran.append, "hook")
            await asyncio.sleep(30)

        async def main() -> tuple[bool, int]:
            with anyio.move_on_after(0.05) as outer:
                await work()
            task = asyncio.current_task()
            assert task is not None
            return outer.cancelled_caught, task.cancelling() if sys.version_info >= (3, 11) else 0

        assert (True, 0) == anyio.run(main, backend="asyncio")
        assert ["hook"] == ran

    def test_anyio_scope_inside_the_call(self) -> None:
        """An anyio scope inside the call works as always; the call's scope is not cancelled."""
        scopes: list[CancelScope | None] = []

        @cancellable(timeout=30)
        async def work() -> str:
            scopes.append(current_scope())
            with anyio.move_on_after(0.02) as inner:
                await asyncio.sleep(30)
            return "moved on" if inner.cancelled_caught else "no timeout"

        assert "moved on" == anyio.run(work, backend="asyncio")
        assert scopes[0] is not None
        assert not scopes[0].cancel_called

    def test_our_deadline_inside_an_anyio_scope(self) -> None:
        """The call's own deadline inside a longer anyio scope raises Cancelled ("deadline")."""

        @cancellable(timeout=0.05)
        async def work() -> None:
            with anyio.move_on_after(30):
                await asyncio.sleep(30)

        async def main() -> str:
            with anyio.CancelScope() as outer:
                try:
                    await work()
                except Cancelled as exc:
                    assert not outer.cancel_called
                    return exc.reason.source
            raise AssertionError("not cancelled")

        assert "deadline" == anyio.run(main, backend="asyncio")

    def test_cancel_from_another_thread_inside_an_anyio_task_group(self) -> None:
        """A cross-thread cancel of one call in an anyio task group stops only that call."""
        results: dict[str, str] = {}
        scopes: dict[str, CancelScope] = {}

        @cancellable
        async def job(name: str) -> None:
            scope = current_scope()
            assert scope is not None
            scopes[name] = scope
            try:
                await asyncio.sleep(0.3 if name == "keep" else 30)
                results[name] = "done"
            except asyncio.CancelledError:
                results[name] = "cancelled"
                raise

        async def guarded(name: str) -> None:
            try:
                await job(name)
            except Cancelled as exc:
                results[name] += f" ({exc.reason.message})"

        async def main() -> None:
            async with anyio.create_task_group() as group:
                group.start_soon(guarded, "keep")
                group.start_soon(guarded, "stop")
                while "stop" not in scopes:
                    await asyncio.sleep(0.005)
                cancel_from_thread(scopes["stop"], "only this one", delay=0.02)

        anyio.run(main, backend="asyncio")
        assert {"keep": "done", "stop": "cancelled (only this one)"} == results


class TestCancelCallback:
    """`CancelScope.add_cancel_callback`."""

    def test_called_once_on_cancel_with_the_reason(self) -> None:
        """Called once, with the first reason; later cancels add nothing."""
        calls: list[CancelReason] = []
        with CancelScope() as scope:
            scope.add_cancel_callback(calls.append)
            scope.cancel("first")
            scope.cancel("second")

        assert ["first"] == [reason.message for reason in calls]

    def test_called_when_an_enclosing_scope_is_cancelled(self) -> None:
        """The cancellation of an unshielded enclosing scope reaches it; a shield's does not."""
        inner_calls: list[str] = []
        shielded_calls: list[str] = []
        with CancelScope() as outer, CancelScope() as inner, CancelScope(shield=True) as shielded:
            inner.add_cancel_callback(lambda r: inner_calls.append(r.message))
            shielded.add_cancel_callback(lambda r: shielded_calls.append(r.message))
            outer.cancel("outer")

        assert ["outer"] == inner_calls
        assert [] == shielded_calls

    def test_called_by_the_deadline(self) -> None:
        """A deadline calls it from the timer thread."""
        fired = threading.Event()
        sources: list[str] = []

        def callback(reason: CancelReason) -> None:
            sources.append(reason.source)
            fired.set()

        with CancelScope(deadline=time.monotonic() + 0.05) as scope:
            scope.add_cancel_callback(callback)
            assert fired.wait(5)

        assert ["deadline"] == sources

    def test_already_cancelled_calls_at_once_and_removed_is_not_called(self) -> None:
        """Added to a cancelled scope: called at once.  Removed before: never called."""
        calls: list[str] = []
        with CancelScope() as scope:
            remove = scope.add_cancel_callback(lambda r: calls.append("removed"))
            remove()
            scope.cancel("x")
            scope.add_cancel_callback(lambda r: calls.append("late"))

        assert ["late"] == calls

    def test_a_failing_callback_is_reported_not_raised(self) -> None:
        """An exception goes to sys.unraisablehook; cancel() and later callbacks go on."""
        calls: list[str] = []
        reported: list[BaseException | None] = []

        def boom(reason: CancelReason) -> None:
            raise RuntimeError("boom")

        old_hook = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: reported.append(unraisable.exc_value)
        try:
            with CancelScope() as scope:
                scope.add_cancel_callback(boom)
                scope.add_cancel_callback(lambda r: calls.append("second"))
                scope.cancel("x")
        finally:
            sys.unraisablehook = old_hook

        assert ["second"] == calls
        assert ["boom"] == [str(exc) for exc in reported]

    def test_needs_a_callable(self) -> None:
        """A non-callable is a TypeError."""
        with CancelScope() as scope, pytest.raises(TypeError, match="callable"):
            scope.add_cancel_callback("nope")  # type: ignore[arg-type]


class TestRefused:
    """What ``@cancellable`` refuses at decoration time, with a TypeError."""

    def test_generator_function(self) -> None:
        """A generator function: the scope would close before the first item."""
        with pytest.raises(TypeError, match="generator function"):

            @cancellable
            def items() -> Iterator[int]:
                yield 1

    def test_async_generator_function(self) -> None:
        """An async generator function, also with options."""
        with pytest.raises(TypeError, match="async generator function"):

            @cancellable(timeout=1)
            async def items() -> AsyncIterator[int]:
                yield 1

    def test_generator_staticmethod(self) -> None:
        """A generator wrapped in staticmethod is seen through."""
        with pytest.raises(TypeError, match="generator function"):

            class Holder:
                @cancellable
                @staticmethod
                def items() -> Iterator[int]:
                    yield 1


class TestSwallowed:
    """A cancelled call that catches the cancellation and returns: ``cancel.swallowed``."""

    def test_sync_body(self) -> None:
        """A sync body that catches Cancelled and returns logs a warning naming it."""

        @cancellable
        def stubborn() -> str:
            scope = current_scope()
            assert scope is not None
            scope.cancel("stop")
            try:
                checkpoint()
            except BaseException:  # what the test is about
                pass
            return "carried on"

        with capture_logs() as logs:
            assert "carried on" == stubborn()

        swallowed = [e for e in logs if e["event"] == "cancel.swallowed"]
        assert 1 == len(swallowed)
        assert "warning" == swallowed[0]["log_level"]
        assert swallowed[0]["function"].endswith("stubborn")

    def test_async_body(self) -> None:
        """An async body that catches CancelledError and returns logs the warning too."""

        @cancellable
        async def stubborn() -> str:
            scope = current_scope()
            assert scope is not None
            cancel_from_thread(scope, "stop", delay=0)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pass
            return "carried on"

        with capture_logs() as logs:
            assert "carried on" == asyncio.run(stubborn())

        assert 1 == len([e for e in logs if e["event"] == "cancel.swallowed"])

    def test_not_cancelled_is_silent(self) -> None:
        """A call that was never cancelled logs nothing of the kind."""

        @cancellable
        def fine() -> str:
            return "ok"

        with capture_logs() as logs:
            fine()

        assert [] == [e for e in logs if e["event"] == "cancel.swallowed"]
