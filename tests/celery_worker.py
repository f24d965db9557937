"""Shared pieces of the worker-side unit tests: real apps, real requests, a runtime each.

The tests call the real ``revoke`` control handler from Celery's ``Panel``
registry (Celery's own code, with our wrapper around it), build real
``celery.worker.request.Request`` objects from task messages published to
and fetched back from a real broker (Redis DB 12), and hold them in Celery's
own ``worker_state`` with its own functions.  Each test gets a worker
runtime of its own (`tests.celery_runtime.running_worker`).  Test modules
import the fixtures they use from here.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.utils.collections import AttributeDict
from celery.worker import state as worker_state
from celery.worker.control import Panel
from celery.worker.request import Request
from kombu import Connection, Exchange, Queue
from tests import redis_dbs
from tests.celery_runtime import running_worker

from cancellable import CancelScope, cancellable
from cancellable.celery import _ledger
from cancellable.celery._mailbox import Mailbox
from cancellable.celery._poller import Poller
from cancellable.celery._registry import RunningTask
from cancellable.celery._runtime import WorkerRuntime, runtime

__all__ = [
    "REDIS_URL",
    "Messages",
    "app_fixture",
    "box_fixture",
    "clean_worker_state",
    "ledger_entries",
    "make_app",
    "messages_fixture",
    "revoke",
    "rt_fixture",
    "running",
]

REDIS_URL = redis_dbs.url(redis_dbs.UNIT_DB)


def _forget_worker_state() -> None:
    """Empty Celery's own per-process worker bookkeeping (``celery.worker.state``)."""
    worker_state.revoked.clear()
    worker_state.requests.clear()
    worker_state.reserved_requests.clear()
    worker_state.active_requests.clear()


@pytest.fixture(name="clean_worker_state", autouse=True)
def clean_worker_state() -> Iterator[None]:
    """Each test starts and ends with Celery's worker state empty."""
    _forget_worker_state()
    yield
    _forget_worker_state()


def make_app(**conf: Any) -> Celery:
    """An app on Redis DB 12 (broker, result backend, ledger) with one task."""
    app = Celery(f"ws-{uuid.uuid4().hex[:8]}", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.broker_connection_retry_on_startup = True
    app.conf.update(conf)

    @app.task(name="ws.job", shared=False)
    def job() -> str:
        return "ran"

    @app.task(name="ws.cancellable_job", shared=False)
    @cancellable
    def cancellable_job() -> str:
        return "ran"

    return app


@pytest.fixture(name="app")
def app_fixture(rdb: redis.Redis) -> Iterator[Celery]:
    """An app on Redis DB 12 (broker, result backend, ledger) with one task."""
    app = make_app()
    yield app
    app.close()


@pytest.fixture(name="rt")
def rt_fixture(app: Celery) -> Iterator[WorkerRuntime]:
    """A running worker's runtime for ``app`` (a 64-slot mailbox), this process's."""
    with running_worker(app, mailbox_slots=64) as rt:
        yield rt


@pytest.fixture(name="box")
def box_fixture(rt: WorkerRuntime) -> Mailbox:
    """The worker's mailbox (64 slots), shared with prefork children."""
    assert rt.mailbox is not None
    return rt.mailbox


class Messages:
    """Task messages sent to a private queue on the real broker and fetched back
    as the worker's consumer receives them, turned into real ``Request`` objects."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        name = f"ws-q-{uuid.uuid4().hex[:8]}"
        self.queue = Queue(name, Exchange(name), name)
        self.conn = Connection(REDIS_URL)
        self.queue(self.conn.default_channel).declare()

    def request(self, task_id: str | None = None, name: str = "ws.job", **options: Any) -> Request:
        """Send task ``name`` with ``options`` and build the Request the consumer would."""
        task_id = task_id or str(uuid.uuid4())
        self.app.tasks[name].apply_async(task_id=task_id, queue=self.queue.name, **options)
        bound = self.queue(self.conn.default_channel)
        deadline = time.monotonic() + 5
        message = bound.get(no_ack=False)
        while message is None and time.monotonic() < deadline:
            time.sleep(0.01)
            message = bound.get(no_ack=False)
        assert message is not None, "the task message did not arrive"
        return Request(
            message,
            on_ack=message.ack_log_error,
            on_reject=message.reject_log_error,
            app=self.app,
            task=self.app.tasks[name],
        )

    def held(
        self, task_id: str | None = None, name: str = "ws.cancellable_job", **options: Any
    ) -> Request:
        """A request this worker holds (reserved), via Celery's own ``task_reserved``
        (of the ``@cancellable`` task unless ``name`` says otherwise)."""
        request = self.request(task_id, name, **options)
        worker_state.task_reserved(request)
        return request

    def close(self) -> None:
        """Drop the connection."""
        self.conn.close()


@pytest.fixture(name="messages")
def messages_fixture(app: Celery) -> Iterator[Messages]:
    """Real task messages for ``app``."""
    messages = Messages(app)
    yield messages
    messages.close()


def revoke(app: Celery, task_id: str | list[str], **extra: object) -> object:
    """Call the registered ``revoke`` control command as the consumer does."""
    handler = Panel.data["revoke"]
    return handler(AttributeDict(app=app), task_id=task_id, **{"terminate": False, **extra})


@contextlib.contextmanager
def running(rt: WorkerRuntime, task_id: str, **fields: Any) -> Iterator[RunningTask]:
    """A ``@cancellable`` task registered as running in the worker's own process."""
    entry = RunningTask(task_id, "ws.cancellable_job", CancelScope(), **fields)
    rt.tasks.running.register(entry)
    try:
        yield entry
    finally:
        rt.tasks.running.unregister(entry)


def ledger_entries(app: Celery) -> list[_ledger.Entry]:
    """Everything the app's ledger holds, once the running worker's queued records
    are written (what its ledger thread does, `Poller.flush`)."""
    worker = runtime().worker
    if worker is not None and worker.app is app:
        assert Poller(worker).flush(), "the queued ledger records could not be written"
    entries, _ = runtime().ledgers.get(app).read(None)
    return entries
