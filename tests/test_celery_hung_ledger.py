"""A fork of a worker's main process never waits on a hung ledger server (issue 18, point 1).

billiard forks new pool children from the worker's main process; our at-fork
handler first takes the worker's ``tick_lock``.  Nothing may hold that lock
across network I/O.  The ledger here lives on a ``redis-server`` of the test's
own (`tests.soak.harness.RedisServer`), which the test ``SIGSTOP`` s; the
worker runtime, its poller threads, the task message and its ``Request`` are
real (`tests.celery_worker`), and the forks are real ``os.fork`` calls that
run the at-fork handlers.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from tests.celery_runtime import running_worker
from tests.celery_worker import Messages, make_app
from tests.soak.harness import RedisServer, free_port
from tests.test_celery_fork import fork_and_report

from cancellable import CancelReason
from cancellable.celery._poller import Poller
from cancellable.celery._revokes import deliver_targets
from cancellable.celery._runtime import runtime

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(name="ledger_server")
def ledger_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for the ledger, resumed and stopped at teardown."""
    server = RedisServer(tmp_path / "ledger-redis", free_port(random.Random()))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="ledger_app")
def ledger_app_fixture(rdb: object, ledger_server: RedisServer) -> Iterator[Celery]:
    """An app on the unit-test broker whose ledger is on the private server."""
    app = make_app(cancellable_ledger_url=ledger_server.url, cancellable_poll_interval=0.2)
    yield app
    app.close()


def test_forks_do_not_wait_while_the_ledger_server_is_stopped(
    ledger_app: Celery, ledger_server: RedisServer
) -> None:
    """With the ledger's server stopped and the poller's ledger thread stuck in its
    calls, a workflow member is cancelled through the poller's delivery path (under
    ``tick_lock``), which learns the workflow's real root id and must record it: the
    delivery returns at once (the record is queued), and ten forks meanwhile each
    take well under a second.  Once the server is back, the queued record is
    written.  (On main the record was written under ``tick_lock``: the delivery,
    and every fork, waited on the stopped server.)"""
    messages = Messages(ledger_app)
    root_id = f"root-{uuid.uuid4()}"
    member_id = f"member-{uuid.uuid4()}"
    try:
        with running_worker(ledger_app, pool_kind="prefork", mailbox_slots=64) as rt:
            messages.held(member_id, root_id=root_id, parent_id=root_id)
            rt.poller = poller = Poller(rt)
            poller.start()
            reason = CancelReason(message="the whole workflow")
            rt.index.add([("root", member_id)], reason)

            ledger_server.pause()
            try:
                time.sleep(0.5)  # the ledger thread is now inside a read

                def deliver() -> None:
                    with rt.tick_lock:  # as the poller's read delivers
                        deliver_targets(rt, [("root", member_id)])

                began = time.monotonic()
                delivering = threading.Thread(target=deliver)
                delivering.start()
                forks = []
                for _ in range(10):
                    at = time.monotonic()
                    reply = fork_and_report(lambda: b"forked")
                    forks.append((reply, time.monotonic() - at))
                delivering.join(30)
                delivered_in = time.monotonic() - began
            finally:
                paused = ledger_server.resume()

            assert paused >= 0.5
            assert [b"forked"] * 10 == [reply for reply, _ in forks]
            slowest = max(seconds for _, seconds in forks)
            assert slowest < 1.0, f"a fork took {slowest:.2f} s"
            assert delivered_in < 1.5, f"the delivery held tick_lock for {delivered_in:.2f} s"
            assert rt.index.has("root", root_id)

            def recorded() -> bool:
                entries, _ = runtime().ledgers.get(ledger_app).read(None)
                return ("root", root_id) in [t for e in entries for t in e.targets]

            deadline = time.monotonic() + 15
            while not recorded():
                assert time.monotonic() < deadline, "the queued root record was never written"
                time.sleep(0.2)
    finally:
        messages.close()
