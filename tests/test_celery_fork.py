"""Fork safety of a prefork worker's main process.

billiard forks replacement children from the worker's main process at any
moment, while the library's poller thread may be working there.  A child
forked while that thread holds one of our locks (or a logger's) would
deadlock at its first use of it.  The poller therefore works under a lock
that `os.register_at_fork` takes before every fork, and the child gets a
runtime of its own (`cancellable.celery._runtime`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
from celery import Celery
from tests.celery_runtime import running_worker

from cancellable import CancelReason, CancelScope
from cancellable._log import logger
from cancellable.celery._poller import Poller
from cancellable.celery._registry import RunningTask
from cancellable.celery._runtime import WorkerRuntime, runtime

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(name="app")
def app_fixture() -> Iterator[Celery]:
    """An app without a ledger: the poller only ticks."""
    app = Celery("forks", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.cancellable_ledger_url = "none"
    app.conf.cancellable_poll_interval = 3600
    yield app
    app.close()


@pytest.fixture(name="rt")
def rt_fixture(app: Celery) -> Iterator[WorkerRuntime]:
    """A prefork worker's runtime, this process's for the test."""
    with running_worker(app, pool_kind="prefork") as rt:
        yield rt


def fork_and_report(child: object) -> bytes:
    """Fork; the child writes what ``child()`` returns (bytes) and exits; return it.

    The child is killed by an alarm after 5 s, so a deadlock shows as b"".
    """
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a multi-threaded process: that is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which coverage does not follow
        try:
            signal.alarm(5)
            os.write(write_end, child())  # type: ignore[operator]
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = b""
        while chunk := os.read(read_end, 64):
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return data


def test_no_fork_lands_inside_a_poller_tick(rt, monkeypatch):
    """30 forks while the poller spends a third of its time in a tick: none inside one."""
    inside = [False]

    def slow_tick() -> None:
        inside[0] = True
        logger.debug("test.tick")
        time.sleep(0.05)
        inside[0] = False

    monkeypatch.setattr(rt.delivery, "tick", slow_tick)
    poller = Poller(rt)
    poller.start()
    try:
        seen = [fork_and_report(lambda: b"inside" if inside[0] else b"outside") for _ in range(30)]
    finally:
        poller.stop()

    assert [b"outside"] * 30 == seen


def test_a_child_can_use_every_lock_at_once(app, rt):
    """A child forked while the poller runs has a runtime of its own: no worker, the
    parent's index and mailbox, and locks it can all take (register a task, index,
    read the mailbox, make a ledger, log)."""
    rt.index.add([("task", "before-fork")], CancelReason(message="parent"))
    poller = Poller(rt)
    poller.start()

    def child() -> bytes:
        here = runtime()
        entry = RunningTask("t-1", "job", CancelScope())
        here.tasks.running.register(entry)
        here.tasks.index.add([("task", "t-2")], CancelReason())
        here.tasks.check_mailbox()
        here.ledgers.get(app)
        logger.debug("test.child")
        inherited = here.tasks.index.match("before-fork")
        return b"ok %d %d %d %d" % (
            len(here.tasks.running.ids()),
            here.worker is None,
            here.tasks.mailbox is rt.mailbox,
            inherited is not None and inherited.message == "parent",
        )

    try:
        replies = [fork_and_report(child) for _ in range(10)]
    finally:
        poller.stop()

    assert [b"ok 1 1 1 1"] * 10 == replies
    assert not poller.thread.is_alive()
    assert runtime().worker is rt


def test_forks_during_purges_and_writes_find_every_lock_free(rt):
    """40 forks while one thread purges a large index over and over (what the poller
    does every 10 minutes) and another writes and frees mailbox slots: in every child
    the inherited index and mailbox can be written and purged, its own index too, and
    it can log.  None deadlocks (a child that hangs is killed after 5 s and counts).
    Issue 18, point 8: 6 of 20 such forks deadlocked when the index lock was inherited
    held."""
    reason = CancelReason(message="old")
    stop = threading.Event()

    def purge() -> None:
        round_no = 0
        while not stop.is_set():
            targets = [("task", f"old-{round_no}-{n}") for n in range(20_000)]
            rt.index.add(targets, reason, recorded_at=0.0)  # type: ignore[arg-type]
            rt.index.purge(ttl=60.0)
            round_no += 1

    def write_slots() -> None:
        n = 0
        while not stop.is_set():
            slot = rt.mailbox.allocate(f"slot-{n % 50}", reason, 0.0)
            if slot is not None:
                rt.mailbox.release(slot)
            n += 1

    def child() -> bytes:
        rt.index.add([("task", "in-child")], CancelReason())
        rt.index.purge(ttl=60.0)
        slot = rt.mailbox.allocate("in-child", CancelReason(), 0.0)
        if slot is not None:
            rt.mailbox.release(slot)
        runtime().tasks.index.add([("task", "own")], CancelReason())
        logger.debug("test.child")
        return b"ok"

    threads = [threading.Thread(target=f, daemon=True) for f in (purge, write_slots)]
    for thread in threads:
        thread.start()
    try:
        replies = []
        for _ in range(40):
            time.sleep(0.01)
            replies.append(fork_and_report(child))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    assert 0 == replies.count(b""), f"{replies.count(b'')} of 40 children deadlocked"
    assert [b"ok"] * 40 == replies
