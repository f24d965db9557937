"""The task boundary, through Celery's own tracer in this process (``apply()``).

``Task.apply()`` runs a task through the same tracer a worker uses, with a
real request, so these tests see exactly what the boundary does with a
`Cancelled`: the stored state, the ``Ignore``, the events.  Revokes arriving
from outside are proven on real workers in ``tests/integration``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.app.trace import build_tracer
from celery.exceptions import TaskRevokedError
from celery.worker import state as worker_state
from structlog.testing import capture_logs

from cancellable import (
    Cancelled,
    CancelReason,
    cancellable,
    checkpoint,
    current_scope,
    on_cancel,
)


@pytest.fixture(name="app")
def app_fixture() -> Iterator[Celery]:
    """An in-memory app: tasks run in this process through Celery's tracer."""
    app = Celery(
        f"tb-{uuid.uuid4().hex[:8]}",
        broker="memory://",
        backend="cache+memory://",
        set_as_current=False,
    )
    app.conf.cancellable_ledger_url = "none"
    yield app
    app.close()


class TestBoundary:
    """What happens when a Cancelled reaches the task boundary."""

    def test_cancelled_task_ends_revoked_with_its_reason(self, app: Celery) -> None:
        """Hooks run, the state is REVOKED with the reason, and the trace is 'ignored'."""
        ran: list[str] = []

        @app.task(bind=True, shared=False)
        @cancellable
        def job(self: Any) -> str:
            on_cancel(ran.append, "hook")
            scope = current_scope()
            assert scope is not None
            scope.cancel("stop now")
            checkpoint()
            return "unreachable"

        with capture_logs() as logs:
            result = job.apply()

        assert ["hook"] == ran
        assert "FAILURE" == result.state
        with pytest.raises(TaskRevokedError, match=r"^manual: stop now$"):
            result.get()
        assert "REVOKED" == app.AsyncResult(result.id).state
        stored = str(app.AsyncResult(result.id).result)
        assert "manual: stop now (stopped at a checkpoint)" == stored
        cancelled = [e for e in logs if e["event"] == "task.cancelled"]
        assert 1 == len(cancelled)
        assert result.id == cancelled[0]["task_id"]
        assert cancelled[0]["observed_ms"] is not None

    def test_in_a_worker_the_trace_is_ignored(self, app: Celery) -> None:
        """Traced as a worker traces (not eagerly), a cancelled task raises Ignore:
        Celery stores nothing over the REVOKED state the boundary stored."""

        @app.task(bind=True, shared=False)
        @cancellable
        def job(self: Any) -> str:
            current_scope().cancel("stop now")  # type: ignore[union-attr]
            checkpoint()
            return "unreachable"

        task_id = str(uuid.uuid4())
        tracer = build_tracer(job.name, job, eager=False, app=app)
        traced = tracer(task_id, (), {}, {"id": task_id, "delivery_info": {}})

        assert "IGNORED" == traced.info.state
        assert "REVOKED" == app.AsyncResult(task_id).state
        assert "manual: stop now (stopped at a checkpoint)" == str(app.AsyncResult(task_id).result)

    def test_retry_from_a_cancelled_scope_ends_revoked(self, app: Celery) -> None:
        """A body that catches Cancelled and calls self.retry() still ends REVOKED."""
        runs: list[int] = []

        @app.task(bind=True, max_retries=3, shared=False)
        @cancellable
        def job(self: Any) -> None:
            runs.append(self.request.retries)
            try:
                current_scope().cancel("stop, do not retry")  # type: ignore[union-attr]
                checkpoint()
            except Cancelled as exc:
                raise self.retry(countdown=0) from exc

        result = job.apply()

        assert [0] == runs
        with pytest.raises(TaskRevokedError, match="stop, do not retry"):
            result.get()
        assert "REVOKED" == app.AsyncResult(result.id).state

    def test_never_retried_and_task_revoked_signal_sent(self, app: Celery) -> None:
        """autoretry_for=(Exception,) does not retry a cancelled task; task_revoked
        fires once, not terminated, with the reason."""
        from celery import signals

        calls: list[dict[str, Any]] = []
        runs: list[int] = []

        def receiver(**kwargs: Any) -> None:
            calls.append(kwargs)

        @app.task(shared=False, bind=True, autoretry_for=(Exception,), max_retries=3)
        @cancellable
        def job(self: Any) -> None:
            runs.append(self.request.retries)
            current_scope().cancel("no retry")  # type: ignore[union-attr]
            checkpoint()

        signals.task_revoked.connect(receiver, sender=job, weak=False)
        try:
            result = job.apply()
        finally:
            signals.task_revoked.disconnect(receiver, sender=job)

        assert [0] == runs
        assert "REVOKED" == app.AsyncResult(result.id).state
        assert 1 == len(calls)
        assert (False, None, "no retry") == (
            calls[0]["terminated"],
            calls[0]["signum"],
            calls[0]["reason"].message,
        )

    def test_request_revoked_reflects_the_scope(self, app: Celery) -> None:
        """``current_task.request.revoked()`` is False, then True after a cancel."""
        from celery import current_task

        seen: list[bool] = []

        @app.task(shared=False)
        @cancellable
        def job() -> None:
            seen.append(current_task.request.revoked())
            current_scope().cancel()  # type: ignore[union-attr]
            seen.append(current_task.request.revoked())
            checkpoint()

        job.apply()

        assert [False, True] == seen

    def test_already_revoked_task_skips_its_body(self, app: Celery) -> None:
        """A task whose id is in the revoked set never runs its body."""
        ran: list[bool] = []

        @app.task(shared=False)
        @cancellable
        def job() -> None:
            ran.append(True)

        task_id = str(uuid.uuid4())
        worker_state.revoked.add(task_id)
        try:
            with capture_logs() as logs:
                result = job.apply(task_id=task_id)
        finally:
            worker_state.revoked.discard(task_id)

        assert [] == ran
        assert "REVOKED" == app.AsyncResult(result.id).state
        assert ["task.skipped"] == [e["event"] for e in logs if e["event"].startswith("task.")]

    def test_nested_timeout_ends_the_task_as_revoked(self, app: Celery) -> None:
        """A nested @cancellable helper's timeout is an ordinary nested scope; its
        Cancelled reaches the boundary and ends the task with source 'deadline'."""

        @cancellable(timeout=0.01)
        def helper() -> None:
            while True:
                checkpoint()

        @app.task(shared=False)
        @cancellable
        def job() -> None:
            helper()

        result = job.apply()

        assert "REVOKED" == app.AsyncResult(result.id).state
        assert "deadline: deadline expired (stopped at a checkpoint)" == str(
            app.AsyncResult(result.id).result
        )

    def test_direct_call_is_a_plain_scope(self, app: Celery) -> None:
        """Calling the task function directly (no worker) cancels like any call."""

        @app.task(shared=False)
        @cancellable
        def job() -> None:
            current_scope().cancel("direct")  # type: ignore[union-attr]
            checkpoint()

        with pytest.raises(Cancelled) as caught:
            job()

        assert "direct" == caught.value.reason.message

    def test_result_not_stored_is_logged(self) -> None:
        """If the backend cannot store REVOKED, the task still ends, with an event."""
        app = Celery("nostore", broker="memory://", backend="redis://127.0.0.1:1/0")
        app.conf.cancellable_ledger_url = "none"
        app.conf.redis_socket_connect_timeout = 0.5
        app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 0}}

        @app.task(store_errors_even_if_ignored=True, shared=False)
        @cancellable
        def job() -> None:
            current_scope().cancel()  # type: ignore[union-attr]
            checkpoint()

        with capture_logs() as logs:
            result = job.apply()

        assert isinstance(result.result, TaskRevokedError)
        assert "task.result_not_stored" in [e["event"] for e in logs]
        app.close()


class TestAnnounced:
    """What a cancelled task leaves for the worker to announce, and the unobserved case."""

    def test_the_ignore_carries_the_message_and_the_members(self, app: Celery) -> None:
        """Traced as a worker traces, the task leaves an ``Ignore`` that carries its
        REVOKED message and the chain link it stored REVOKED (id and name), for the
        worker's ``task-revoked`` events."""
        from cancellable.celery._ending import CancelledEnding

        @app.task(bind=True, shared=False)
        @cancellable
        def job(self: Any) -> str:
            current_scope().cancel("stop now")  # type: ignore[union-attr]
            checkpoint()
            return "unreachable"

        task_id = str(uuid.uuid4())
        later = {"task": "tb.later", "options": {"task_id": "later-id"}, "subtask_type": None}
        tracer = build_tracer(job.name, job, eager=False, app=app)
        traced = tracer(task_id, (), {}, {"id": task_id, "delivery_info": {}, "chain": [later]})

        assert "IGNORED" == traced.info.state
        ending = traced.info.retval
        assert isinstance(ending, CancelledEnding)
        assert "manual: stop now (stopped at a checkpoint)" == ending.text
        assert [("later-id", "tb.later")] == ending.members
        assert "REVOKED" == app.AsyncResult("later-id").state

    def test_a_cancellation_no_checkpoint_saw_is_a_warning(self, app: Celery) -> None:
        """Cancelled after its last checkpoint, the task returns and ends SUCCESS; the
        boundary logs ``task.cancel_unobserved`` with the task id and the time since
        the request."""

        @app.task(bind=True, shared=False)
        @cancellable
        def job(self: Any) -> str:
            current_scope().cancel("too late")  # type: ignore[union-attr]
            return "finished"

        with capture_logs() as logs:
            result = job.apply()

        assert "finished" == result.get()
        warned = [e for e in logs if e["event"] == "task.cancel_unobserved"]
        assert 1 == len(warned), logs
        assert "warning" == warned[0]["log_level"]
        assert result.id == warned[0]["task_id"]
        assert "too late" == warned[0]["message"]
        assert 0.0 <= warned[0]["after_cancel_ms"] < 5000.0
        assert not [e for e in logs if e["event"] == "task.cancelled"]

    def test_a_task_that_saw_no_cancellation_logs_nothing(self, app: Celery) -> None:
        """A task that was never cancelled, or that stopped at a checkpoint, gets no
        ``task.cancel_unobserved``."""

        @app.task(bind=True, shared=False)
        @cancellable
        def job(self: Any) -> str:
            checkpoint()
            return "done"

        with capture_logs() as logs:
            assert "done" == job.apply().get()

        assert not [e for e in logs if e["event"] == "task.cancel_unobserved"]

    def test_the_current_span_records_the_cancellation(self, app: Celery) -> None:
        """With the OpenTelemetry SDK and a span current in the task, a cancelled
        task marks it: an event ``task.cancelled``, ``celery.revoked.reason`` and
        status ERROR with the message."""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.trace import StatusCode

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("tests")

        @app.task(bind=True, shared=False)
        @cancellable
        def job(self: Any) -> str:
            reason = CancelReason(source="manual", message="stop now", requested_by="alice")
            current_scope().cancel(reason)  # type: ignore[union-attr]
            checkpoint()
            return "unreachable"

        with tracer.start_as_current_span("run/job"):
            job.apply()
        (span,) = exporter.get_finished_spans()

        assert StatusCode.ERROR == span.status.status_code
        assert "manual by alice: stop now (stopped at a checkpoint)" == span.status.description
        assert (
            "manual by alice: stop now (stopped at a checkpoint)"
            == span.attributes["celery.revoked.reason"]
        )
        (event,) = [e for e in span.events if e.name == "task.cancelled"]
        assert "alice" == event.attributes["cancellable.requested_by"]
        assert "checkpoint" == event.attributes["cancellable.ended_by"]

    def test_no_span_no_opentelemetry_nothing_recorded(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a recording span, or without OpenTelemetry imported at all,
        `record_cancellation` does nothing (no dependency, no import)."""
        import sys

        from cancellable.celery import _otel

        reason = CancelReason(source="revoked", message="stop")
        assert not _otel.record_cancellation(reason, "revoked: stop", "checkpoint")
        monkeypatch.delitem(sys.modules, "opentelemetry.trace", raising=False)
        assert not _otel.record_cancellation(reason, "revoked: stop", "checkpoint")
