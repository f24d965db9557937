"""The worker's side of shutdowns and lost connections (`cancellable.celery._shutdown`).

Real apps, a real worker runtime (`tests.celery_runtime.running_worker`),
real ``Request`` objects from messages on Redis held in Celery's own worker
state, a real ``Consumer`` of a ``WorkController`` built for the app.  What
the tasks then do (stop, clean up, go back to the broker, run again) is
shown on real workers in ``tests/integration/test_shutdown.py`` and
``tests/integration/test_connection_loss.py``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery import _state as celery_state
from celery.worker import state as worker_state
from celery.worker.consumer.consumer import Consumer
from kombu import Connection
from tests.celery_runtime import running_worker
from tests.celery_worker import Messages, clean_worker_state, make_app, messages_fixture

from cancellable import CancelScope, cancellable
from cancellable.celery import _shutdown
from cancellable.celery._activation import WorkerStep
from cancellable.celery._registry import RunningTask
from cancellable.celery._runtime import WorkerRuntime

__all__ = ["clean_worker_state", "messages_fixture"]

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _app(**conf: Any) -> Celery:
    app = make_app(**conf)

    @app.task(name="ws.late", acks_late=True, shared=False)
    @cancellable
    def late() -> str:
        return "ran"

    return app


@contextlib.contextmanager
def _worker(**conf: Any) -> Iterator[WorkerRuntime]:
    """A running worker's runtime for an app with tasks acked early and late."""
    app = _app(**conf)
    try:
        with running_worker(app, mailbox_slots=16) as rt:
            yield rt
    finally:
        app.close()


@pytest.fixture(name="rt")
def rt_fixture(rdb: Any) -> Iterator[WorkerRuntime]:
    with _worker() as rt:
        yield rt


@pytest.fixture(name="graced")
def graced_fixture(rdb: Any) -> Iterator[WorkerRuntime]:
    with _worker(cancellable_shutdown_grace=2.0) as rt:
        yield rt


def _run_here(rt: WorkerRuntime, name: str) -> RunningTask:
    """A task of ``name`` running in the worker's own process (an in-process pool)."""
    entry = RunningTask(str(uuid.uuid4()), name, CancelScope())
    rt.tasks.running.register(entry)
    return entry


def test_without_the_setting_a_shutdown_cancels_nothing(rt: WorkerRuntime) -> None:
    """``cancellable_shutdown_grace`` unset: Celery's own warm shutdown, no task touched."""
    entry = _run_here(rt, "ws.cancellable_job")

    assert [] == _shutdown.begin_shutdown(rt)
    assert not entry.scope.cancel_called


def test_a_shutdown_cancels_every_running_cancellable_task(graced: WorkerRuntime) -> None:
    """With the setting, each running ``@cancellable`` task (acked early or late) is
    cancelled with source ``shutdown`` and put on the ladder with the shutdown grace
    and no terminate step; a plain task is left to Celery."""
    rt = graced
    early = _run_here(rt, "ws.cancellable_job")
    late = _run_here(rt, "ws.late")
    plain = _run_here(rt, "ws.job")

    cancelled = _shutdown.begin_shutdown(rt)

    assert sorted([early.task_id, late.task_id]) == sorted(cancelled)
    for entry in (early, late):
        reason = entry.scope.cancel_reason
        assert reason is not None
        assert "shutdown" == reason.source
        assert "worker shutdown" in reason.message
    assert not plain.scope.cancel_called
    rungs = rt.ladder.rungs()
    assert {early.task_id, late.task_id} == set(rungs)
    assert all(r.grace == 2.0 and r.kill_after is None for r in rungs.values())
    # Nothing is indexed: the next run of the same id must not be skipped.
    assert rt.index.match(early.task_id) is None


def _consumer(app: Celery, url: str) -> Consumer:
    """The consumer of a worker built (not started) for ``app``, with a connection to ``url``.

    Building the worker makes the integration's step and its runtime; that
    step is shut down again, so the test's own runtime is the one in place.
    """
    blocks = celery_state.task_join_will_block()
    controller = app.WorkController(pool_cls="solo", without_mingle=True, without_gossip=True)
    # Building the solo pool sets Celery's process-wide "a join would block"
    # flag, which would make every later test's ``result.get()`` refuse.
    celery_state._set_task_join_will_block(blocks)
    for step in controller.steps:
        if isinstance(step, WorkerStep):
            step.shutdown(controller)
    consumer = controller.consumer
    consumer.connection = Connection(url)
    return consumer


def _held_active(messages: Messages, name: str) -> Any:
    request = messages.held(name=name)
    worker_state.task_accepted(request)
    return request


@pytest.mark.parametrize(
    ("url", "conf", "stops"),
    [
        (AMQP_URL, {}, True),
        (AMQP_URL, {"cancellable_cancel_on_connection_loss": False}, False),
        ("redis://127.0.0.1:1/0", {}, False),
    ],
)
def test_a_lost_amqp_connection_cancels_the_acks_late_tasks(
    rdb: Any, url: str, conf: dict[str, Any], stops: bool
) -> None:
    """Celery's connection-loss hook, wrapped: on AMQP, the running ``@cancellable``
    ``acks_late`` task is cancelled with source ``connection_lost`` and its message
    marked never to be acknowledged; the task acked early is left alone.  Nothing is
    stopped with the setting off, nor on Redis (nothing is redelivered there).
    Celery's ``worker_cancel_long_running_tasks_on_connection_loss`` is on: it
    skips the request whose acknowledgement was dropped."""
    app = _app(worker_cancel_long_running_tasks_on_connection_loss=True, **conf)
    messages = Messages(app)
    consumer = _consumer(app, url)
    try:
        with running_worker(app, mailbox_slots=16) as rt:
            late_request = _held_active(messages, "ws.late")
            early_request = _held_active(messages, "ws.cancellable_job")
            late = RunningTask(late_request.id, "ws.late", CancelScope())
            early = RunningTask(early_request.id, "ws.cancellable_job", CancelScope())
            rt.tasks.running.register(late)
            rt.tasks.running.register(early)

            Consumer.on_connection_error_after_connected(consumer, OSError("lost"))

            reason = late.scope.cancel_reason
            assert stops is (reason is not None)
            assert stops is bool(late_request.acknowledged)
            if reason is not None:
                assert "connection_lost" == reason.source
            assert not early.scope.cancel_called
            assert not early_request.acknowledged
    finally:
        messages.close()
        app.close()
