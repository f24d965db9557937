"""The worker-side handlers, driven in this process against real Redis.

These call the real ``revoke`` control handler from Celery's ``Panel``
registry (Celery's own code, with our wrapper around it), the ledger poll and
the ``task_revoked`` receiver directly, the way a worker's consumer thread
would.  Real workers are exercised end to end in ``tests/integration``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
from celery import Celery
from celery.utils.collections import AttributeDict
from celery.worker import state as worker_state
from celery.worker.control import Panel
from structlog.testing import capture_logs

import cancellable.celery  # noqa: F401 - installs the wrapper around Panel.data["revoke"]
from cancellable import CancelReason, CancelScope
from cancellable.celery import _delivery, _ledger, _worker

REDIS_URL = "redis://127.0.0.1:6379/12"


@pytest.fixture(name="app")
def app_fixture() -> Iterator[Celery]:
    """An app on Redis DB 12 (flushed), set as the worker's app for the test."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"Redis is not answering on {REDIS_URL}: {exc}. Start redis-server.")
    client.flushdb()
    app = Celery(f"ws-{uuid.uuid4().hex[:8]}", broker=REDIS_URL, backend=REDIS_URL)
    _ledger.reset()
    previous = _worker._worker_app
    _worker._worker_app = app
    yield app
    _worker._worker_app = previous
    _ledger.reset()
    client.flushdb()
    app.close()


@pytest.fixture(name="task_id")
def task_id_fixture() -> Iterator[str]:
    """A fresh task id, removed from Celery's revoked set afterwards."""
    task_id = str(uuid.uuid4())
    yield task_id
    worker_state.revoked.discard(task_id)
    _delivery._early.pop(task_id, None)
    _worker._awaiting.pop(task_id, None)
    _worker._polled.discard(task_id)


def revoke(app: Celery, task_id: str, **extra: object) -> object:
    """Call the registered ``revoke`` control command as the consumer does."""
    handler = Panel.data["revoke"]
    return handler(AttributeDict(app=app), task_id=task_id, terminate=False, **extra)


class TestRevokeHandler:
    """The wrapper around Celery's own revoke command."""

    def test_wrapper_is_installed_once(self) -> None:
        """Importing cancellable.celery again does not wrap the handler twice."""
        handler = Panel.data["revoke"]

        _worker.install()
        _worker._wrap_revoke()

        assert handler is Panel.data["revoke"]
        assert handler._cancellable_original.__name__ == "revoke"  # type: ignore[attr-defined]

    def test_plain_revoke_is_recorded_durably(self, app: Celery, task_id: str) -> None:
        """A plain revoke of an unknown task: Celery's bookkeeping plus a ledger entry."""
        revoke(app, task_id)

        assert task_id in worker_state.revoked
        assert "REVOKED" == app.AsyncResult(task_id).state
        recorded = _ledger.ledger_for(app).lookup([task_id])[task_id]
        assert ("revoked", "") == (recorded.source, recorded.message)

    def test_cancel_payload_stores_its_reason_first(self, app: Celery, task_id: str) -> None:
        """With cancel()'s payload, the first REVOKED stored already has the reason."""
        reason = CancelReason(source="revoked", message="stop", requested_by="alice")

        revoke(app, task_id, cancellable=reason.to_dict())

        assert "revoked by alice: stop" == str(app.AsyncResult(task_id).result)

    def test_running_task_in_this_process_is_cancelled(self, app: Celery, task_id: str) -> None:
        """A task running here (threads pool) is cancelled directly, with the reason."""
        entry = _delivery.RunningTask(task_id, "t", CancelScope())
        _delivery.register(entry)
        try:
            with capture_logs() as logs:
                revoke(app, task_id, cancellable={"source": "revoked", "message": "halt"})

            assert entry.revoked()
            assert "halt" == entry.scope.cancel_reason.message  # type: ignore[union-attr]
            assert "local" == next(e["how"] for e in logs if e["event"] == "cancel.delivered")
        finally:
            _delivery.unregister(entry)

    def test_malformed_payload_falls_back_to_a_plain_revoke(
        self, app: Celery, task_id: str
    ) -> None:
        """A payload that is not a valid reason is treated as a plain revoke."""
        revoke(app, task_id, cancellable={"source": "not-a-source"})

        recorded = _ledger.ledger_for(app).lookup([task_id])[task_id]
        assert "revoked" == recorded.source
        assert _worker._reason_from(42) is None

    def test_ledger_down_is_logged_not_raised(self, app: Celery, task_id: str) -> None:
        """A plain revoke with the ledger unreachable still revokes, with an event."""
        app.conf.cancellable_ledger_url = "redis://127.0.0.1:1/0"

        with capture_logs() as logs:
            revoke(app, task_id)

        assert task_id in worker_state.revoked
        assert "ledger.unavailable" in [e["event"] for e in logs]


class TestLedgerPoll:
    """The safety-net poll of the ledger."""

    def test_poll_revokes_new_ids_and_cancels_running_ones(self, app: Celery, task_id: str) -> None:
        """A cancellation recorded elsewhere is learnt and delivered once."""
        queued = f"queued-{uuid.uuid4()}"
        entry = _delivery.RunningTask(task_id, "t", CancelScope())
        _delivery.register(entry)
        _worker._cursor = 0.0
        try:
            _ledger.ledger_for(app).record([task_id, queued], CancelReason(message="late"))
            with capture_logs() as logs:
                _worker._poll_ledger(app)
                _worker._poll_ledger(app)

            assert {task_id, queued} <= set(worker_state.revoked)
            assert entry.revoked()
            assert 1 == [e["event"] for e in logs].count("cancel.delivered")
        finally:
            _delivery.unregister(entry)
            worker_state.revoked.discard(queued)


class TestTaskRevokedReceiver:
    """Replacing Celery's bare 'revoked' with the ledger's reason on discard."""

    def test_discard_gets_the_recorded_reason(self, app: Celery, task_id: str) -> None:
        """A task discarded on receipt ends with the reason recorded by cancel()."""
        _ledger.ledger_for(app).record(
            [task_id], CancelReason(source="revoked", message="dup", requested_by="ops")
        )
        app.backend.mark_as_revoked(task_id, reason="revoked")
        request = SimpleNamespace(id=task_id, task=SimpleNamespace(backend=app.backend))

        _worker._on_task_revoked(sender=None, request=request, terminated=False)

        assert "revoked by ops: dup" == str(app.AsyncResult(task_id).result)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"terminated": True},
            {"reason": CancelReason()},
            {"request": None},
        ],
    )
    def test_left_alone(self, app: Celery, task_id: str, kwargs: dict[str, object]) -> None:
        """Terminations, our own signal and requestless calls keep Celery's result."""
        _ledger.ledger_for(app).record([task_id], CancelReason(message="dup"))
        app.backend.mark_as_revoked(task_id, reason="revoked")
        arguments: dict[str, object] = {
            "request": SimpleNamespace(id=task_id, task=SimpleNamespace(backend=app.backend)),
            **kwargs,
        }

        _worker._on_task_revoked(sender=None, **arguments)

        assert "revoked" == str(app.AsyncResult(task_id).result)

    def test_plain_revoke_keeps_celerys_result(self, app: Celery, task_id: str) -> None:
        """A ledger entry without a message or author changes nothing."""
        _ledger.ledger_for(app).record([task_id], CancelReason(source="revoked"))
        app.backend.mark_as_revoked(task_id, reason="revoked")
        request = SimpleNamespace(id=task_id, task=SimpleNamespace(backend=app.backend))

        _worker._on_task_revoked(sender=None, request=request)

        assert "revoked" == str(app.AsyncResult(task_id).result)
