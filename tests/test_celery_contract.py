"""Contract tests: what `cancellable.celery._celery_internals` relies on still holds.

One test (or a few) per entry of the boundary module, against the installed
Celery, kombu, billiard and redis-py, with real objects: a real app, real
task messages published to and fetched back from Redis (DB 12) turned into
``celery.worker.request.Request`` objects, an embedded worker
(``start_worker``, threads pool) for the remote-control path, a real
prefork ``TaskPool`` (in a fresh interpreter) for billiard's internals.
Each docstring names the touchpoint and what breaks in cancellable if the
test fails.  The nox sessions run this file on every Celery minor the
package claims.

Where cancellable has already wrapped a Celery method in this process (it
activates when Celery is imported), a test reaches Celery's own function
with `original_of`, so it checks Celery, not our wrapper.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chain, signals
from celery.app.control import Control
from celery.concurrency.solo import TaskPool as SoloPool
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Ignore, TaskRevokedError
from celery.result import AsyncResult, GroupResult
from celery.worker import state as worker_state
from celery.worker.control import Panel
from celery.worker.request import Request, create_request_cls
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError
from tests import redis_dbs
from tests.helpers import run_python

from cancellable.celery import _celery_internals as internals
from cancellable.celery._celery_internals import original_of

REDIS_URL = redis_dbs.url(redis_dbs.UNIT_DB)

#: A loopback port nothing listens on (connection refused at once).
DEAD_REDIS = "redis://127.0.0.1:1/0"


def _forget_worker_state() -> None:
    worker_state.revoked.clear()
    worker_state.requests.clear()
    worker_state.reserved_requests.clear()
    worker_state.active_requests.clear()


@pytest.fixture(autouse=True)
def _clean_worker_state() -> Iterator[None]:
    """Each test starts and ends with Celery's worker bookkeeping empty."""
    _forget_worker_state()
    yield
    _forget_worker_state()


@pytest.fixture(name="app")
def app_fixture(rdb: redis.Redis) -> Iterator[Celery]:
    """An app on Redis DB 12 (broker and result backend) with one task."""
    app = Celery(f"contract-{uuid.uuid4().hex[:8]}", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.broker_connection_retry_on_startup = True
    app.conf.cancellable_ledger_url = "none"

    @app.task(name="contract.job", shared=False)
    def job() -> str:
        return "ran"

    @app.task(name="contract.whoami", shared=False)
    def whoami() -> list[Any]:
        task = internals.current_task()
        if task is None:
            return []
        request = task.request
        return [task.name, request.id, bool(request.called_directly), bool(request.is_eager)]

    @app.task(name="contract.ignored", shared=False)
    def ignored() -> None:
        task = internals.current_task()
        assert task is not None
        task.backend.store_result(task.request.id, TaskRevokedError("ours"), "REVOKED")
        raise Ignore()

    yield app
    app.close()


class Messages:
    """Task messages sent to a private queue on Redis and fetched back as the
    worker's consumer receives them, turned into real ``Request`` objects."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        name = f"contract-q-{uuid.uuid4().hex[:8]}"
        self.queue = Queue(name, Exchange(name), name)
        self.conn = Connection(REDIS_URL)
        self.queue(self.conn.default_channel).declare()

    def fetch(self) -> Any:
        """The next message on the queue (fails after 5 s)."""
        bound = self.queue(self.conn.default_channel)
        deadline = time.monotonic() + 5
        message = bound.get(no_ack=False)
        while message is None and time.monotonic() < deadline:
            time.sleep(0.01)
            message = bound.get(no_ack=False)
        assert message is not None, "the task message did not arrive"
        return message

    def request(self, task_id: str | None = None, **options: Any) -> Request:
        """Send ``contract.job`` with ``options`` and build the Request the consumer would."""
        task_id = task_id or str(uuid.uuid4())
        self.app.tasks["contract.job"].apply_async(
            task_id=task_id, queue=self.queue.name, **options
        )
        return self.as_request(self.fetch())

    def as_request(self, message: Any) -> Request:
        """The worker's ``Request`` for a fetched message."""
        return Request(
            message,
            on_ack=message.ack_log_error,
            on_reject=message.reject_log_error,
            app=self.app,
            task=self.app.tasks[message.headers["task"]],
        )

    def close(self) -> None:
        """Drop the connection."""
        self.conn.close()


@pytest.fixture(name="messages")
def messages_fixture(app: Celery) -> Iterator[Messages]:
    """Real task messages for ``app``."""
    messages = Messages(app)
    yield messages
    messages.close()


@pytest.fixture(name="celery_revoked")
def celery_revoked_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Request.revoked`` and ``_announce_revoked`` as Celery defines them, for one test."""
    monkeypatch.setattr(Request, "revoked", original_of(Request.revoked))
    monkeypatch.setattr(Request, "_announce_revoked", original_of(Request._announce_revoked))


def _wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return predicate()


# --------------------------------------------------------------------------
# celery.worker.state


class TestWorkerState:
    """``celery.worker.state``: the module-level bookkeeping we read."""

    def test_worker_requests_holds_reserved_requests_until_ready(self, messages: Messages) -> None:
        """``worker_requests()`` (``worker_state.requests``) names a request from
        ``task_reserved`` until ``task_ready``.  If not, delivery and the ladder
        cannot find the tasks a worker holds, and cancellations reach nothing."""
        request = messages.request()

        worker_state.task_reserved(request)
        held = dict(internals.worker_requests())
        worker_state.task_ready(request)

        assert {request.id: request} == held
        assert request.id not in internals.worker_requests()

    def test_active_request_ids_names_accepted_requests(self, messages: Messages) -> None:
        """``active_request_ids()`` (``worker_state.active_requests``) holds a request
        once the pool accepted it, not while only reserved.  If not,
        ``celery cancel --workflow`` reports running members as reserved."""
        request = messages.request()
        worker_state.task_reserved(request)
        reserved_only = internals.active_request_ids()

        request.on_accepted(pid=os.getpid(), time_accepted=time.monotonic())

        assert set() == reserved_only
        assert {request.id} == internals.active_request_ids()

    @pytest.mark.usefixtures("celery_revoked")
    def test_an_id_added_to_the_revoked_set_makes_celery_discard_the_request(
        self, app: Celery, messages: Messages
    ) -> None:
        """``add_revoked_id`` / ``is_revoked_id`` (``worker_state.revoked``): Celery's
        own ``Request.revoked()`` discards a request whose id is in the set, storing
        REVOKED and acknowledging it.  If not, tasks cancelled before they start run."""
        request = messages.request()
        before = internals.is_revoked_id(request.id)

        internals.add_revoked_id(request.id)
        discarded = request.revoked()

        assert (False, True, True) == (before, internals.is_revoked_id(request.id), discarded)
        assert "REVOKED" == app.AsyncResult(request.id).state
        assert request.acknowledged
        assert internals.request_already_revoked(request)


# --------------------------------------------------------------------------
# celery.worker.request.Request


class TestRequest:
    """Private parts of the worker's ``Request`` we read or call."""

    def test_worker_pid_is_set_when_the_pool_accepts_the_request(self, messages: Messages) -> None:
        """``request_worker_pid`` (``Request.worker_pid``) is None until ``on_accepted``
        gives the pool child's pid.  If not, the ladder never signals or kills the
        child running a task, and delivery never wakes it."""
        request = messages.request()
        before = internals.request_worker_pid(request)

        request.on_accepted(pid=4242, time_accepted=time.monotonic())

        assert (None, 4242) == (before, internals.request_worker_pid(request))

    def test_targets_attributes_of_a_request(self, messages: Messages) -> None:
        """A Request has ``id``, ``group``, ``root_id``, ``parent_id`` and ``type``
        as a task's ``Context`` has them.  If not, group and workflow targets match
        nothing in the worker's main process (``_index.request_targets``)."""
        task_id, group_id, root_id, parent_id = (str(uuid.uuid4()) for _ in range(4))

        request = messages.request(task_id, group_id=group_id, root_id=root_id, parent_id=parent_id)

        assert (task_id, group_id, root_id, parent_id, "contract.job") == (
            request.id,
            request.group,
            request.root_id,
            request.parent_id,
            request.type,
        )

    def test_request_embed_reads_the_rest_of_a_chain_and_links(
        self, app: Celery, messages: Messages
    ) -> None:
        """``request_embed`` (``Request._payload``): the first task of a chain
        carries the rest of it (last task first) and its links as signature dicts
        with their task ids.  If not, ``cancel(..., workflow=True)`` cannot reach a
        chain's running first task, and the unsent rest is not marked REVOKED."""
        job = app.tasks["contract.job"]
        first, second, third, linked = (str(uuid.uuid4()) for _ in range(4))
        workflow = chain(
            job.si().set(task_id=first, queue=messages.queue.name),
            job.si().set(task_id=second),
            job.si().set(task_id=third),
        )
        workflow.tasks[0].link(job.si().set(task_id=linked))

        workflow.apply_async()
        request = messages.as_request(messages.fetch())
        embed = internals.request_embed(request)

        assert embed is not None
        callbacks, rest, chord = embed
        assert first == request.id
        assert [third, second] == [sig["options"]["task_id"] for sig in rest]
        assert [linked] == [sig["options"]["task_id"] for sig in callbacks]
        assert chord is None
        assert internals.request_embed(request._context) is None

    @pytest.mark.usefixtures("celery_revoked")
    def test_announce_revoked_stores_acks_and_signals(
        self, app: Celery, messages: Messages
    ) -> None:
        """``announce_revoked`` (``Request._announce_revoked``) takes the request
        out of ``worker_state``, stores REVOKED with the given reason, acknowledges,
        marks it announced and sends ``task_revoked``.  If not, a terminated task's
        reason is lost, its message stays unacknowledged, or the pool's later
        Terminated report announces it a second time."""
        request = messages.request()
        worker_state.task_reserved(request)
        heard: list[tuple[Any, bool]] = []

        def on_revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
            heard.append((request.id, terminated))

        signals.task_revoked.connect(on_revoked, weak=False)
        try:
            internals.announce_revoked(request, "stopped by contract", True, 9, False)
        finally:
            signals.task_revoked.disconnect(on_revoked)

        result = app.AsyncResult(request.id)
        assert "REVOKED" == result.state
        assert "stopped by contract" in str(result.result)
        assert request.acknowledged
        assert internals.request_already_revoked(request)
        assert [(request.id, True)] == heard
        assert request.id not in internals.worker_requests()

    @pytest.mark.usefixtures("celery_revoked")
    def test_clearing_the_context_chord_keeps_the_member_out_of_its_chord(
        self, app: Celery, messages: Messages, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``request_context`` (``Request._context``) is one object per request, and
        ``_announce_revoked`` reports to the chord (``on_chord_part_return``) only
        while its ``chord`` is set.  If not, a discarded member counts toward its
        chord and the body may run, or fail with a ChordError, after a cancel."""
        backend = app.backend
        reported: list[str] = []
        monkeypatch.setattr(
            backend, "on_chord_part_return", lambda request, *a, **k: reported.append(request.id)
        )
        body = app.tasks["contract.job"].si().set(task_id=str(uuid.uuid4()))
        kept = messages.request(chord=body)
        cleared = messages.request(chord=body)

        internals.announce_revoked(kept, "revoked", False, None, False)
        context = internals.request_context(cleared)
        assert context is internals.request_context(cleared)
        assert context.chord is not None
        context.chord = None
        internals.announce_revoked(cleared, "revoked", False, None, False)

        assert [kept.id] == reported

    def test_wrapped_revoked_is_asked_before_the_pool(
        self, app: Celery, messages: Messages, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``wrap_request_revoked``: Celery asks ``revoked()`` in
        ``execute_using_pool``, also in the per-task subclass
        ``create_request_cls`` builds, and a True answer keeps the request from the
        pool.  If not, a task cancelled while queued starts anyway."""
        monkeypatch.setattr(Request, "revoked", original_of(Request.revoked))
        asked: list[str] = []

        def make(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
            def revoked(self: Any) -> bool:
                asked.append(self.id)
                return True

            return revoked

        wrapped = internals.wrap_request_revoked(make)
        again = internals.wrap_request_revoked(make)
        request = messages.request()
        subclass = create_request_cls(
            Request, app.tasks["contract.job"], SoloPool(), "h", None, app=app
        )
        per_task = subclass(request._message, app=app, task=app.tasks["contract.job"])

        with pytest.raises(TaskRevokedError):
            request.execute_using_pool(pool=None)
        with pytest.raises(TaskRevokedError):
            per_task.execute_using_pool(pool=None)

        assert (True, False) == (wrapped, again)
        assert [request.id, request.id] == asked

    def test_wrapped_announce_revoked_receives_every_discard(
        self, messages: Messages, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``wrap_request_announce_revoked``: Celery's own ``revoked()`` ends a
        discarded request through ``_announce_revoked(reason, terminated, signum,
        expired)``.  If not, a task discarded for a cancellation stores a bare
        "revoked" instead of its reason, and its chord and unsent parts are not handled."""
        monkeypatch.setattr(Request, "revoked", original_of(Request.revoked))
        monkeypatch.setattr(Request, "_announce_revoked", original_of(Request._announce_revoked))
        calls: list[tuple[Any, ...]] = []

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def announce(
                self: Any, reason: str, terminated: bool, signum: Any, expired: bool
            ) -> Any:
                calls.append((self.id, reason, terminated, signum, expired))
                return original(self, reason, terminated, signum, expired)

            return announce

        assert internals.wrap_request_announce_revoked(make)
        request = messages.request()
        internals.add_revoked_id(request.id)

        assert request.revoked()
        assert [(request.id, "revoked", False, None, False)] == calls


# --------------------------------------------------------------------------
# Remote control


@pytest.fixture(name="worker")
def worker_fixture(app: Celery) -> Iterator[Any]:
    """An embedded threads-pool worker for ``app`` on Redis DB 12."""
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False) as worker:
        # Broadcasts on Redis are fan-out: one sent before the worker's control
        # consumer listens is lost.  Wait until it answers a ping.
        deadline = time.monotonic() + 30
        while not app.control.ping(timeout=0.5) and time.monotonic() < deadline:
            pass
        yield worker


class TestRemoteControl:
    """The worker's control-command registry and the client's revoke."""

    def test_wrapped_revoke_command_gets_extra_arguments_and_state(
        self, app: Celery, worker: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``wrap_revoke_command`` (``Panel.data["revoke"]``): a ``revoke``
        broadcast reaches the wrapper as ``(state, task_id, terminate, signal,
        **kwargs)`` with the broadcast's extra arguments passed through and
        ``state.app`` the worker's app, and Celery's handler still fills the
        revoked set.  If not, ``cancel()``'s reason, grace and workflow targets
        never reach a worker, and plain revokes are not intercepted."""
        monkeypatch.setitem(Panel.data, "revoke", original_of(Panel.data["revoke"]))
        seen: list[tuple[Any, Any, dict[str, Any]]] = []

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def revoke(state: Any, task_id: Any, **kwargs: Any) -> Any:
                seen.append((state.app, task_id, kwargs))
                return original(state, task_id, **kwargs)

            return revoke

        assert internals.wrap_revoke_command(make)
        assert not internals.wrap_revoke_command(make)
        task_id = str(uuid.uuid4())

        replies = app.control.broadcast(
            "revoke",
            arguments={"task_id": [task_id], "terminate": False, "signal": "SIGTERM", "extra": 7},
            reply=True,
            timeout=15,
            limit=1,
        )

        assert 1 == len(replies)
        assert 1 == len(seen)
        state_app, ids, kwargs = seen[0]
        assert state_app is app
        assert [task_id] == internals.task_ids(ids)
        assert (False, "SIGTERM", 7) == (kwargs["terminate"], kwargs["signal"], kwargs["extra"])
        assert internals.is_revoked_id(task_id)

    def test_commands_and_request_methods_can_be_put_back(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``unwrap_revoke_command``, ``unregister_inspect_command`` and
        ``unwrap_request_methods`` restore ``Panel.data``, ``Panel.meta`` and
        ``Request`` exactly as Celery defines them.  If not, a worker that
        stopped would leave Celery patched (and Celery's own tests check that
        every inspect command has an ``Inspect`` method)."""
        celery_revoke = original_of(Panel.data["revoke"])
        celery_revoked = original_of(Request.revoked)
        celery_announce = original_of(Request._announce_revoked)
        celery_on_failure = original_of(Request.on_failure)
        monkeypatch.setitem(Panel.data, "revoke", celery_revoke)
        monkeypatch.setattr(Request, "revoked", celery_revoked)
        monkeypatch.setattr(Request, "_announce_revoked", celery_announce)
        monkeypatch.setattr(Request, "on_failure", celery_on_failure)
        name = f"contract_probe_{uuid.uuid4().hex[:8]}"

        def probe(state: Any, **kwargs: Any) -> None:
            return None

        try:
            internals.wrap_revoke_command(lambda original: lambda *a, **k: original(*a, **k))
            internals.wrap_request_revoked(lambda original: lambda self: original(self))
            internals.wrap_request_announce_revoked(lambda original: lambda *a: original(*a))
            internals.wrap_request_on_failure(lambda original: lambda *a: original(*a))
            internals.register_inspect_command(probe, name)
            wrapped = (
                Panel.data["revoke"] is not celery_revoke,
                Request.revoked is not celery_revoked,
                name in Panel.data and name in Panel.meta,
            )

            put_back = (
                internals.unwrap_revoke_command(),
                internals.unwrap_request_methods(),
                internals.unregister_inspect_command(name),
            )
            restored = (
                Panel.data["revoke"] is celery_revoke,
                Request.revoked is celery_revoked,
                Request._announce_revoked is celery_announce,
                Request.on_failure is celery_on_failure,
                name not in Panel.data and name not in Panel.meta,
            )
        finally:
            Panel.data.pop(name, None)
            Panel.meta.pop(name, None)

        assert (True, True, True) == wrapped
        assert (True, True, True) == put_back
        assert (True, True, True, True, True) == restored

    def test_registered_inspect_command_answers_a_broadcast(self, app: Celery, worker: Any) -> None:
        """``register_inspect_command`` (``Panel.register(type="inspect")``): the
        command answers ``app.control.broadcast(name, reply=True, arguments=...)``
        with what it returns.  If not, ``celery cancel --workflow`` cannot ask
        workers which workflow members they hold."""
        name = f"contract_probe_{uuid.uuid4().hex[:8]}"

        def probe(state: Any, targets: Any = None, **kwargs: Any) -> dict[str, Any]:
            return {"targets": targets}

        try:
            registered = internals.register_inspect_command(probe, name)
            again = internals.register_inspect_command(probe, name)
            replies = app.control.broadcast(
                name, arguments={"targets": [["root", "r1"]]}, reply=True, timeout=15, limit=1
            )
        finally:
            # The worker's pidbox holds Panel.data itself: take ours out again.
            Panel.data.pop(name, None)
            Panel.meta.pop(name, None)

        assert (True, False) == (registered, again)
        assert [{"targets": [["root", "r1"]]}] == [
            answer for reply in replies for answer in reply.values()
        ]

    def test_a_countdown_task_waits_in_the_timer_and_can_be_discarded_early(
        self, app: Celery, worker: Any, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``consumer_of`` (``state.consumer``), ``scheduled_requests``
        (``consumer.timer.schedule.queue``) and ``discard_scheduled``: a task sent
        with a countdown waits in the consumer's timer as an entry whose first
        argument is its ``Request``; discarding it from the revoke command (the
        consumer's thread) stores REVOKED, acknowledges the message, cancels the
        entry and gives the prefetch slot back.  If not, a task cancelled while
        it waits for its ETA stays PENDING, unacknowledged, until its ETA."""
        monkeypatch.setitem(Panel.data, "revoke", original_of(Panel.data["revoke"]))
        monkeypatch.setattr(Request, "revoked", original_of(Request.revoked))
        monkeypatch.setattr(Request, "_announce_revoked", original_of(Request._announce_revoked))
        seen: list[Any] = []

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def revoke(state: Any, task_id: Any, **kwargs: Any) -> Any:
                reply = original(state, task_id, **kwargs)
                consumer = internals.consumer_of(state)
                held = internals.scheduled_requests(consumer)
                for entry, request in held:
                    if request.id in internals.task_ids(task_id):
                        prefetch = consumer.qos.value
                        unacked = rdb.hexists("unacked", request.message.delivery_tag)
                        discarded = internals.discard_scheduled(consumer, entry, request)
                        after = (discarded, prefetch, consumer.qos.value, unacked)
                        seen.append((entry, request, *after))
                seen.append(len(internals.scheduled_requests(consumer)) == len(held) - 1)
                return reply

            return revoke

        assert internals.wrap_revoke_command(make)
        result = app.tasks["contract.job"].apply_async(countdown=60)
        consumer = worker.consumer
        assert _wait_for(
            lambda: [r for _, r in internals.scheduled_requests(consumer) if r.id == result.id]
        )

        app.control.revoke(result.id, reply=True, timeout=15, limit=1)

        assert 2 == len(seen)
        entry, request, discarded, prefetch, after, unacked = seen[0]
        assert discarded
        assert unacked
        assert entry.canceled
        assert prefetch - 1 == after
        assert True is seen[1]
        assert "REVOKED" == app.backend.get_task_meta(result.id, cache=False)["status"]
        assert request.acknowledged
        assert not rdb.hexists("unacked", request.message.delivery_tag)

    def test_every_client_revoke_ends_in_control_revoke(
        self, app: Celery, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``wrap_control_revoke`` (``Control.revoke``): ``AsyncResult.revoke()``,
        ``GroupResult.revoke()`` and ``app.control.revoke()`` all call it, with
        ``destination`` and ``terminate`` as keywords.  If not, a plain revoke sent
        while no worker is online is not recorded in the ledger and is lost."""
        monkeypatch.setattr(Control, "revoke", original_of(Control.revoke))
        calls: list[tuple[list[str], Any, bool]] = []

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def revoke(
                self: Any,
                task_id: Any,
                destination: Any = None,
                terminate: bool = False,
                signal: Any = "SIGTERM",
                **kwargs: Any,
            ) -> None:
                calls.append((internals.task_ids(task_id), destination, terminate))

            return revoke

        assert internals.wrap_control_revoke(make)
        assert not internals.wrap_control_revoke(make)
        one, two, three = (str(uuid.uuid4()) for _ in range(3))

        AsyncResult(one, app=app).revoke()
        GroupResult(str(uuid.uuid4()), [AsyncResult(two, app=app)], app=app).revoke()
        app.control.revoke(three, terminate=True)

        assert [([one], None, False), ([two], None, False), ([three], None, True)] == calls

    def test_task_ids_reads_one_id_or_a_list(self) -> None:
        """``task_ids`` (``celery.utils.functional.maybe_list``): one id or a list
        of ids, as the revoke command receives them.  If not, a revoke of one id
        is read as a list of its characters."""
        assert (["a"], ["a", "b"], []) == (
            internals.task_ids("a"),
            internals.task_ids(["a", "b"]),
            internals.task_ids(None),
        )


# --------------------------------------------------------------------------
# The task side and the worker object


class TestTaskSide:
    """What the task boundary reads inside Celery's tracer."""

    def test_current_task_in_an_eager_and_a_direct_call(self, app: Celery) -> None:
        """``current_task`` (``celery._state.get_current_task``): in a task's body it
        is the task, with ``request.id`` and ``is_eager``; a direct call has
        ``called_directly``.  If not, ``@cancellable`` tasks run without a
        cancel scope bound to their id, and nothing can cancel them."""
        whoami = app.tasks["contract.whoami"]
        task_id = str(uuid.uuid4())

        eager = whoami.apply(task_id=task_id).get()
        direct = whoami()

        assert ["contract.whoami", task_id, False, True] == eager
        assert "contract.whoami" == direct[0]
        assert direct[2]
        assert internals.current_task() is None

    def test_current_task_and_ignore_in_a_worker(self, app: Celery, worker: Any) -> None:
        """In a worker's pool the body sees its task (not eager, not called
        directly), and a body that stores REVOKED itself and raises ``Ignore``
        keeps that state (``celery.app.trace``).  If not, a cancelled task's
        REVOKED state with its reason is overwritten."""
        task_id = str(uuid.uuid4())

        seen = app.tasks["contract.whoami"].apply_async(task_id=task_id).get(timeout=10)
        ignored = app.tasks["contract.ignored"].apply_async()
        state = _wait_for(lambda: ignored.state if ignored.state != "PENDING" else None)
        time.sleep(0.3)  # a late overwrite would land here

        assert ["contract.whoami", task_id, False, False] == seen
        assert "REVOKED" == state == ignored.state
        assert "ours" in str(ignored.result)

    def test_worker_init_sender_names_its_pool_and_hub(self, app: Celery) -> None:
        """``worker_pool_kind`` (``WorkController.pool_cls``), ``worker_hub``
        (``.hub``), ``worker_concurrency`` (``.concurrency``) and
        ``worker_pool_start_method`` (``.pool_start_method``, Celery 5.7+) on the
        ``worker_init`` sender: the pool class's module names the pool, an
        in-process pool has no event-loop hub, the concurrency is the one asked
        for, children are forked.  If not, the ladder picks the wrong way to stop
        a task, or the mailbox is sized wrong."""
        kinds: list[tuple[str, Any, int | None, str]] = []

        def on_init(sender: Any = None, **_: Any) -> None:
            kinds.append(
                (
                    internals.worker_pool_kind(sender),
                    internals.worker_hub(sender),
                    internals.worker_concurrency(sender),
                    internals.worker_pool_start_method(sender),
                )
            )

        signals.worker_init.connect(on_init, weak=False)
        try:
            with start_worker(app, pool="threads", concurrency=3, perform_ping_check=False):
                pass
            with start_worker(app, pool="solo", perform_ping_check=False):
                pass
        finally:
            signals.worker_init.disconnect(on_init)

        assert [("threads", None, 3, "fork"), ("solo", None, 1, "fork")] == kinds


# --------------------------------------------------------------------------
# celery.chord_unlock (result backends without native chords)


@pytest.fixture(name="results_db", scope="module")
def results_db_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One database for the module, its tables made here: Celery 5.3 and 5.4's
    # database backends share one SessionManager, which creates the tables
    # for the first database of the process only (another module's, in a
    # whole run).
    import sqlalchemy
    from celery.backends.database.models import ResultModelBase

    path = tmp_path_factory.mktemp("contract-db") / "results.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        ResultModelBase.metadata.create_all(engine)
    finally:
        engine.dispose()
    return path


@pytest.fixture(name="db_app")
def db_app_fixture(results_db: Path) -> Iterator[Celery]:
    """An app with a ``db+sqlite://`` result backend (chords joined by ``celery.chord_unlock``)."""
    app = Celery(
        f"contract-db-{uuid.uuid4().hex[:8]}",
        broker="memory://",
        backend=f"db+sqlite:///{results_db}",
    )
    app.conf.cancellable_ledger_url = "none"

    @app.task(name="contract.body", shared=False)
    def body(results: Any) -> Any:
        return results

    yield app
    app.close()


class TestChordUnlock:
    """``wrap_chord_unlock`` and ``chord_unlock_checking_ready``: the polling chord join."""

    @staticmethod
    def _chord(app: Celery, states: list[str]) -> tuple[str, dict[str, Any], list[Any]]:
        # A header whose members have the given stored states, and a frozen body.
        backend = app.backend
        header = []
        for state in states:
            task_id = str(uuid.uuid4())
            result: Any = {
                "SUCCESS": 1,
                "REVOKED": TaskRevokedError("revoked by tests: stop"),
            }.get(state)
            if state != "PENDING":
                backend.store_result(task_id, result, state)
            header.append(AsyncResult(task_id, app=app).as_tuple())
        body = app.signature("contract.body")
        body.freeze()
        return str(uuid.uuid4()), dict(body), header

    def test_the_builtin_is_bound_and_takes_group_result(self, db_app: Celery) -> None:
        """``app.tasks["celery.chord_unlock"]`` exists per app, is bound, and its
        class's ``run`` takes ``(self, group_id, callback, interval, max_retries,
        result, Result, GroupResult, ...)``; the database backend has no native
        join.  If not, `wrap_chord_unlock` wraps nothing (or the wrong thing) and a
        cancelled chord's body ends FAILURE with a ChordError on SQL backends."""
        import inspect

        task = db_app.tasks[internals.CHORD_UNLOCK]
        run = original_of(type(task).run)
        names = list(inspect.signature(run).parameters)
        other = Celery("contract-other", set_as_current=False)
        try:
            other_cls = type(other.tasks[internals.CHORD_UNLOCK])
        finally:
            other.close()

        assert ["self", "group_id", "callback", "interval", "max_retries", "result"] == names[:6]
        assert "GroupResult" in names
        assert other_cls is not type(task)
        assert not db_app.GroupResult("x", []).supports_native_join

    def test_celery_fails_the_body_of_a_header_with_a_revoked_member(self, db_app: Celery) -> None:
        """Celery's own ``unlock_chord``: a ready header with a REVOKED member
        stores FAILURE with a ChordError for the body, over its REVOKED state
        (what the wrapper prevents).  If this no longer holds, the wrapper may be
        unnecessary: check the docs' claims."""
        from celery.exceptions import ChordError

        group_id, body, header = self._chord(db_app, ["SUCCESS", "REVOKED"])
        db_app.backend.store_result(body["options"]["task_id"], TaskRevokedError("x"), "REVOKED")
        run = original_of(type(db_app.tasks[internals.CHORD_UNLOCK]).run)

        run(db_app.tasks[internals.CHORD_UNLOCK], group_id, body, result=header)

        meta = db_app.backend.get_task_meta(body["options"]["task_id"], cache=False)
        assert "FAILURE" == meta["status"]
        assert isinstance(meta["result"], ChordError)

    def test_checking_ready_sees_each_poll_and_can_leave_the_task(self, db_app: Celery) -> None:
        """``chord_unlock_checking_ready``: Celery builds the header from the
        ``GroupResult`` keyword and calls ``ready()`` once per run; ``after_ready``
        gets its answer; a ``BaseException`` from it leaves ``unlock_chord``
        without a retry and without touching the body; not ready means a retry.
        If not, a cancelled chord's join cannot be stopped between "the header is
        ready" and "fail the body"."""
        from celery.exceptions import Retry

        class Leave(BaseException):
            pass

        task = db_app.tasks[internals.CHORD_UNLOCK]
        run = original_of(type(task).run)
        seen: list[bool] = []

        def after_ready(ready: bool) -> None:
            seen.append(ready)
            if ready:
                raise Leave

        pending = self._chord(db_app, ["SUCCESS", "PENDING"])
        kwargs = internals.chord_unlock_checking_ready(db_app, {"result": pending[2]}, after_ready)
        with pytest.raises(Retry):
            run(task, pending[0], pending[1], **kwargs)
        group_id, body, header = self._chord(db_app, ["SUCCESS", "REVOKED"])
        kwargs = internals.chord_unlock_checking_ready(db_app, {"result": header}, after_ready)
        with pytest.raises(Leave):
            run(task, group_id, body, **kwargs)

        assert [False, True] == seen
        assert "PENDING" == db_app.backend.get_task_meta(body["options"]["task_id"])["status"]

    def test_wrap_chord_unlock_wraps_the_apps_task_once(self, db_app: Celery) -> None:
        """``wrap_chord_unlock`` replaces the ``run`` of this app's task only, once,
        and the tracer calls the wrapper: a body stored REVOKED is neither sent nor
        failed, with the header ready or not.  If not, the wrapper never runs in
        a worker."""
        from cancellable.celery import _chords

        internals.wrap_chord_unlock(db_app, _chords.unlock_chord)  # maybe done at worker_init
        task = db_app.tasks[internals.CHORD_UNLOCK]

        again = internals.wrap_chord_unlock(db_app, _chords.unlock_chord)
        outcomes = []
        for states in (["SUCCESS", "REVOKED"], ["REVOKED", "PENDING"]):
            group_id, body, header = self._chord(db_app, states)
            body_id = body["options"]["task_id"]
            stop = TaskRevokedError("revoked by tests: stop")
            db_app.backend.store_result(body_id, stop, "REVOKED")
            task.apply(args=(group_id, body), kwargs={"result": header}).get()
            meta = db_app.backend.get_task_meta(body_id, cache=False)
            outcomes.append((meta["status"], str(meta["result"])))

        assert not again
        assert original_of(type(task).run) is not type(task).run
        assert [("REVOKED", "revoked by tests: stop")] * 2 == outcomes


# --------------------------------------------------------------------------
# billiard


#: Runs in a fresh interpreter (`run_python`): Celery's prefork ``TaskPool``
#: with one child, started as a worker starts it, forked from a process with
#: no other threads (an embedded worker earlier in this test process leaves
#: threads behind, and a fork while one of them holds a lock can hang the
#: child: a hang here must fail, not stall the suite).
PREFORK = """
import os, signal, time
from celery import Celery
from celery.concurrency.prefork import TaskPool
from cancellable.celery import _celery_internals as internals

def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return predicate()

def unwrap(error):
    # billiard hands error callbacks an ExceptionInfo whose ``exception``
    # wraps the real one (``.exc``).
    error = getattr(error, "exception", error)
    return getattr(error, "exc", error)

def child_index():
    return internals.process_index()

SETUP

app = Celery("contract-prefork")
pool = TaskPool(limit=1, app=app, initargs=(app, "contract@test"))
pool.start()
try:
    BODY
finally:
    pool.terminate()
"""


def _run_with_prefork(body: str, setup: str = "") -> str:
    """Run ``body`` (a block using ``pool``) in a fresh interpreter; its stdout.

    ``setup`` runs at module level before the pool starts (its children
    inherit it).
    """
    indented = textwrap.indent(textwrap.dedent(body), "    ").strip()
    code = PREFORK.replace("SETUP", textwrap.dedent(setup)).replace("BODY", indented)
    return run_python(code).stdout.strip()


class TestBilliard:
    """billiard's pool internals the terminate step uses."""

    def test_a_marked_child_killed_ends_its_job_terminated(self) -> None:
        """``pool_process`` (``TaskPool._pool._process_by_pid``) finds the child
        running a job, and ``mark_process_terminated`` (``_controlled_termination``,
        ``_job_terminated``) makes the kill end the job with ``Terminated``, not
        ``WorkerLostError``; ``pool_maintainer`` then keeps one live child.  If
        not, a terminated task is reported as a lost worker (FAILURE, or
        redelivered with ``acks_late``) instead of REVOKED."""
        out = _run_with_prefork(
            """
            accepted, errors = [], []
            pool.apply_async(
                time.sleep,
                args=(30,),
                accept_callback=lambda pid, *_: accepted.append(pid),
                error_callback=errors.append,
            )
            assert wait_for(lambda: accepted), "the job was not accepted"
            pid = accepted[0]
            proc = internals.pool_process(pool, pid)
            print("found", proc is not None and proc.pid == pid)
            print("unknown", internals.pool_process(pool, 1))
            internals.mark_process_terminated(proc)
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: errors), "the job did not end"
            print("ended", type(unwrap(errors[0])).__name__)
            maintain = internals.pool_maintainer(pool)
            try:
                maintain()
            except KeyError:
                # Outside a worker's event loop, billiard's supervisor thread
                # maintains the pool too and can join the dead child between
                # our call's two steps (KeyError: None in _join_exited_workers).
                # In a worker the event loop is the only maintainer.
                maintain()
            children = wait_for(lambda: [p for p in pool.info["processes"] if p and p != pid])
            print("children", len(children))
            """
        )

        assert ["found True", "unknown None", "ended Terminated", "children 1"] == (
            out.splitlines()
        )

    def test_a_child_knows_its_index(self) -> None:
        """``process_index`` (``current_process().index``): a pool child knows its
        index (0 with one child).  If not, the child table gives children no row
        and the terminate step never kills."""
        out = _run_with_prefork(
            """
            results = []
            pool.apply_async(child_index, callback=results.append)
            print("index", wait_for(lambda: results))
            """
        )

        assert "index [0]" == out

    def test_a_child_asked_to_retire_reports_its_job_and_is_replaced(self) -> None:
        """``retire_child_when`` (billiard ``Worker.wait_for_job``, reached as
        ``current_process()._target`` at ``worker_process_init``): a child whose
        predicate turns true during a job reports that job's result, then leaves
        the pool before taking another (``EX_RECYCLE``, no error), and the pool
        runs the next job in a new child; outside a pool child it does nothing.
        If not, a child an interrupt landed in (a lock may be held there for
        ever) runs later tasks, which can hang."""
        out = _run_with_prefork(
            """
            results, errors = [], []
            first = pool.apply_async(
                retire_after_this, callback=results.append, error_callback=errors.append
            )
            assert wait_for(lambda: results), "the first job reported nothing"
            pool.apply_async(os.getpid, callback=results.append, error_callback=errors.append)
            assert wait_for(lambda: len(results) == 2, 20), "the second job did not run"
            (installed, retiring), later = results
            print("installed", installed)
            print("moved", later != retiring)
            print("errors", errors)
            print("outside", internals.retire_child_when(lambda: True))
            """,
            setup="""
            from celery import signals

            class Retire:
                asked = False
                installed = None

            @signals.worker_process_init.connect
            def install(**kwargs):
                Retire.installed = internals.retire_child_when(lambda: Retire.asked)

            def retire_after_this():
                Retire.asked = True
                return Retire.installed, os.getpid()
            """,
        )

        assert ["installed True", "moved True", "errors []", "outside False"] == (out.splitlines())

    def test_billiard_resets_its_signals_and_leaves_sigurg(self) -> None:
        """``BILLIARD_TERMSIGS`` (``billiard.common.TERMSIGS_FULL``): billiard's
        ``reset_signals(full=True)``, what a pool child runs, resets exactly
        handlers we must not use, and leaves ``SIGURG`` (our default wake-up
        signal) alone.  If not, the wake-up handler is lost in pool children and
        running tasks are never reached."""
        done = run_python(
            """
            import signal
            from billiard.common import reset_signals
            from cancellable.celery._celery_internals import BILLIARD_TERMSIGS

            def handler(*args):
                pass

            ours = [signal.SIGURG, *sorted(BILLIARD_TERMSIGS)]
            for number in ours:
                signal.signal(number, handler)
            reset_signals(full=True)
            kept = [number for number in ours if signal.getsignal(number) is handler]
            print(kept == [signal.SIGURG], signal.SIGUSR1 in BILLIARD_TERMSIGS)
            """
        )

        assert "True True" == done.stdout.strip()


# --------------------------------------------------------------------------
# Backends, the broker connection, redis-py


class TestConnections:
    """Result backends, kombu's Redis channel and redis-py's pool."""

    def test_redis_backend_client_is_a_working_redis_client(self, app: Celery) -> None:
        """``redis_backend_client`` (``RedisBackend.client``): the backend's
        redis-py client, None for other backends.  If not, the ledger falls back
        to no durability on a Redis result backend."""
        client = internals.redis_backend_client(app.backend)
        other = Celery("contract-cache", backend="cache+memory://")

        assert client is not None
        assert client.ping()
        assert internals.redis_backend_client(other.backend) is None

    def test_filesystem_backend_path(self, tmp_path: Any) -> None:
        """``filesystem_backend_path`` (``FilesystemBackend.path``): the backend's
        directory.  If not, the file ledger lands in the wrong place or fails."""
        app = Celery("contract-fs", backend=f"file://{tmp_path}")

        assert str(tmp_path) == internals.filesystem_backend_path(app.backend)

    def test_database_backend_engine(self, tmp_path: Any) -> None:
        """``database_backend_engine`` (``DatabaseBackend.url``, ``.engine_options``
        and, on 5.7, ``.session_manager.engine_callback``): the URL without
        ``db+``, the merged engine options and the callback; None for other
        backends.  If not, a ``db+`` deployment gets no SQL ledger (not durable)
        or one built with other options than Celery's engine."""

        def callback(engine: Any) -> None:
            """An engine callback, as a user would set one."""

        url = f"sqlite:///{tmp_path / 'results.db'}"
        app = Celery("contract-db", backend=f"db+{url}")
        app.conf.database_engine_options = {"pool_size": 3}
        app.conf.database_engine_callback = callback
        other = Celery("contract-cache", backend="cache+memory://")

        found = internals.database_backend_engine(app.backend)

        assert found is not None
        assert url == found[0]
        assert 3 == found[1]["pool_size"]
        if hasattr(getattr(app.backend, "session_manager", None), "engine_callback"):  # Celery 5.7
            assert callback is found[2]
        assert internals.database_backend_engine(other.backend) is None

    def test_django_result_database(self, tmp_path: Any) -> None:
        """``django_result_database`` (django-celery-results' ``DatabaseBackend``,
        ``router.db_for_write(TaskResult)``, ``connections[alias].settings_dict``):
        the Django database a ``django-db`` backend writes to, with its alias.
        Run in a child process, which sets Django up.  If not, a django-db
        deployment gets no SQL ledger (not durable)."""
        script = (
            "import django, json\n"
            "from django.conf import settings\n"
            "settings.configure(INSTALLED_APPS=['django_celery_results'], DATABASES={'default': "
            f"{{'ENGINE': 'django.db.backends.sqlite3', 'NAME': {str(tmp_path / 'd.db')!r}}}}})\n"
            "django.setup()\n"
            "from celery import Celery\n"
            "from cancellable.celery import _celery_internals as internals\n"
            "app = Celery('contract-django', backend='django-db')\n"
            "found = internals.django_result_database(app.backend)\n"
            "other = internals.django_result_database(Celery('x', backend='cache+memory://').backend)\n"
            "print(json.dumps([found['alias'], found['ENGINE'], str(found['NAME']), other]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        ).stdout

        assert ["default", "django.db.backends.sqlite3", str(tmp_path / "d.db"), None] == (
            json.loads(out.strip().splitlines()[-1])
        )

    def test_redis_broker_client_and_one_ping(self, rdb: redis.Redis) -> None:
        """``redis_broker_client`` (kombu Redis ``Channel.client``) gives the
        broker's redis-py client, None on other transports, and ``ping_redis_once``
        answers on it.  If not, ``cancel()`` cannot check the broker first and
        blocks in kombu's retry loop while Redis is down."""
        with Connection(REDIS_URL) as conn:
            client = internals.redis_broker_client(conn)
            assert client is not None
            internals.ping_redis_once(client, 2.0)
        with Connection("memory://") as conn:
            assert internals.redis_broker_client(conn) is None

    def test_bounded_redis_client_copies_the_server_and_bounds_every_wait(
        self, app: Celery, tmp_path: Any
    ) -> None:
        """``bounded_redis_client`` (redis-py ``ConnectionPool.connection_kwargs``,
        ``connection_class``, ``Retry``/``NoBackoff``) makes a client on the result
        backend's server and database with 2 s timeouts and no retry, leaves
        Celery's client as it was, and on a stopped server raises a timeout after
        about 2 s.  If not, a ledger on the result backend waits 120 s (Celery's
        socket timeout) on a hung server, and the worker's ledger thread with it."""
        import random

        from tests.soak.harness import RedisServer, free_port

        celery_client = internals.redis_backend_client(app.backend)
        before = dict(celery_client.connection_pool.connection_kwargs)
        bounded = internals.bounded_redis_client(celery_client, 2.0)
        kwargs = bounded.connection_pool.connection_kwargs

        assert bounded.ping()
        assert bounded is not celery_client
        assert bounded.connection_pool is not celery_client.connection_pool
        assert (before["host"], before["port"], before["db"]) == (
            kwargs["host"],
            kwargs["port"],
            kwargs["db"],
        )
        assert (2.0, 2.0) == (kwargs["socket_timeout"], kwargs["socket_connect_timeout"])
        assert before == dict(celery_client.connection_pool.connection_kwargs)

        server = RedisServer(tmp_path / "redis", free_port(random.Random()))
        server.start()
        try:
            given = redis.Redis.from_url(server.url, socket_timeout=120)
            hung = internals.bounded_redis_client(given, 2.0)
            assert hung.ping()
            server.pause()
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                hung.xrange("any", count=1)
            waited = time.monotonic() - started
        finally:
            server.stop()
        assert 1.5 < waited < 3.0

    def test_redis_ledger_client_reads_a_tls_url_and_settings_as_kombu_and_celery_do(
        self, tmp_path: Any
    ) -> None:
        """``redis_ledger_client`` (kombu ``url_to_parts``; redis-py
        ``ConnectionPool``, ``SSLConnection``) on a private TLS redis-server: for
        a ``rediss://`` URL with ``ssl_cert_reqs``/``ssl_ca_certs`` in the query
        and for ``broker_use_ssl``, it connects to the server, database and CA
        that kombu's Redis channel and Celery's Redis backend connect to (their
        pools compared), with both timeouts at the 2 s bound.  If not, a ledger
        spelled as Celery's docs spell it fails or points elsewhere."""
        import ssl

        from celery.backends.redis import RedisBackend
        from tests.redis_servers import tls_server

        with tls_server(tmp_path / "tls") as server:
            url = server.url(3, ssl_cert_reqs="CERT_REQUIRED", ssl_ca_certs=str(server.ca))
            use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(server.ca)}
            ours = internals.redis_ledger_client(
                url, use_ssl=None, transport_options={"socket_timeout": 30},
                timeout=2.0, setting="s",
            )  # fmt: skip
            ours_settings = internals.redis_ledger_client(
                server.url(3).replace("rediss", "redis"), use_ssl=use_ssl,
                transport_options=None, timeout=2.0, setting="s",
            )  # fmt: skip
            app = Celery("contract-tls", backend=url, set_as_current=False)
            celery_kwargs = RedisBackend(app=app, url=url).client.connection_pool.connection_kwargs
            with Connection(server.url(3), ssl=use_ssl) as conn:
                kombu_kwargs = conn.default_channel.client.connection_pool.connection_kwargs
                assert conn.default_channel.client.ping()

            for made in (ours, ours_settings):
                kwargs = made.client.connection_pool.connection_kwargs
                assert made.client.ping()
                assert made.client.connection_pool.connection_class is redis.SSLConnection
                for theirs in (celery_kwargs, kombu_kwargs):
                    assert [theirs[k] for k in ("host", "port", "db", "ssl_ca_certs")] == [
                        kwargs[k] for k in ("host", "port", "db", "ssl_ca_certs")
                    ]
                assert {kwargs["ssl_cert_reqs"]} <= {"required", ssl.CERT_REQUIRED}
                assert (2.0, 2.0) == (kwargs["socket_timeout"], kwargs["socket_connect_timeout"])
            assert "rediss://127.0.0.1:" in internals.redis_server_of(ours.client)

    def test_redis_ledger_client_reads_sentinel_as_celery_does(self) -> None:
        """``redis_ledger_client`` on ``sentinel://h1;sentinel://h2`` with
        ``master_name`` and ``sentinel_kwargs`` (redis-py ``Sentinel``,
        ``SentinelConnectionPool.service_name``/``sentinel_manager``): the same
        sentinels, master, database and password as Celery's ``SentinelBackend``
        (no connection made), and the sentinels' own waits bounded too.  If not,
        a Sentinel ledger asks other servers than the broker or result backend."""
        from celery.backends.redis import SentinelBackend

        url = "sentinel://:pw@127.0.0.1:26001/4;sentinel://:pw@127.0.0.1:26002/4"
        options = {"master_name": "m1", "sentinel_kwargs": {"password": "spw"}}
        app = Celery("contract-sentinel", set_as_current=False)
        app.conf.result_backend_transport_options = options
        theirs = SentinelBackend(app=app, url=url).client.connection_pool

        ours = internals.redis_ledger_client(
            url, use_ssl=None, transport_options=options, timeout=2.0, setting="s"
        ).client.connection_pool

        def sentinels(pool: Any) -> list[Any]:
            return [
                c.connection_pool.connection_kwargs["port"] for c in pool.sentinel_manager.sentinels
            ]

        assert theirs.service_name == ours.service_name == "m1"
        assert sentinels(theirs) == sentinels(ours) == [26001, 26002]
        for key in ("db", "password"):
            assert theirs.connection_kwargs[key] == ours.connection_kwargs[key]
        for sentinel in ours.sentinel_manager.sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            assert "spw" == kwargs["password"]
            assert (2.0, 2.0) == (kwargs["socket_timeout"], kwargs["socket_connect_timeout"])
        assert (2.0, 2.0) == (
            ours.connection_kwargs["socket_timeout"],
            ours.connection_kwargs["socket_connect_timeout"],
        )
        assert "Sentinel master 'm1'" in internals.redis_server_of(
            redis.Redis(connection_pool=ours)
        )

    def test_ping_redis_once_fails_fast_without_retry(self) -> None:
        """``ping_redis_once`` (redis-py ``get_connection``, ``send_command``,
        ``read_response``) on a dead server raises at once, whatever the client's
        retry policy.  If not, ``cancel()`` hangs instead of raising
        ``BrokerUnavailableError``."""
        client = redis.Redis.from_url(DEAD_REDIS)
        started = time.monotonic()

        with pytest.raises(redis.ConnectionError):
            internals.ping_redis_once(client, 1.0)

        assert time.monotonic() - started < 1.0

    def test_started_hostnames_reads_what_a_worker_stores(self, app: Celery) -> None:
        """``started_hostnames`` (``get_key_for_task``, ``decode_result``, one ``MGET``
        by ``redis_command_once``) reads the node name Celery stores with STARTED
        (``{"pid", "hostname"}``, as ``task_track_started`` writes it), and None
        when any task is not STARTED.  If not, ``cancel()`` of a running task
        broadcasts to every worker instead of its own."""
        first, second, done = (str(uuid.uuid4()) for _ in range(3))
        app.backend.store_result(first, {"pid": 1, "hostname": "w1@h"}, "STARTED")
        app.backend.store_result(second, {"pid": 2, "hostname": "w2@h"}, "STARTED")
        app.backend.store_result(done, 3, "SUCCESS")

        hosts = internals.started_hostnames(app.backend, [first, second], 2.0)
        assert ["w1@h", "w2@h"] == hosts
        assert internals.started_hostnames(app.backend, [first, done], 2.0) is None
        assert internals.started_hostnames(app.backend, [str(uuid.uuid4())], 2.0) is None

    @pytest.mark.parametrize("prefix", ["", "cit-prefix:"])
    def test_push_redis_message_is_what_kombu_publishes_with_a_ttl(
        self, rdb: redis.Redis, prefix: str
    ) -> None:
        """``push_redis_message`` (kombu's ``prepare_message``,
        ``_inplace_augment_message``, ``Channel._put`` for the anonymous exchange)
        pushes onto the list named as the queue, under the ``global_keyprefix`` if one
        is set, the envelope kombu's own ``Producer.publish`` pushes (same body, same
        properties but the delivery tag), and gives that very list a time to live; a
        kombu consumer of the queue receives the body.  If not, directed cancels never
        reach a worker (or a dead worker's list never expires)."""
        from kombu import Consumer, Producer

        queue = f"cit-push-{uuid.uuid4().hex[:8]}"
        body = {"task_id": ["a"], "cancellable": {"source": "revoked"}}
        options = {"global_keyprefix": prefix} if prefix else {}
        with Connection(REDIS_URL, transport_options=options) as conn:
            Producer(conn.default_channel, serializer="json", auto_declare=False).publish(
                body, exchange="", routing_key=queue, retry=False, delivery_mode=1, expiration=30.0
            )
            assert -1 == rdb.ttl(prefix + queue)
            internals.push_redis_message(conn, queue, body, 30.0)
            assert 0 < rdb.pttl(prefix + queue) <= 30_000
            theirs, ours = (json.loads(raw) for raw in rdb.lrange(prefix + queue, 0, -1)[::-1])
            for envelope in (theirs, ours):
                del envelope["properties"]["delivery_tag"]
            assert theirs == ours
            if prefix:
                assert 0 == rdb.exists(queue)  # the push and the TTL went to the prefixed key
            received: list[Any] = []
            with Consumer(
                conn.channel(),
                [Queue(queue)],
                callbacks=[lambda got, message: received.append(got)],
                accept=["json"],
                no_ack=True,
            ):
                deadline = time.monotonic() + 5
                while len(received) < 2 and time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.5)
        assert [body, body] == received

    def test_ensure_connection_takes_a_timeout(self) -> None:
        """kombu's ``Connection.ensure_connection(max_retries=1, ..., timeout=)``
        (public) gives up on a dead broker.  If not, ``cancel()`` and ``celery
        cancel`` wait for the broker instead of failing fast."""
        started = time.monotonic()

        with Connection(DEAD_REDIS) as conn, pytest.raises(OperationalError):
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=1)

        assert time.monotonic() - started < 5.0


class TestShutdownAndConnectionLoss:
    """Where a warm shutdown begins, and a consumer losing its broker connection."""

    def test_blueprint_closes_every_step_first_to_last_before_stopping_any(self) -> None:
        """``Blueprint.stop`` (``celery.bootsteps``) calls ``close`` on every step,
        first to last, before it calls ``stop`` from last to first.  So
        ``WorkerStep.close`` runs before the pool's ``stop`` waits for the running
        tasks, wherever the step sorts among the worker's steps (it has no
        ``requires``).  If not, a warm shutdown with ``cancellable_shutdown_grace`` waits
        for the tasks instead of sending them back."""
        from celery import bootsteps

        from cancellable.celery._activation import WorkerStep

        calls: list[str] = []

        class Parent:
            def __init__(self) -> None:
                self.steps: list[Any] = []

        class Recording(bootsteps.StartStopStep):  # type: ignore[misc]
            def create(self, parent: Any) -> Any:
                return self

            def start(self, parent: Any) -> None:
                calls.append(f"{self.label}.start")

            def close(self, parent: Any) -> None:
                calls.append(f"{self.label}.close")

            def stop(self, parent: Any) -> None:
                calls.append(f"{self.label}.stop")

        class First(Recording):  # type: ignore[misc]
            name = "contract.First"
            label = "first"

        class Second(Recording):  # type: ignore[misc]
            name = "contract.Second"
            label = "second"
            requires = (First,)

        parent = Parent()
        blueprint = bootsteps.Blueprint([First, Second], name="contract")
        blueprint.apply(parent)
        blueprint.start(parent)
        blueprint.stop(parent)

        assert [
            "first.start",
            "second.start",
            "first.close",
            "second.close",
            "second.stop",
            "first.stop",
        ] == calls
        assert callable(getattr(WorkerStep, "close", None))

    def test_redelivers_unacked_only_for_amqp(self) -> None:
        """``redelivers_unacked`` (``Connection.transport.driver_type``): True for
        ``amqp://`` and ``pyamqp://``, False for Redis and the in-memory
        transport.  If not, a lost Redis connection stops tasks that nothing
        redelivers, or a lost RabbitMQ connection runs them twice at once."""
        for url, expected in (
            ("amqp://guest:guest@127.0.0.1:5672//", True),
            ("pyamqp://guest:guest@127.0.0.1:5672//", True),
            (REDIS_URL, False),
            ("memory://", False),
        ):
            with Connection(url) as conn:
                assert expected is internals.redelivers_unacked(conn), url
        assert internals.redelivers_unacked(None) is False

    def test_restores_unacked_on_close_only_for_redis(self) -> None:
        """``restores_unacked_on_close`` (``driver_type`` and ``QoS.restore_at_shutdown``):
        True for Redis, False for AMQP and the in-memory transport."""
        for url, expected in (
            (REDIS_URL, True),
            ("amqp://guest:guest@127.0.0.1:5672//", False),
            ("memory://", False),
        ):
            with Connection(url) as conn:
                assert expected is internals.restores_unacked_on_close(conn), url
        assert internals.restores_unacked_on_close(None) is False

    def test_a_kept_message_is_not_restored_on_close_and_acks_through_the_new_channel(
        self,
    ) -> None:
        """kombu's Redis channel restores its unacked messages when it closes; one
        taken out with ``keep_unacked_on_close`` stays unacked (not back on its
        queue), and its ``ack()`` after the close goes through the consumer's
        current channel and removes it from the unacked hash.  A message not
        kept is restored as before.  (The request and consumer here only carry
        ``.message`` and ``.task_consumer.channel``, the attributes read;
        tests/integration/test_connection_loss.py runs the real ones.)"""
        from types import SimpleNamespace

        queue = Queue(f"contract-keep-{uuid.uuid4().hex[:8]}")
        client = redis.Redis.from_url(REDIS_URL)
        with Connection(REDIS_URL) as conn:
            producer = conn.Producer()
            for n in (1, 2):
                producer.publish({"n": n}, routing_key=queue.name, declare=[queue])
            old = conn.channel()
            kept = old.basic_get(queue.name, no_ack=False)
            restored = old.basic_get(queue.name, no_ack=False)
            assert kept is not None
            assert restored is not None
            new = conn.channel()
            consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=new))

            assert internals.keep_unacked_on_close(SimpleNamespace(message=kept), consumer)
            old.close()
            assert 1 == client.llen(queue.name), "only the message not kept went back"
            assert client.hexists("unacked", kept.delivery_tag)
            assert not client.hexists("unacked", restored.delivery_tag)
            kept.ack()
            assert not client.hexists("unacked", kept.delivery_tag)
            assert not internals.keep_unacked_on_close(SimpleNamespace(message=kept), consumer)
            new.queue_delete(queue.name)
            new.close()
        client.close()

    def test_a_dropped_acknowledgement_is_never_sent_and_celery_does_not_kill(
        self, app: Celery, messages: Messages, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``drop_acknowledgement`` (``Request.acknowledged``): ``acknowledge()`` and
        ``reject()`` then leave the message alone, and Celery's
        ``worker_cancel_long_running_tasks_on_connection_loss`` loop in
        ``Consumer.on_connection_error_after_connected`` skips the request (it
        cancels the other one).  If not, a task cancelled for a lost connection
        is also SIGTERMed by Celery, without its cleanup."""
        from cancellable.celery._activation import WorkerStep

        app.tasks["contract.job"].acks_late = True
        app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
        dropped, other = messages.request(), messages.request()
        for request in (dropped, other):
            worker_state.active_requests.add(request)
        internals.drop_acknowledgement(dropped)
        dropped.acknowledge()
        dropped.reject(requeue=True)
        assert not dropped.message.acknowledged
        controller = app.WorkController(pool_cls="solo", without_mingle=True, without_gossip=True)
        for step in controller.steps:  # the integration's step: its runtime goes
            if isinstance(step, WorkerStep):
                step.shutdown(controller)
        consumer = controller.consumer
        consumer.connection = None
        celery_hook = original_of(type(consumer).on_connection_error_after_connected)

        with caplog.at_level("WARNING"):
            celery_hook(consumer, OSError("contract: connection lost"))

        warned = " ".join(record.getMessage() for record in caplog.records)
        assert other.id in warned
        assert dropped.id not in warned

    def test_the_consumer_calls_the_wrapper_when_its_connection_drops(
        self, app: Celery, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``wrap_consumer_connection_lost`` (``Consumer.on_connection_error_after_connected``):
        when a connected consumer's broker connection drops (a TCP proxy between
        an embedded worker and Redis is cut), Celery calls the wrapper with the
        consumer and the error while ``consumer.connection`` is still the old
        connection; ``unwrap_consumer_connection_lost`` puts Celery's back.  If
        not, a lost RabbitMQ connection never stops the first copy of a task."""
        from celery.worker.consumer.consumer import Consumer
        from tests.proxy import TcpProxy

        celery_hook = original_of(Consumer.on_connection_error_after_connected)
        monkeypatch.setattr(Consumer, "on_connection_error_after_connected", celery_hook)
        seen: list[tuple[Any, Any, bool]] = []

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def hook(consumer: Any, exc: Any) -> Any:
                connection = consumer.connection
                seen.append((consumer, exc, internals.redelivers_unacked(connection)))
                return original(consumer, exc)

            return hook

        assert internals.wrap_consumer_connection_lost(make)
        assert not internals.wrap_consumer_connection_lost(make)
        app.conf.worker_cancel_long_running_tasks_on_connection_loss = True  # (no warning)
        proxy = TcpProxy("127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0]))
        try:
            app.conf.broker_url = REDIS_URL.replace(
                REDIS_URL.rsplit(":", 1)[1].split("/")[0], str(proxy.port), 1
            )
            with start_worker(app, pool="solo", perform_ping_check=False) as worker:
                _wait_for(lambda: proxy.connections() > 0)
                proxy.cut()
                _wait_for(lambda: seen, 15)
                proxy.restore()
            consumer, exc, redelivers = seen[0]
            assert consumer is worker.consumer
            assert isinstance(exc, Exception)
            assert redelivers is False
        finally:
            proxy.close()
            # (The embedded worker's own stop may have unwrapped it already.)
            internals.unwrap_consumer_connection_lost()
        assert celery_hook is Consumer.on_connection_error_after_connected
        assert internals.wrap_consumer_connection_lost(make)
        assert internals.unwrap_consumer_connection_lost()
        assert not internals.unwrap_consumer_connection_lost()
        assert celery_hook is Consumer.on_connection_error_after_connected


# --------------------------------------------------------------------------
# Task events and the tracer's log line (cancellable.celery._ending).


class EventCatcher:
    """Celery's own event receiver on the app's broker, capturing in a thread."""

    def __init__(self, app: Celery) -> None:
        import threading

        self.events: list[dict[str, Any]] = []
        self.connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self.connection, handlers={"*": self.events.append})
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("uuid") == task_id]

    def ready(self, dispatcher: Any) -> None:
        """Return once an event sent through ``dispatcher`` arrives (the queue is bound)."""
        probe = f"probe-{uuid.uuid4()}"
        deadline = time.monotonic() + 10
        while not self.of(probe):
            assert time.monotonic() < deadline, "the receiver got no event"
            dispatcher.send("task-received", uuid=probe)
            time.sleep(0.2)

    def close(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(5)
        self.connection.close()


@pytest.fixture(name="catcher")
def catcher_fixture(app: Celery) -> Iterator[EventCatcher]:
    """A real event receiver for ``app``."""
    catcher = EventCatcher(app)
    yield catcher
    catcher.close()


class TestTaskEvents:
    """How a worker sends task events, and what it does with an ``Ignore``."""

    def _request(self, app: Celery, messages: Messages, dispatcher: Any) -> Request:
        app.tasks["contract.job"].apply_async(queue=messages.queue.name)
        message = messages.fetch()
        return Request(
            message,
            on_ack=message.ack_log_error,
            app=app,
            task=app.tasks["contract.job"],
            eventer=dispatcher,
        )

    @pytest.mark.usefixtures("celery_revoked")
    def test_announce_revoked_sends_its_event_through_send_event(
        self, app: Celery, messages: Messages, catcher: EventCatcher
    ) -> None:
        """``extra_revoked_fields``: ``_announce_revoked`` sends ``task-revoked``
        through the request's ``send_event`` (an instance attribute shadows it:
        ``Request`` has ``__dict__``), with ``terminated``, ``signum`` and
        ``expired``; ``send_task_event`` sends through the request's own
        dispatcher, for another task id too.  If not, a discarded or
        terminated task's event lacks its reason (Flower shows none), or a
        workflow member stored REVOKED is never announced."""
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, hostname="contract@host", enabled=True)
            catcher.ready(dispatcher)
            request = self._request(app, messages, dispatcher)
            with internals.extra_revoked_fields(request, {"exception": "X('why')"}):
                internals.announce_revoked(request, "why", False, None, False)
            assert "send_event" not in vars(request)
            assert internals.send_task_event(request, "task-revoked", "other-id", name="n")
            own = _wait_for(lambda: catcher.of(request.id))
            other = _wait_for(lambda: catcher.of("other-id"))

        assert 1 == len(own), own
        assert "task-revoked" == own[0]["type"]
        assert (False, None, False) == (own[0]["terminated"], own[0]["signum"], own[0]["expired"])
        assert "X('why')" == own[0]["exception"]
        assert "contract@host" == own[0]["hostname"]
        assert "n" == other[0]["name"]

    def test_send_task_event_sends_nothing_when_events_are_off(
        self, app: Celery, messages: Messages, catcher: EventCatcher
    ) -> None:
        """``send_task_event`` honours the dispatcher's ``enabled`` (the worker's
        ``-E``) and the task's ``send_events``, as ``Request.send_event`` does.
        If not, a worker without ``-E`` sends task events for cancelled tasks."""
        with app.connection_for_write() as conn:
            live = app.events.Dispatcher(conn, hostname="contract@host", enabled=True)
            catcher.ready(live)
            off = app.events.Dispatcher(conn, hostname="contract@host", enabled=False)
            request = self._request(app, messages, off)
            sent_off = internals.send_task_event(request, "task-revoked", terminated=False)
            quiet = self._request(app, messages, live)
            quiet.task.send_events = False
            try:
                sent_quiet = internals.send_task_event(quiet, "task-revoked", terminated=False)
            finally:
                quiet.task.send_events = True
            time.sleep(0.5)

        assert (False, False) == (sent_off, sent_quiet)
        assert [] == catcher.of(request.id) == catcher.of(quiet.id)

    def test_ignore_reaches_on_failure_in_the_main_process(
        self, app: Celery, worker: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``wrap_request_on_failure``: a task that raises ``Ignore`` reaches
        ``Request.on_failure`` with the exception in ``exc_info``
        (``einfo_exception`` unwraps it), after the pool ran it.  If not, a
        task that stopped at a checkpoint sends no ``task-revoked`` event."""
        monkeypatch.setattr(Request, "on_failure", original_of(Request.on_failure))
        seen: list[Any] = []

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def on_failure(self: Any, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
                seen.append((self.id, internals.einfo_exception(exc_info)))
                return original(self, exc_info, *args, **kwargs)

            return on_failure

        assert internals.wrap_request_on_failure(make)
        assert not internals.wrap_request_on_failure(make)
        ignored = app.tasks["contract.ignored"].apply_async()
        _wait_for(lambda: seen)

        assert ignored.id == seen[0][0]
        assert isinstance(seen[0][1], Ignore)

    def test_an_ignore_pickles_through_the_pool(self) -> None:
        """``einfo_exception`` of billiard's ``ExceptionInfo`` that crossed a
        pickle (as a prefork child's result does) is our ``Ignore`` subclass
        with its message and members.  If not, the main process cannot
        announce what a prefork child ended."""
        import pickle

        from billiard.einfo import ExceptionInfo

        from cancellable.celery._ending import CancelledEnding

        try:
            raise CancelledEnding("revoked by alice: stop", [("later", "t.add")])
        except CancelledEnding:
            einfo = ExceptionInfo(internal=True)
        back = internals.einfo_exception(pickle.loads(pickle.dumps(einfo)))

        assert isinstance(back, CancelledEnding)
        assert "revoked by alice: stop" == back.text
        assert [("later", "t.add")] == back.members

    def test_the_tracer_logs_an_ignore_with_the_policy_we_give(
        self, app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``wrap_trace_log_policy`` / ``revoked_log_policy``: the tracer asks
        ``celery.app.trace.get_log_policy`` (a module global) how to log an
        ``Ignore``, and logs "Task name[id] <description>" at INFO, on the
        ``celery.app.trace`` logger that ``log_task_ended`` also uses.  If not,
        the worker log says "ignored" for a cancelled task."""
        import logging

        from celery.app import trace

        monkeypatch.setattr(trace, "get_log_policy", original_of(trace.get_log_policy))

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def policy(task: Any, einfo: Any, exc: Any) -> Any:
                if isinstance(exc, Ignore):
                    return internals.revoked_log_policy("revoked: by contract")
                return original(task, einfo, exc)

            return policy

        assert internals.wrap_trace_log_policy(make)
        assert not internals.wrap_trace_log_policy(make)
        task_id = str(uuid.uuid4())
        with caplog.at_level(logging.INFO, logger="celery.app.trace"):
            app.tasks["contract.ignored"].apply(task_id=task_id)
            internals.log_task_ended("contract.other", "other-id", "revoked: by contract")

        lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
        assert (
            "celery.app.trace",
            logging.INFO,
            f"Task contract.ignored[{task_id}] revoked: by contract",
        ) in lines
        assert (
            "celery.app.trace",
            logging.INFO,
            "Task contract.other[other-id] revoked: by contract",
        ) in lines
        assert not [line for line in lines if f"[{task_id}] ignored" in line[2]]


class TestClientReaches:
    """What `cancel` reaches in Celery and kombu beyond their public API (issue 18)."""

    def test_stored_states_reads_a_redis_backend_in_bulk(self) -> None:
        """``stored_states`` reads a key-value backend (Celery's Redis backend)
        with its ``mget``, ``get_key_for_task`` and ``decode_result``: a task
        stored SUCCESS reads SUCCESS, an id never stored reads PENDING.  If
        not, ``cancel()`` would record finished tasks or skip running ones.  A
        task stored STARTED with ``{"pid", "hostname"}`` (``task_track_started``)
        gives its node name in ``hosts``; if not, ``cancel()`` reads the states
        a second time to address the worker."""
        app = Celery(
            f"contract-{uuid.uuid4().hex[:8]}",
            broker=REDIS_URL,
            backend=REDIS_URL,
            set_as_current=False,
        )
        done, unknown, running = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
        try:
            app.backend.mark_as_done(done, 1)
            app.backend.store_result(running, {"pid": 1, "hostname": "w1@h"}, "STARTED")
            read: dict[str, str] = {}
            hosts: dict[str, str] = {}
            internals.stored_states(app.backend, [done, unknown, running], read, hosts)
        finally:
            app.backend.forget(done)
            app.backend.forget(running)
            app.close()

        assert {done: "SUCCESS", unknown: "PENDING", running: "STARTED"} == read
        assert {running: "w1@h"} == hosts

    def test_stored_states_reads_a_database_backend_one_by_one(self, results_db: Path) -> None:
        """Celery's database backend has no bulk read: ``stored_states`` falls
        back on ``get_task_meta`` per id and gets the same answers."""
        app = Celery(
            f"contract-{uuid.uuid4().hex[:8]}",
            broker=REDIS_URL,
            backend=f"db+sqlite:///{results_db}",
            set_as_current=False,
        )
        done, unknown = uuid.uuid4().hex, uuid.uuid4().hex
        try:
            app.backend.mark_as_failure(done, ValueError("x"))
            read: dict[str, str] = {}
            internals.stored_states(app.backend, [done, unknown], read)
        finally:
            app.close()

        assert {done: "FAILURE", unknown: "PENDING"} == read

    def test_publish_control_once_sends_what_broadcast_sends(self, rdb: redis.Redis) -> None:
        """``publish_control_once`` (Celery's ``Control.mailbox`` bound to a
        connection, kombu's ``Mailbox._publish(..., producer=)``) puts on the
        control exchange the body ``app.control.broadcast`` puts there: same
        method, arguments, and no destination.  If not, workers would not
        recognise ``cancel()``'s revoke."""
        app = Celery(f"contract-{uuid.uuid4().hex[:8]}", broker=REDIS_URL, set_as_current=False)
        app.conf.control_exchange = app.main
        bodies: list[dict[str, Any]] = []
        exchange = Exchange(f"{app.main}.pidbox", type="fanout")
        queue = Queue(f"listener-{uuid.uuid4().hex}", exchange, auto_delete=True)
        try:
            with (
                Connection(REDIS_URL) as listen,
                Connection(REDIS_URL) as send,
                listen.Consumer(
                    [queue], callbacks=[lambda body, message: bodies.append(body)], accept=["json"]
                ),
            ):
                with contextlib.suppress(TimeoutError, OSError):
                    listen.drain_events(timeout=0.2)  # subscribe first (Redis pub/sub)
                arguments = {"task_id": ["x"], "terminate": False, "signal": "SIGTERM"}
                internals.publish_control_once(app, send, "revoke", arguments)
                app.control.broadcast("revoke", arguments=arguments)
                deadline = time.monotonic() + 5
                while len(bodies) < 2 and time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError, OSError):
                        listen.drain_events(timeout=0.2)
        finally:
            app.close()

        assert 2 == len(bodies), bodies
        ours, celerys = ({k: b[k] for k in ("method", "arguments", "destination")} for b in bodies)
        assert celerys == ours

    def test_publish_control_once_fails_at_once_on_a_dead_broker(self) -> None:
        """On a connection whose broker is gone, ``publish_control_once`` raises
        after one attempt instead of entering kombu's retry loop (which
        ``Mailbox._publish``'s ``retry=True`` would make endless)."""
        app = Celery("contract-dead", broker=DEAD_REDIS, set_as_current=False)
        started = time.monotonic()
        try:
            with (
                Connection(DEAD_REDIS, transport_options={"max_retries": 0}) as conn,
                pytest.raises(Exception),  # noqa: PT011 - the transport's own error
            ):
                internals.publish_control_once(app, conn, "revoke", {"task_id": ["x"]})
        finally:
            app.close()

        assert time.monotonic() - started < 3.0

    def test_is_fallback_app(self) -> None:
        """``is_fallback_app`` (``celery._state.default_app``, ``_tls``) recognises
        the app ``current_app`` gives a thread where no app is current, and no
        other.  A fresh interpreter, so no test's default app is around.  If
        not, ``cancel(id)`` on such a thread would use ``amqp://localhost``."""
        done = run_python(
            """
            import threading
            from celery import Celery, current_app
            from cancellable.celery import _celery_internals as internals

            mine = Celery("mine")
            seen = []
            thread = threading.Thread(target=lambda: seen.append(current_app._get_current_object()))
            thread.start()
            thread.join()
            print(internals.is_fallback_app(seen[0]), internals.is_fallback_app(mine),
                  seen[0].connection_for_write().as_uri())
            """
        )

        fallback, mine, broker = done.stdout.split()
        assert ("True", "False") == (fallback, mine)
        assert broker.startswith("amqp://")


class TestDemoTransport:
    """kombu's filesystem transport, which ``python -m cancellable demo`` extends."""

    def test_kombu_reads_the_demo_transports_files_and_skips_its_hidden_ones(
        self, tmp_path: Any
    ) -> None:
        """The demo's channel overrides ``_put`` and ``_queue_bind`` of kombu's
        filesystem ``Channel`` (the methods a virtual transport implements):
        kombu's own channel must read what it writes, direct and fanout (its
        ``_put_fanout`` calls ``_put``), and must not take a hidden ``.part``
        file of a write in progress (kombu 5.7's ``_get`` takes ``<name>.<queue>.msg``,
        kombu 5.5's any name that contains ``.<queue>.msg``).
        If not, the demo loses messages or reads them half-written again."""
        from cancellable._demo import _AtomicFilesystemTransport

        for name in ("queue", "control"):
            (tmp_path / name).mkdir()
        options = {
            "data_folder_in": str(tmp_path / "queue"),
            "data_folder_out": str(tmp_path / "queue"),
            "control_folder": str(tmp_path / "control"),
        }
        direct = Queue("contract-q", Exchange("contract-x", "direct"), routing_key="k")
        fanout = Queue("contract-f", Exchange("contract-fx", "fanout"))
        with Connection(
            "filesystem://", transport=_AtomicFilesystemTransport, transport_options=options
        ) as ours:
            producer = ours.Producer()
            producer.publish({"n": 1}, exchange=direct.exchange, routing_key="k", declare=[direct])
            producer.publish({"n": 2}, exchange=fanout.exchange, declare=[fanout])
        # A write in progress, named as `_write_atomically` names it (mkstemp's
        # ``.<8 random characters>.part``; never ``.<queue>.msg``, which kombu
        # 5.5's ``_get`` finds anywhere in a name).
        fd, part = tempfile.mkstemp(prefix=".", suffix=".part", dir=tmp_path / "queue")
        os.write(fd, b"{")
        os.close(fd)

        with Connection("filesystem://", transport_options=options) as kombus:
            channel = kombus.channel()
            got_direct = channel.basic_get("contract-q", no_ack=True)
            got_fanout = channel.basic_get("contract-f", no_ack=True)
            assert channel.basic_get("contract-q", no_ack=True) is None
            assert 0 == channel._size("contract-q")

        assert {"n": 1} == got_direct.decode()
        assert {"n": 2} == got_fanout.decode()
        # The writer leaves no hidden file behind.
        assert {"contract-x.exchange", "contract-fx.exchange"} == {
            path.name for path in (tmp_path / "control").iterdir()
        }
        assert [Path(part).name] == [p.name for p in (tmp_path / "queue").iterdir()]
