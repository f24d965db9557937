"""``@cancellable`` with Celery: ``async def`` task bodies, and the decorator order it refuses."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task
from celery import _state as celery_state
from celery.exceptions import TaskRevokedError
from structlog.testing import capture_logs
from tests.helpers import cancel_from_thread

from cancellable import _scope, cancellable, current_scope, on_cancel


class TestRefused:
    """What ``@cancellable`` refuses at decoration time on a Celery task, with a TypeError."""

    def test_above_app_task(self) -> None:
        """``@cancellable`` written above ``@app.task``: the message shows the right order."""
        app = Celery(f"order-{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
        try:
            with pytest.raises(TypeError, match=r"@app\.task\(bind=True\).*\n.*@cancellable"):

                @cancellable
                @app.task(shared=False)
                def job() -> None: ...

            app.finalize()
            with pytest.raises(TypeError, match="directly below the task decorator"):

                @cancellable
                @app.task(shared=False)
                def evaluated() -> None: ...

        finally:
            app.close()

    def test_above_shared_task(self) -> None:
        """``@cancellable`` above ``@shared_task``: refused without evaluating the proxy."""
        finalizers = set(celery_state._on_app_finalizers)
        try:
            with pytest.raises(TypeError, match="@shared_task"):

                @cancellable
                @shared_task(name=f"test-async-refused-{uuid.uuid4().hex}")
                def job() -> None: ...

        finally:
            # shared_task registers itself with every app finalized later.
            celery_state._on_app_finalizers.intersection_update(finalizers)


@pytest.fixture(name="app")
def app_fixture() -> Iterator[Celery]:
    """An in-memory app: tasks run in this process through Celery's tracer."""
    app = Celery(
        f"async-{uuid.uuid4().hex[:8]}",
        broker="memory://",
        backend="cache+memory://",
        set_as_current=False,
    )
    app.conf.cancellable_ledger_url = "none"
    yield app
    app.close()


class TestCeleryAsyncBody:
    """An ``async def`` task body run through Celery's tracer (eagerly)."""

    def test_result_comes_back(self, app: Celery) -> None:
        """The coroutine runs to completion; Celery gets its value."""

        @app.task(bind=True, shared=False)
        @cancellable
        async def job(self: Any, x: int) -> dict[str, int]:
            await asyncio.sleep(0)
            return {"x": x}

        assert {"x": 3} == job.apply(args=(3,)).get()

    def test_cancelled_at_await_ends_revoked(self, app: Celery) -> None:
        """Cancelling the task's scope from another thread: REVOKED with the reason, hook ran."""
        ran: list[str] = []

        @app.task(bind=True, shared=False)
        @cancellable
        async def job(self: Any) -> str:
            on_cancel(ran.append, "hook")
            scope = current_scope()
            assert scope is not None
            cancel_from_thread(scope, "stop now")
            try:
                await asyncio.sleep(30)
            finally:
                ran.append("finally")
            return "unreachable"

        result = job.apply()

        assert ["finally", "hook"] == ran
        with pytest.raises(TaskRevokedError, match="stop now"):
            result.get()

    @pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
    def test_work_queued_by_a_signal_handler_wakes_the_loop(self, app: Celery) -> None:
        """A signal handler's queued cancel (a prefork wake-up) reaches the await at once.

        The handler only queues work (``request_slow_path``), as the prefork
        delivery does; the awaiting coroutine reaches no checkpoint, so the
        loop must be woken to run it.  It is, well within the 30 s sleep.
        """
        timings: dict[str, float] = {}

        @app.task(bind=True, shared=False)
        @cancellable
        async def job(self: Any) -> str:
            scope = current_scope()
            assert scope is not None

            def handler(signum: int, frame: object) -> None:
                _scope.request_slow_path(lambda: scope.cancel("from a signal"))

            previous = signal.signal(signal.SIGUSR1, handler)
            try:
                asyncio.get_running_loop().call_later(
                    0.05,
                    lambda: (
                        timings.update(sent=time.monotonic()),
                        os.kill(os.getpid(), signal.SIGUSR1),
                    ),
                )
                try:
                    await asyncio.sleep(30)
                finally:
                    timings["woken"] = time.monotonic()
            finally:
                signal.signal(signal.SIGUSR1, previous)
            return "unreachable"

        result = job.apply()

        with pytest.raises(TaskRevokedError, match="from a signal"):
            result.get()
        assert timings["woken"] - timings["sent"] < 1.0

    def test_swallowed_names_the_task(self, app: Celery) -> None:
        """The warning carries the task's id and name."""

        @app.task(bind=True, shared=False, name="async.stubborn")
        @cancellable
        async def job(self: Any) -> str:
            scope = current_scope()
            assert scope is not None
            cancel_from_thread(scope, "stop", delay=0)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pass
            return "carried on"

        with capture_logs() as logs:
            result = job.apply()

        assert "carried on" == result.get()
        swallowed = [e for e in logs if e["event"] == "cancel.swallowed"]
        assert [("async.stubborn", result.id)] == [
            (e["task_name"], e["task_id"]) for e in swallowed
        ]
