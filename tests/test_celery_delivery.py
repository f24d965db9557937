"""Delivery from a worker's main process (`cancellable.celery._delivery`): to a task
running here, to a prefork child's mailbox slot, and the wake-up signals.

Real requests held in Celery's own worker state, a real mailbox, and real
child processes that count the signals they receive.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.worker import state as worker_state
from structlog.testing import capture_logs
from tests.celery_worker import (  # noqa: F401 - fixtures, found by pytest by name
    REDIS_URL,
    Messages,
    app_fixture,
    box_fixture,
    clean_worker_state,
    ledger_entries,
    make_app,
    messages_fixture,
    revoke,
    rt_fixture,
    running,
)

import cancellable.celery  # noqa: F401 - activates the integration (patches at worker start)
from cancellable import CancelReason
from cancellable.celery._delivery import RESIGNAL_AFTER, Delivery
from cancellable.celery._mailbox import KEY_SIZE, Mailbox
from cancellable.celery._registry import RunningTasks
from cancellable.celery._runtime import WorkerRuntime
from cancellable.celery._wakeup import Wakeup


class TestDelivery:
    """`_delivery.deliver` and `tick`: getting a cancellation to the task it names."""

    def test_local_task_is_cancelled_once(self, rt: WorkerRuntime, box: Mailbox) -> None:
        """A task in this process's registry is cancelled directly; a second delivery
        keeps the first reason and logs nothing more."""
        first = CancelReason(source="revoked", message="first")
        with running(rt, "here") as entry, capture_logs() as logs:
            how = rt.delivery.deliver("here", first)
            again = rt.delivery.deliver("here", CancelReason(message="second"))

        assert ("local", "local") == (how, again)
        assert first == entry.scope.cancel_reason
        assert 1 == [e["event"] for e in logs].count("cancel.delivered")
        assert box.slots == box.free

    def test_held_request_gets_a_forward_with_a_slot(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages
    ) -> None:
        """A request the worker holds gets one mailbox slot with the reason, however
        often it is delivered."""
        request = messages.held()
        reason = CancelReason(source="revoked", message="stop")

        how = rt.delivery.deliver(request.id, reason)
        again = rt.delivery.deliver(request.id, reason)
        forward = rt.delivery.forwarding()[request.id]

        assert ("forward", "forward") == (how, again)
        assert forward.slot is not None
        assert reason == box.find({request.id})[request.id].reason
        assert box.slots - 1 == box.free

    def test_a_task_not_held_gets_nothing(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages
    ) -> None:
        """No registry entry and no held request: "none", no slot."""
        request = messages.request()

        assert "none" == rt.delivery.deliver(request.id, CancelReason())
        assert {} == rt.delivery.forwarding()
        assert box.slots == box.free

    def test_without_a_mailbox_nothing_is_forwarded(self, messages: Messages) -> None:
        """Without a mailbox, a held request that has not started finds the index
        when it starts, so nothing is forwarded."""
        request = messages.held()
        delivery = Delivery(RunningTasks(), None, Wakeup(), messages.app)

        assert "none" == delivery.deliver(request.id, CancelReason())
        assert {} == delivery.forwarding()

    @pytest.mark.parametrize("payload", ["cancel", "plain"])
    def test_one_revoke_of_200_ids_writes_one_slot(
        self, rt: WorkerRuntime, app: Celery, box: Mailbox, messages: Messages, payload: str
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

        assert [held.id] == list(rt.delivery.forwarding())
        assert box.slots - 1 == box.free
        assert [held.id] == list(found)
        assert "revoked" == found[held.id].reason.source

    def test_tick_frees_the_slot_when_the_task_leaves(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages
    ) -> None:
        """tick() keeps a forward while its request is held and frees its slot once
        the request has left worker_state.requests."""
        request = messages.held()
        rt.delivery.deliver(request.id, CancelReason())
        rt.delivery.tick()
        kept = list(rt.delivery.forwarding())

        worker_state.task_ready(request)
        rt.delivery.tick()

        assert [request.id] == kept
        assert {} == rt.delivery.forwarding()
        assert box.slots == box.free
        assert {} == box.find({request.id})

    def test_a_full_mailbox_waits_for_a_free_slot(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages
    ) -> None:
        """With every slot taken, a new forward is kept without a slot (one warning)
        and gets one at the first tick after another task left."""
        held = [messages.held() for _ in range(box.slots + 1)]
        with capture_logs() as logs:
            for request in held:
                rt.delivery.deliver(request.id, CancelReason(message=request.id))
        waiting = rt.delivery.forwarding()[held[-1].id]
        slot_while_full = waiting.slot

        worker_state.task_ready(held[0])
        rt.delivery.tick()

        assert slot_while_full is None
        assert ["mailbox.full"] == [e["event"] for e in logs if e["event"] == "mailbox.full"]
        assert rt.delivery.forwarding()[held[-1].id].slot is not None
        assert held[-1].id == box.find({held[-1].id})[held[-1].id].reason.message
        assert 0 == box.free

    def test_concurrent_deliveries_and_ticks_never_leak_a_slot(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages
    ) -> None:
        """Two threads deliver the same 16 held tasks over and over while a third ticks
        and the tasks leave and come back, 30 rounds (the interpreter switching threads
        every microsecond): a task never holds two slots, and once every task has left,
        a tick frees every slot (0 leaks).  Issue 18, point 8."""
        held = [messages.held() for _ in range(16)]
        reason = CancelReason(message="stop")
        stop = threading.Event()
        problems: list[str] = []
        most_in_use = [0]

        def deliver() -> None:
            while not stop.is_set():
                for request in held:
                    rt.delivery.deliver(request.id, reason)

        def tick() -> None:
            while not stop.is_set():
                rt.delivery.tick()
                keys = published_keys(box)
                if len(set(keys)) != len(keys):
                    problems.append("a task holds two slots")
                most_in_use[0] = max(most_in_use[0], len(keys))

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        threads = [threading.Thread(target=f) for f in (deliver, deliver, tick)]
        leaked: list[int] = []
        try:
            for thread in threads:
                thread.start()
            for _ in range(30):
                time.sleep(0.01)
                for request in held:
                    worker_state.task_ready(request)
                time.sleep(0.01)
                for request in held:
                    worker_state.task_reserved(request)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            sys.setswitchinterval(interval)
        for request in held:
            worker_state.task_ready(request)
        rt.delivery.tick()
        leaked.append(box.slots - box.free)

        assert [] == problems
        assert 0 < most_in_use[0] <= len(held)
        assert {} == rt.delivery.forwarding()
        assert [0] == leaked
        assert [] == published_keys(box)


def published_keys(box: Mailbox) -> list[bytes]:
    """The keys published in the mailbox's key table (one per slot in use)."""
    size = KEY_SIZE
    keys = [bytes(box._map[n * size : (n + 1) * size]) for n in range(box.slots)]
    return [key for key in keys if any(key)]


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
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages, child: subprocess.Popen[bytes]
    ) -> None:
        """One signal at delivery, another after RESIGNAL_AFTER, none once the slot
        is acknowledged."""
        assert child.stdout is not None
        out = child.stdout.fileno()
        request = messages.held()
        request.on_accepted(child.pid, time.monotonic())

        with capture_logs() as logs:
            rt.delivery.deliver(request.id, CancelReason(message="wake up"))
            at_delivery = read_for(out, 0.3)
            rt.delivery.tick()
            too_soon = read_for(out, 0.1)
            time.sleep(RESIGNAL_AFTER)
            rt.delivery.tick()
            resent = read_for(out, 0.3)
            box.acknowledge(rt.delivery.forwarding()[request.id].slot)  # type: ignore[arg-type]
            time.sleep(RESIGNAL_AFTER + 0.1)
            rt.delivery.tick()
            rt.delivery.tick()
            after_ack = read_for(out, 0.3)

        assert (b"S", b"", b"S", b"") == (at_delivery, too_soon, resent, after_ack)
        signalled = [e for e in logs if e["event"] == "cancel.delivered"]
        assert [("signal", child.pid)] == [(e["how"], e["pid"]) for e in signalled]

    @pytest.mark.parametrize("pid", ["none", "self"])
    def test_no_signal_without_a_child(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages, pid: str
    ) -> None:
        """A task not in a child yet (no pid), or in this process, is never signalled;
        its slot waits for it."""
        received: list[int] = []
        previous = signal.signal(signal.SIGURG, lambda number, frame: received.append(number))
        try:
            request = messages.held()
            if pid == "self":
                request.on_accepted(os.getpid(), time.monotonic())
            how = rt.delivery.deliver(request.id, CancelReason())
            time.sleep(RESIGNAL_AFTER + 0.1)
            rt.delivery.tick()
            time.sleep(0.1)
        finally:
            signal.signal(signal.SIGURG, previous)

        assert "forward" == how
        assert [] == received
        assert request.id in box.find({request.id})

    def test_a_plain_task_child_is_never_signalled(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages, child: subprocess.Popen[bytes]
    ) -> None:
        """A held task that is not @cancellable (Celery's own revoke leaves it alone)
        gets no forward, no slot and no signal, at delivery or at any tick (before
        issue 18 point 4 its child got a signal every RESIGNAL_AFTER seconds)."""
        assert child.stdout is not None
        request = messages.held(name="ws.job")
        request.on_accepted(child.pid, time.monotonic())

        how = rt.delivery.deliver(request.id, CancelReason(message="plain"))
        for _ in range(3):
            time.sleep(RESIGNAL_AFTER + 0.05)
            rt.delivery.tick()
        received = read_for(child.stdout.fileno(), 0.3)

        assert "none" == how
        assert b"" == received
        assert {} == rt.delivery.forwarding()
        assert box.slots == box.free

    def test_a_child_that_is_gone_is_not_an_error(
        self, rt: WorkerRuntime, box: Mailbox, messages: Messages
    ) -> None:
        """Signalling a pid that has exited fails quietly; the forward and slot stay."""
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        request = messages.held()
        request.on_accepted(gone.pid, time.monotonic())

        how = rt.delivery.deliver(request.id, CancelReason())
        rt.delivery.tick()

        assert "forward" == how
        assert [request.id] == list(rt.delivery.forwarding())
        assert request.id in box.find({request.id})
