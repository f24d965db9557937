"""The worker-side machinery, driven in this process against real Redis and real Celery objects.

These call the real ``revoke`` control handler from Celery's ``Panel``
registry (Celery's own code, with our wrapper around it), build real
``celery.worker.request.Request`` objects from task messages published to
and fetched back from a real broker (Redis DB 12), hold them in Celery's own
``worker_state`` with its own functions, and start embedded workers with
``celery.contrib.testing.worker.start_worker``.  Prefork workers are
exercised end to end in ``tests/integration``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import celery
import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.utils.collections import AttributeDict
from celery.worker import state as worker_state
from celery.worker.control import Panel
from celery.worker.request import Request
from kombu import Connection, Exchange, Queue
from structlog.testing import capture_logs
from tests import redis_dbs

import cancellable.celery  # noqa: F401 - installs the wrapper and the Request patches
from cancellable import CancelReason, CancelScope
from cancellable.celery import _delivery, _index, _ledger, _registry, _worker
from cancellable.celery._mailbox import Mailbox

REDIS_URL = redis_dbs.url(redis_dbs.UNIT_DB)


def _forget_worker_state() -> None:
    """Empty Celery's and our per-process worker bookkeeping."""
    worker_state.revoked.clear()
    worker_state.requests.clear()
    worker_state.reserved_requests.clear()
    worker_state.active_requests.clear()
    _index.index.clear()
    with _delivery._lock:
        _delivery._forwards.clear()


@pytest.fixture(autouse=True)
def _clean_worker_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts and ends with empty worker state and no mailbox."""
    _forget_worker_state()
    monkeypatch.setattr(_delivery, "_mailbox", None)
    monkeypatch.setattr(_delivery, "_warned_full", False)
    yield
    _forget_worker_state()


@pytest.fixture(name="app")
def app_fixture(rdb: redis.Redis) -> Iterator[Celery]:
    """An app on Redis DB 12 (broker, result backend, ledger) with one task."""
    app = Celery(f"ws-{uuid.uuid4().hex[:8]}", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.broker_connection_retry_on_startup = True

    @app.task(name="ws.job", shared=False)
    def job() -> str:
        return "ran"

    _ledger.reset()
    yield app
    _ledger.reset()
    app.close()


@pytest.fixture(name="box")
def box_fixture() -> Mailbox:
    """A prefork worker's main-process mailbox (64 slots), as worker_init makes it."""
    return _delivery.create_mailbox(64)


class Messages:
    """Task messages sent to a private queue on the real broker and fetched back
    as the worker's consumer receives them, turned into real ``Request`` objects."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        name = f"ws-q-{uuid.uuid4().hex[:8]}"
        self.queue = Queue(name, Exchange(name), name)
        self.conn = Connection(REDIS_URL)
        self.queue(self.conn.default_channel).declare()

    def request(self, task_id: str | None = None, **options: Any) -> Request:
        """Send ``ws.job`` with ``options`` and build the Request the consumer would."""
        task_id = task_id or str(uuid.uuid4())
        self.app.tasks["ws.job"].apply_async(task_id=task_id, queue=self.queue.name, **options)
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
            task=self.app.tasks["ws.job"],
        )

    def held(self, task_id: str | None = None, **options: Any) -> Request:
        """A request this worker holds (reserved), via Celery's own ``task_reserved``."""
        request = self.request(task_id, **options)
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
def running(task_id: str, **fields: Any) -> Iterator[_registry.RunningTask]:
    """A ``@cancellable`` task registered as running in this process."""
    entry = _registry.RunningTask(task_id, "ws.job", CancelScope(), **fields)
    _registry.register(entry)
    try:
        yield entry
    finally:
        _registry.unregister(entry)


#: Celery 5.6 and later mark a revoked id REVOKED in the result backend at once;
#: earlier releases leave it PENDING until a worker receives the task.
CELERY_MARKS_REVOKED = tuple(map(int, celery.__version__.split(".")[:2])) >= (5, 6)


def ledger_entries(app: Celery) -> list[_ledger.Entry]:
    """Everything the app's ledger holds."""
    entries, _ = _ledger.ledger_for(app).read(None)
    return entries


class TestRevokeHandler:
    """The wrapper around Celery's own revoke command (`_wrap_revoke`, `_on_revoke`)."""

    def test_wrapper_is_installed_once(self) -> None:
        """Installing again does not wrap the handler twice."""
        handler = Panel.data["revoke"]

        _worker.install()
        _worker._wrap_revoke()

        assert handler is Panel.data["revoke"]
        assert "revoke" == handler._cancellable_original.__name__  # type: ignore[attr-defined]

    def test_plain_revoke_is_recorded_and_indexed(self, app: Celery) -> None:
        """A plain revoke: Celery's own bookkeeping, plus a ledger entry and an index
        entry with source "revoked"."""
        task_id = str(uuid.uuid4())

        revoke(app, task_id)
        entries = ledger_entries(app)
        indexed = _index.index.match(task_id)

        assert task_id in worker_state.revoked
        assert ("REVOKED" if CELERY_MARKS_REVOKED else "PENDING") == app.AsyncResult(task_id).state
        assert [(("task", task_id),)] == [e.targets for e in entries]
        assert ("revoked", "") == (entries[0].reason.source, entries[0].reason.message)
        assert indexed is not None
        assert "revoked" == indexed.source

    def test_cancel_payload_bypasses_celerys_handler(self, app: Celery) -> None:
        """cancel()'s revoke is indexed with its reason and not passed to Celery's
        handler: no per-id backend write, no revoked-set entry, no second ledger entry."""
        reason = CancelReason(source="revoked", message="stop", requested_by="alice")
        ids = [str(uuid.uuid4()) for _ in range(3)]

        result = revoke(app, ids, cancellable=reason.to_dict())

        assert ids == result
        assert [reason] * 3 == [_index.index.match(i) for i in ids]
        assert ["PENDING"] * 3 == [app.AsyncResult(i).state for i in ids]
        assert [] == [i for i in ids if i in worker_state.revoked]
        assert [] == ledger_entries(app)

    def test_running_task_in_this_process_is_cancelled(self, app: Celery) -> None:
        """A task running here (threads pool) is cancelled directly, with the reason."""
        task_id = str(uuid.uuid4())
        with running(task_id) as entry, capture_logs() as logs:
            revoke(app, task_id, cancellable={"source": "revoked", "message": "halt"})

        assert entry.revoked()
        assert "halt" == entry.scope.cancel_reason.message  # type: ignore[union-attr]
        assert ["local"] == [e["how"] for e in logs if e["event"] == "cancel.delivered"]

    def test_malformed_payload_falls_back_to_a_plain_revoke(self, app: Celery) -> None:
        """A payload that is not a valid reason is treated as a plain revoke."""
        task_id = str(uuid.uuid4())

        revoke(app, task_id, cancellable={"source": "not-a-source"})

        assert task_id in worker_state.revoked
        assert ["revoked"] == [e.reason.source for e in ledger_entries(app)]
        assert _worker._reason_from(42) is None

    def test_ledger_down_is_logged_not_raised(self, app: Celery) -> None:
        """A plain revoke with the ledger unreachable still revokes, with an event."""
        app.conf.cancellable_ledger_url = "redis://127.0.0.1:1/0"
        task_id = str(uuid.uuid4())

        with capture_logs() as logs:
            revoke(app, task_id)

        assert task_id in worker_state.revoked
        assert _index.index.match(task_id) is not None
        assert "ledger.unavailable" in [e["event"] for e in logs]

    def test_terminate_is_left_to_celery(self, app: Celery) -> None:
        """revoke(terminate=True) goes to Celery alone: nothing indexed or recorded."""
        task_id = str(uuid.uuid4())

        revoke(app, task_id, terminate=True, signal="SIGTERM")

        assert task_id in worker_state.revoked
        assert _index.index.match(task_id) is None
        assert [] == ledger_entries(app)


class TestDelivery:
    """`_delivery.deliver` and `tick`: getting a cancellation to the task it names."""

    def test_local_task_is_cancelled_once(self, box: Mailbox) -> None:
        """A task in this process's registry is cancelled directly; a second delivery
        keeps the first reason and logs nothing more."""
        first = CancelReason(source="revoked", message="first")
        with running("here") as entry, capture_logs() as logs:
            how = _delivery.deliver("here", first)
            again = _delivery.deliver("here", CancelReason(message="second"))

        assert ("local", "local") == (how, again)
        assert first == entry.scope.cancel_reason
        assert 1 == [e["event"] for e in logs].count("cancel.delivered")
        assert box.slots == box.free

    def test_held_request_gets_a_forward_with_a_slot(
        self, box: Mailbox, messages: Messages
    ) -> None:
        """A request the worker holds gets one mailbox slot with the reason, however
        often it is delivered."""
        request = messages.held()
        reason = CancelReason(source="revoked", message="stop")

        how = _delivery.deliver(request.id, reason)
        again = _delivery.deliver(request.id, reason)
        forward = _delivery.forwarding()[request.id]

        assert ("forward", "forward") == (how, again)
        assert forward.slot is not None
        assert reason == box.find({request.id})[request.id].reason
        assert box.slots - 1 == box.free

    def test_a_task_not_held_gets_nothing(self, box: Mailbox, messages: Messages) -> None:
        """No registry entry and no held request: "none", no slot."""
        request = messages.request()

        assert "none" == _delivery.deliver(request.id, CancelReason())
        assert {} == _delivery.forwarding()
        assert box.slots == box.free

    def test_without_a_mailbox_nothing_is_forwarded(self, messages: Messages) -> None:
        """In-process pools have no mailbox: a held request that has not started
        finds the index when it starts, so nothing is forwarded."""
        request = messages.held()

        assert "none" == _delivery.deliver(request.id, CancelReason())
        assert {} == _delivery.forwarding()

    @pytest.mark.parametrize("payload", ["cancel", "plain"])
    def test_one_revoke_of_200_ids_writes_one_slot(
        self, app: Celery, box: Mailbox, messages: Messages, payload: str
    ) -> None:
        """A revoke naming 200 ids of which this worker holds 1 uses exactly one
        slot, and the held task's slot survives (a 64-slot ring lost it)."""
        held = messages.held()
        ids = [str(uuid.uuid4()) for _ in range(100)] + [held.id]
        ids += [str(uuid.uuid4()) for _ in range(99)]
        reason = CancelReason(source="revoked", message="bulk")
        extra = {"cancellable": reason.to_dict()} if payload == "cancel" else {}

        revoke(app, ids, **extra)
        found = box.find(set(ids))

        assert [held.id] == list(_delivery.forwarding())
        assert box.slots - 1 == box.free
        assert [held.id] == list(found)
        assert "revoked" == found[held.id].reason.source

    def test_tick_frees_the_slot_when_the_task_leaves(
        self, box: Mailbox, messages: Messages
    ) -> None:
        """tick() keeps a forward while its request is held and frees its slot once
        the request has left worker_state.requests."""
        request = messages.held()
        _delivery.deliver(request.id, CancelReason())
        _delivery.tick()
        kept = list(_delivery.forwarding())

        worker_state.task_ready(request)
        _delivery.tick()

        assert [request.id] == kept
        assert {} == _delivery.forwarding()
        assert box.slots == box.free
        assert {} == box.find({request.id})

    def test_a_full_mailbox_waits_for_a_free_slot(self, box: Mailbox, messages: Messages) -> None:
        """With every slot taken, a new forward is kept without a slot (one warning)
        and gets one at the first tick after another task left."""
        held = [messages.held() for _ in range(box.slots + 1)]
        with capture_logs() as logs:
            for request in held:
                _delivery.deliver(request.id, CancelReason(message=request.id))
        waiting = _delivery.forwarding()[held[-1].id]
        slot_while_full = waiting.slot

        worker_state.task_ready(held[0])
        _delivery.tick()

        assert slot_while_full is None
        assert ["mailbox.full"] == [e["event"] for e in logs if e["event"] == "mailbox.full"]
        assert _delivery.forwarding()[held[-1].id].slot is not None
        assert held[-1].id == box.find({held[-1].id})[held[-1].id].reason.message
        assert 0 == box.free


CHILD = r"""
import os, signal, time
signal.signal(signal.SIGURG, lambda number, frame: os.write(1, b"S"))
os.write(1, b"R")
time.sleep(60)
"""


def read_for(fd: int, seconds: float, until: bytes | None = None) -> bytes:
    """What arrives on ``fd`` within ``seconds`` (or until ``until`` has arrived)."""
    data = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and (until is None or until not in data):
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data


@pytest.fixture(name="child")
def child_fixture() -> Iterator[subprocess.Popen[bytes]]:
    """A real child process that writes "S" for each SIGURG it receives."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert b"R" == read_for(child.stdout.fileno(), 10, until=b"R")
    yield child
    child.kill()
    child.wait(10)
    child.stdout.close()


class TestWakeUpSignals:
    """Wake-up signals go to the child running a task until it acknowledges."""

    def test_signals_the_child_until_it_acknowledges(
        self, box: Mailbox, messages: Messages, child: subprocess.Popen[bytes]
    ) -> None:
        """One signal at delivery, another after RESIGNAL_AFTER, none once the slot
        is acknowledged."""
        assert child.stdout is not None
        out = child.stdout.fileno()
        request = messages.held()
        request.on_accepted(child.pid, time.monotonic())

        with capture_logs() as logs:
            _delivery.deliver(request.id, CancelReason(message="wake up"))
            at_delivery = read_for(out, 0.3)
            _delivery.tick()
            too_soon = read_for(out, 0.1)
            time.sleep(_delivery.RESIGNAL_AFTER)
            _delivery.tick()
            resent = read_for(out, 0.3)
            box.acknowledge(_delivery.forwarding()[request.id].slot)  # type: ignore[arg-type]
            time.sleep(_delivery.RESIGNAL_AFTER + 0.1)
            _delivery.tick()
            _delivery.tick()
            after_ack = read_for(out, 0.3)

        assert (b"S", b"", b"S", b"") == (at_delivery, too_soon, resent, after_ack)
        signalled = [e for e in logs if e["event"] == "cancel.delivered"]
        assert [("signal", child.pid)] == [(e["how"], e["pid"]) for e in signalled]

    @pytest.mark.parametrize("pid", ["none", "self"])
    def test_no_signal_without_a_child(self, box: Mailbox, messages: Messages, pid: str) -> None:
        """A task not in a child yet (no pid), or in this process, is never signalled;
        its slot waits for it."""
        received: list[int] = []
        previous = signal.signal(signal.SIGURG, lambda number, frame: received.append(number))
        try:
            request = messages.held()
            if pid == "self":
                request.on_accepted(os.getpid(), time.monotonic())
            how = _delivery.deliver(request.id, CancelReason())
            time.sleep(_delivery.RESIGNAL_AFTER + 0.1)
            _delivery.tick()
            time.sleep(0.1)
        finally:
            signal.signal(signal.SIGURG, previous)

        assert "forward" == how
        assert [] == received
        assert request.id in box.find({request.id})

    def test_a_child_that_is_gone_is_not_an_error(self, box: Mailbox, messages: Messages) -> None:
        """Signalling a pid that has exited fails quietly; the forward and slot stay."""
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        request = messages.held()
        request.on_accepted(gone.pid, time.monotonic())

        how = _delivery.deliver(request.id, CancelReason())
        _delivery.tick()

        assert "forward" == how
        assert [request.id] == list(_delivery.forwarding())
        assert request.id in box.find({request.id})


class TestRequestPatches:
    """Celery's pre-pool check (``Request.revoked``) consults the index, and its
    discard stores the recorded reason."""

    def test_an_indexed_task_is_discarded_with_its_reason(
        self, app: Celery, messages: Messages
    ) -> None:
        """Indexed but not in Celery's revoked set: revoked() is True, the request
        leaves the worker and REVOKED carries the recorded reason."""
        request = messages.held()
        reason = CancelReason(source="revoked", message="stop", requested_by="alice")
        _index.index.add([("task", request.id)], reason)
        before = request.id in worker_state.revoked

        discarded = request.revoked()
        result = app.AsyncResult(request.id)

        assert (False, True) == (before, discarded)
        assert "REVOKED" == result.state
        assert "revoked by alice: stop" == str(result.result)
        assert request.id not in worker_state.requests

    def test_discarded_even_when_celerys_revoked_set_is_full(
        self, app: Celery, messages: Messages, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bulk cancel larger than Celery's revoked set (here 100 ids, full of
        others) is still honoured for every id, with its reason."""
        monkeypatch.setattr(worker_state.revoked, "maxlen", 100)
        worker_state.revoked.update(f"other-{n}" for n in range(100))
        ids = [str(uuid.uuid4()) for _ in range(300)]
        reason = CancelReason(source="revoked", message="bulk")
        revoke(app, ids, cancellable=reason.to_dict())
        first, last = messages.request(ids[0]), messages.request(ids[-1])

        discarded = (first.revoked(), last.revoked())

        assert (True, True) == discarded
        assert 100 >= len(worker_state.revoked)
        assert ["revoked: bulk"] * 2 == [str(app.AsyncResult(i).result) for i in (ids[0], ids[-1])]

    @pytest.mark.parametrize("kind", ["group", "root"])
    def test_matched_through_its_group_or_root(
        self, app: Celery, messages: Messages, kind: str
    ) -> None:
        """A request whose group id or root id is a live target is discarded too."""
        target = str(uuid.uuid4())
        option = {"group_id": target} if kind == "group" else {"root_id": target}
        request = messages.request(**option)
        _index.index.add([(kind, target)], CancelReason(source="revoked", message=kind))  # type: ignore[list-item]

        discarded = request.revoked()

        assert discarded
        assert f"revoked: {kind}" == str(app.AsyncResult(request.id).result)

    def test_a_request_not_in_the_index_is_untouched(self, app: Celery, messages: Messages) -> None:
        """Not indexed and not revoked: revoked() is False and nothing is stored."""
        _index.index.add([("task", "someone-else")], CancelReason())
        request = messages.held()

        discarded = request.revoked()

        assert not discarded
        assert "PENDING" == app.AsyncResult(request.id).state
        assert request.id in worker_state.requests
        assert request.id not in worker_state.revoked

    def test_celerys_own_revoke_keeps_celerys_reason(self, app: Celery, messages: Messages) -> None:
        """An id only in Celery's revoked set is discarded with Celery's "revoked"."""
        request = messages.request()
        worker_state.revoked.add(request.id)

        discarded = request.revoked()

        assert discarded
        assert "revoked" == str(app.AsyncResult(request.id).result)


class TestLedgerPoll:
    """The poller's read of the ledger (`_Poller.sync`) and `deliver_targets`."""

    def test_sync_indexes_and_delivers_once(self, app: Celery) -> None:
        """A cancellation recorded elsewhere is indexed and delivered once."""
        task_id, queued = str(uuid.uuid4()), str(uuid.uuid4())
        _ledger.ledger_for(app).record(
            [("task", task_id), ("task", queued)], CancelReason(message="late")
        )
        poller = _worker._Poller(app)
        with running(task_id) as entry, capture_logs() as logs:
            poller.sync()
            poller.sync()

        assert entry.revoked()
        assert "late" == entry.scope.cancel_reason.message  # type: ignore[union-attr]
        assert 1 == [e["event"] for e in logs].count("cancel.delivered")
        assert "late" == _index.index.match(queued).message  # type: ignore[union-attr]

    def test_sync_with_the_ledger_down_logs(self, app: Celery) -> None:
        """An unreachable ledger is logged; the cursor is kept."""
        app.conf.cancellable_ledger_url = "redis://127.0.0.1:1/0"
        _index.index.cursor = "5-0"

        with capture_logs() as logs:
            _worker._Poller(app).sync()

        assert ["ledger.unavailable"] == [e["event"] for e in logs]
        assert "5-0" == _index.index.cursor

    def test_a_group_target_from_the_ledger_keeps_its_grace(self, app: Celery) -> None:
        """``cancel(group, grace=7)`` read from the ledger: the group's task is laddered at 7 s.

        (A worker that missed the broadcast, or a busy solo worker, must honour
        the grace the call gave, not fall back to the task's or the app's.)
        """
        from cancellable.celery import _ladder

        group = str(uuid.uuid4())
        _ledger.ledger_for(app).record([("group", group)], CancelReason(message="late"), 7.0)
        with running("in-group", group=group) as entry:
            try:
                _worker._Poller(app).sync()
                rung = _ladder.rungs().get("in-group")
            finally:
                with _ladder._lock:
                    _ladder._rungs.pop("in-group", None)

        assert entry.scope.cancel_called
        assert rung is not None
        assert 7.0 == rung.grace

    def test_a_group_target_reaches_a_held_request(self, box: Mailbox, messages: Messages) -> None:
        """A group target is delivered to the held request of that group, and only it."""
        group = str(uuid.uuid4())
        member, other = messages.held(group_id=group), messages.held()
        added = _index.index.add([("group", group)], CancelReason(message="group"))

        delivered = _worker.deliver_targets(added)

        assert 1 == delivered
        assert [member.id] == list(_delivery.forwarding())
        assert other.id not in box.find({other.id})

    def test_a_group_target_reaches_a_task_running_here(self) -> None:
        """A group target cancels a @cancellable task of that group running in this
        process (threads pool), found through the registry."""
        group = str(uuid.uuid4())
        added = _index.index.add([("group", group)], CancelReason(message="group"))
        with running("in-group", group=group) as entry, running("not-in-group") as other:
            delivered = _worker.deliver_targets(added)

        assert 1 == delivered
        assert entry.scope.cancel_called
        assert not other.scope.cancel_called


def pollers() -> list[threading.Thread]:
    """Poller threads alive in this process."""
    return [t for t in threading.enumerate() if t.name == "cancellable-poller" and t.is_alive()]


def count_calls(calls: list[float], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, recording when each call was made."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return function(*args, **kwargs)

    return wrapper


class TestPollerLifecycle:
    """One poller per running worker, gone when the worker is."""

    def test_a_poller_stops_and_reads_no_more(
        self, app: Celery, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A started poller reads the ledger every interval; after stop() its thread
        has ended and it reads nothing more."""
        app.conf.cancellable_poll_interval = 0.1
        ledger = _ledger.ledger_for(app)
        reads: list[float] = []
        monkeypatch.setattr(ledger, "read", count_calls(reads, ledger.read))
        poller = _worker._Poller(app)

        poller.start()
        time.sleep(0.5)
        poller.stop()
        at_stop = len(reads)
        time.sleep(0.4)

        assert at_stop >= 2
        assert not poller.thread.is_alive()
        assert at_stop == len(reads)

    def test_twenty_embedded_workers_leave_no_poller(
        self, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """start_worker() 20 times in a row: afterwards no poller thread is alive and
        no ledger read happens after the last worker stopped."""
        app = Celery(f"ws-life-{uuid.uuid4().hex[:8]}", broker=REDIS_URL, backend="cache+memory://")
        app.conf.cancellable_ledger_url = REDIS_URL
        app.conf.cancellable_poll_interval = 0.1
        app.conf.broker_connection_retry_on_startup = True
        _ledger.reset()
        ledger = _ledger.ledger_for(app)
        reads: list[float] = []
        monkeypatch.setattr(ledger, "read", count_calls(reads, ledger.read))
        alive_during: list[int] = []
        try:
            for _ in range(20):
                with start_worker(app, pool="threads", perform_ping_check=False):
                    alive_during.append(len(pollers()))
            stopped_at = time.monotonic()
            time.sleep(0.5)
            left = [t.name for t in pollers()]
            late_reads = len([t for t in reads if t > stopped_at])
        finally:
            _worker._on_worker_shutdown()
            _ledger.reset()
            app.close()

        assert [1] * 20 == alive_during
        assert len(reads) >= 20
        assert {"pollers alive": [], "reads after the last stop": 0} == {
            "pollers alive": left,
            "reads after the last stop": late_reads,
        }


class TestBroadcastPayload:
    """What the revoke interceptor takes from a `cancel()` broadcast, and what it drops."""

    def test_targets_keep_the_valid_ones(self) -> None:
        """Group and root targets pass; malformed items are dropped, not raised."""
        payload = [
            ["group", "g-1"],
            ("root", "r-1"),
            ["no-such-kind", "x"],
            ["group"],
            "group:g-2",
            ["root", ""],
        ]

        assert [("group", "g-1"), ("root", "r-1")] == _worker.targets_from(payload)
        assert [] == _worker.targets_from(None)
        assert [] == _worker.targets_from({"group": "g"})

    @pytest.mark.parametrize(
        ("payload", "expected"),
        [(0, 0.0), (2, 2.0), (0.5, 0.5), (-1, None), (float("inf"), None), (float("nan"), None),
         (True, None), ("3", None), (None, None)],
    )  # fmt: skip
    def test_grace_is_a_finite_number_of_seconds(self, payload: object, expected: object) -> None:
        """The grace travels as a number; anything else (or inf, NaN, < 0) is no grace."""
        assert expected == _worker._grace_from(payload)

    def test_mailbox_slots_follow_prefetch_and_concurrency(self) -> None:
        """Slots: prefetch plus one per child plus headroom; unlimited prefetch is capped."""
        app = Celery("slots", set_as_current=False)
        sender = AttributeDict(concurrency=2)
        app.conf.worker_prefetch_multiplier = 3
        assert 2 * 3 + 2 + 16 == _worker._mailbox_slots(sender, app)
        app.conf.worker_prefetch_multiplier = 0
        assert 1 << 30 == _worker._mailbox_slots(sender, app)
        app.conf.worker_prefetch_multiplier = -5
        assert 2 * 4 + 2 + 16 == _worker._mailbox_slots(sender, app)
        assert _worker._mailbox_slots(AttributeDict(concurrency=None), app) > 16
