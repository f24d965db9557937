"""A hung ledger server (issue 18, points 1, 6 and 7) against real prefork workers.

The ledger lives on a ``redis-server`` of each test's own (`tests.soak.harness.RedisServer`
on a free port), which the test ``SIGSTOP`` s and ``SIGCONT`` s: it keeps its
connections and its port and answers nothing, as a paused VM or a partition
after connect would.  The broker and the result backend stay on the tests'
shared database, which is never stopped.  The shared Redis on 6379 is never
paused.

Plain revokes are sent with ``Control.broadcast("revoke", ...)``, what Flower
or another client that does not run this library sends, so only the workers
write the ledger.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.soak.harness import RedisServer, free_port

from .conftest import Keys, Worker, assert_revoked, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(name="ledger_server")
def ledger_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for the ledger, resumed and stopped at teardown."""
    for attempt in range(3):  # another process may take the free port first
        server = RedisServer(tmp_path / f"ledger-redis-{attempt}", free_port(random.Random()))
        try:
            server.start()
            break
        except RuntimeError:
            server.stop()
    else:
        pytest.fail("could not start a private redis-server on a free port")
    try:
        yield server
    finally:
        server.stop()


def ledger_worker(make_worker: Callable[..., Worker], server: RedisServer, **config: Any) -> Worker:
    """A prefork worker (2 children) whose ledger is on ``server``; its test app too."""
    settings = json.dumps({"cancellable_ledger_url": server.url})
    worker = make_worker(pool="prefork", extra_env={"CIT_SETTINGS": settings}, **config)
    worker.app.conf.cancellable_ledger_url = server.url
    return worker


def plain_revoke(worker: Worker, task_ids: list[str]) -> None:
    """A plain revoke broadcast, as a client without this library sends it (no reply)."""
    worker.app.control.broadcast(
        "revoke",
        arguments={"task_id": task_ids, "terminate": False, "signal": "SIGTERM"},
        reply=False,
    )


def ledger_targets(server: RedisServer, app_name: str) -> list[list[str]]:
    """The targets of each entry in ``server``'s ledger stream (one list per entry)."""
    client = server.client(decode_responses=True)
    try:
        rows = client.xrange(f"cancellable:{app_name}:ledger")
    finally:
        client.close()
    return [fields["targets"].split("\n") for _entry_id, fields in rows]


def test_the_consumer_takes_new_tasks_while_the_ledger_is_stopped(
    make_worker: Callable[..., Worker], ledger_server: RedisServer, keys: Keys
) -> None:
    """Three plain revokes reach a worker whose ledger server is stopped: the worker
    still receives and starts a new task within a few seconds (its consumer thread
    only queues the ledger writes), and once the server is back the queued revokes
    are in the ledger.  (On main the consumer wrote each revoke itself and froze
    for each write's timeout, 5 s or more.)"""
    worker = ledger_worker(make_worker, ledger_server)
    revoked = [f"gone-{uuid.uuid4()}" for _ in range(3)]

    ledger_server.pause()
    try:
        for task_id in revoked:
            plain_revoke(worker, [task_id])
        sent = time.monotonic()
        worker.send("cit.plain.sleep", keys.key("new"), 0.1)
        wait_for(lambda: keys.started("new"), 20, interval=0.05, message="the new task to start")
        started_after = time.monotonic() - sent
    finally:
        ledger_server.resume()

    assert started_after < 5.0, f"the new task started {started_after:.1f} s after it was sent"
    wait_for(
        lambda: (
            sorted(t for ts in ledger_targets(ledger_server, worker.app.main) for t in ts)
            == sorted(f"task:{task_id}" for task_id in revoked)
        ),
        15,
        message="the queued revokes to reach the ledger once the server is back",
    )


def test_grace_one_interrupts_in_about_a_second_while_the_ledger_is_stopped(
    make_worker: Callable[..., Worker], ledger_server: RedisServer, keys: Keys
) -> None:
    """``cancel(grace=1)`` of a task that never reaches a checkpoint, then the ledger's
    server stops: the task is interrupted and ends REVOKED about a second later (the
    ladder ticks on a thread that does no network I/O).  (On main the ticks waited
    behind the stalled ledger read: interrupted only after the read's timeout.)"""
    from cancellable.celery import cancel

    worker = ledger_worker(make_worker, ledger_server)
    result = worker.send("cit.no_checkpoint", keys.key("t"), 60.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")

    cancel(result, "stuck", grace=1, app=worker.app)
    returned = time.monotonic()
    ledger_server.pause()
    try:
        wait_for(lambda: result.state == "REVOKED", 30, interval=0.05, message="REVOKED")
        ended_after = time.monotonic() - returned
    finally:
        ledger_server.resume()

    assert ended_after < 4.0, f"interrupted {ended_after:.1f} s after cancel() returned"
    assert_revoked(result, "stuck")
    assert ["cleanup"] == keys.hooks("t")


def test_a_failing_id_does_not_keep_the_others_from_their_revoke(
    make_worker: Callable[..., Worker], ledger_server: RedisServer, keys: Keys
) -> None:
    """One plain revoke names first a running task whose id (a million characters) is
    longer than the whole mailbox, then a running task with a normal id: the normal
    one still stops (REVOKED, hook run), although delivering the first raised (on
    main the mailbox write failed), and the revoke is in the ledger.  (On main the
    error on the first id dropped the delivery of the rest and the ledger record.)"""
    worker = ledger_worker(make_worker, ledger_server)
    long_id = "x" * 1_000_000
    odd = worker.send("cit.loop", keys.key("long"), 8.0, task_id=long_id)
    normal = worker.send("cit.loop", keys.key("normal"), 30.0)
    wait_for(
        lambda: keys.flag("long", "looping") and keys.flag("normal", "looping"),
        20,
        message="both tasks to loop",
    )

    plain_revoke(worker, [long_id, normal.id])

    assert_revoked(normal, "revoked")
    assert ["cleanup"] == keys.hooks("normal")
    wait_for(
        lambda: (
            [[f"task:{long_id}", f"task:{normal.id}"]]
            == ledger_targets(ledger_server, worker.app.main)
        ),
        10,
        message="the revoke in the ledger",
    )
    wait_for(lambda: odd.state in ("SUCCESS", "REVOKED"), 20, message="the long-id task to end")


def test_one_plain_revoke_to_two_workers_is_one_ledger_record(
    make_worker: Callable[..., Worker], ledger_server: RedisServer
) -> None:
    """A plain revoke of 2,500 ids reaches two workers: the ledger holds it once (3
    entries of at most 1,000 ids, 2,500 targets), not once per worker.  (On main each
    worker wrote it: 6 entries, 5,000 targets.)"""
    first = ledger_worker(make_worker, ledger_server)
    second = ledger_worker(make_worker, ledger_server, control_exchange=first.control_exchange)
    ids = [f"bulk-{uuid.uuid4()}" for _ in range(2500)]

    plain_revoke(first, ids)
    first.barrier(timeout=20)
    second.barrier(timeout=20)
    time.sleep(2.0)  # both ledger threads have written, or skipped, by now

    entries = ledger_targets(ledger_server, first.app.main)
    assert [1000, 1000, 500] == [len(targets) for targets in entries]
    assert sorted(f"task:{task_id}" for task_id in ids) == sorted(
        target for targets in entries for target in targets
    )
