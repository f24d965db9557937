"""Cancelling whole workflows and batches on real prefork workers (issue 9).

Every canvas here runs on ``celery worker -P prefork -c 2`` subprocesses, with
Redis and with RabbitMQ as the broker (results and the ledger in Redis).
Chain links are immutable signatures (``.si``) of ``cit.loop``, a
``@cancellable`` task that checkpoints every 20 ms for as long as it is told
and has one cleanup hook, so a link that runs can be seen starting,
stopping at a checkpoint and cleaning up.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from typing import Any

import pytest
import redis
from celery import chain, chord, group
from celery.exceptions import TaskRevokedError
from kombu import Connection, Consumer, Queue

from .conftest import (
    APP_NAME,
    REDIS_URL,
    Keys,
    Worker,
    assert_revoked,
    state_of,
    task_meta,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BROKER_NAMES = ["redis", "rabbitmq"]
LEDGER = f"cancellable:{APP_NAME}:ledger"


def si(worker: Worker, name: str, *args: Any) -> Any:
    """An immutable signature of task ``name`` on the worker's queue."""
    return worker.app.signature(name, args=args, options={"queue": worker.queue}, immutable=True)


def loop(worker: Worker, keys: Keys, name: str, seconds: float = 30.0) -> Any:
    """``cit.loop`` for ``seconds``, observed under ``name``."""
    return si(worker, "cit.loop", keys.key(name), seconds)


def assert_stopped(keys: Keys, name: str) -> None:
    """The task left its loop at a raising checkpoint and its hook ran once."""
    assert "Cancelled" == keys.flag(name, "exc")
    assert ["cleanup"] == keys.hooks(name)
    assert keys.flag(name, "done") is None


def assert_get_raises(result: Any, text: str, timeout: float = 15.0) -> float:
    """``result.get()`` raises TaskRevokedError naming ``text`` within ``timeout``; the seconds."""
    t0 = time.monotonic()
    with pytest.raises(TaskRevokedError) as caught:
        result.get(timeout=timeout)
    took = time.monotonic() - t0
    assert text in str(caught.value)
    return took


class Broadcasts:
    """Counts the messages published on a worker's control (pidbox) exchange.

    A queue of our own bound to the fanout exchange receives a copy of every
    broadcast, on Redis (pub/sub) and RabbitMQ alike.
    """

    def __init__(self, worker: Worker) -> None:
        self._conn = Connection(worker.app.conf.broker_url)
        # The very exchange Celery broadcasts on (same name and flags).
        exchange = worker.app.control.mailbox.exchange
        assert f"{worker.control_exchange}.pidbox" == exchange.name
        queue = Queue(f"cit-listener-{uuid.uuid4().hex}", exchange, auto_delete=True)
        self.bodies: list[dict[str, Any]] = []
        self._consumer = Consumer(
            self._conn, [queue], callbacks=[self._on_message], accept=["json"]
        )
        self._consumer.consume()
        self._drain(0.3)

    def _on_message(self, body: dict[str, Any], message: Any) -> None:
        self.bodies.append(body)

    def _drain(self, timeout: float) -> None:
        with contextlib.suppress(socket.timeout, TimeoutError):
            self._conn.drain_events(timeout=timeout)

    def revokes(self, settle: float = 1.0) -> list[dict[str, Any]]:
        """The revoke broadcasts received so far (drains for ``settle`` seconds first)."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            self._drain(0.1)
        return [b for b in self.bodies if b.get("method") == "revoke"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._consumer.cancel()
        self._conn.release()


def ledger_entries() -> list[dict[str, str]]:
    """Every entry of this session's ledger stream (fields decoded)."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return [fields for _id, fields in client.xrange(LEDGER)]
    finally:
        client.close()


def states_of(ids: list[str]) -> dict[str, int]:
    """How many of ``ids`` have each stored state (PENDING: nothing stored)."""
    client = redis.Redis.from_url(REDIS_URL)
    counts: dict[str, int] = {}
    try:
        for start in range(0, len(ids), 5000):
            keys = [f"celery-task-meta-{t}" for t in ids[start : start + 5000]]
            for raw in client.mget(keys):
                state = "PENDING" if raw is None else json.loads(raw)["status"]
                counts[state] = counts.get(state, 0) + 1
    finally:
        client.close()
    return counts


# --------------------------------------------------------------------------
# Done-when 1: each canvas type.


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_chain_cancelled_while_its_first_link_runs(make_worker, keys: Keys, broker):
    """A chain of three long links, cancelled with workflow=True while the first runs.

    The first stops at a checkpoint and cleans up, the later links never
    run, all three end REVOKED with the reason, and the held result (the
    last link) raises TaskRevokedError carrying it.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker)
    result = chain(loop(worker, keys, "a"), loop(worker, keys, "b"), loop(worker, keys, "c"))()
    links = [result.parent.parent, result.parent, result]
    wait_for(lambda: keys.flag("a", "looping"), 20, message="the first link to loop")

    cancel(result, reason="user closed the report", workflow=True)

    for link in links:
        assert_revoked(link, "user closed the report")
    assert_stopped(keys, "a")
    assert_get_raises(result, "user closed the report")
    time.sleep(1.0)  # nothing is sent later either
    assert [] == keys.started("b") + keys.started("c")
    assert 1 == keys.runs("a")


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_chord_cancelled_while_its_header_runs(make_worker, keys: Keys, broker):
    """A chord of four header tasks plus a body, cancelled while the header runs.

    Two header members run (``-c 2``), two wait.  The body never runs, every
    task ends REVOKED with the reason, and ``get()`` of the chord returns
    promptly with TaskRevokedError instead of hanging.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker)
    header = [loop(worker, keys, f"h{i}") for i in range(4)]
    result = chord(header, loop(worker, keys, "body", 1.0)).apply_async()
    members = list(result.parent.results)
    wait_for(lambda: len([i for i in range(4) if keys.flag(f"h{i}", "looping")]) == 2, 20,
             message="two header members to loop")  # fmt: skip
    running = [i for i in range(4) if keys.flag(f"h{i}", "looping")]

    cancel(result, reason="chord no longer needed", workflow=True)

    took = assert_get_raises(result, "chord no longer needed")
    assert took < 15.0
    for member in members:
        assert_revoked(member, "chord no longer needed")
    assert_revoked(result, "chord no longer needed")
    for i in running:
        assert_stopped(keys, f"h{i}")
    time.sleep(2.0)  # the chord must not fire its body later either
    assert [] == keys.started("body")
    assert "REVOKED" == state_of(result)
    assert 2 == sum(keys.runs(f"h{i}") for i in range(4)), "a waiting header member ran"


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_group_nested_in_a_chain_cancelled_while_the_group_runs(make_worker, keys: Keys, broker):
    """chain(a, group(b1, b2), c): cancelled while the group runs, after ``a`` succeeded.

    ``a`` stays SUCCESS; b1 and b2 stop at a checkpoint; c (the chord body
    Celery makes of the link after a group) never runs; all three REVOKED
    with the reason; ``get()`` of the chain raises.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker)
    flow = chain(
        loop(worker, keys, "a", 0.1),
        group(loop(worker, keys, "b1"), loop(worker, keys, "b2")),
        loop(worker, keys, "c", 0.1),
    )
    result = flow.apply_async()
    first = result.parent.parent
    wait_for(lambda: keys.flag("b1", "looping") and keys.flag("b2", "looping"), 20,
             message="both group members to loop")  # fmt: skip

    cancel(result, reason="nested stop", workflow=True)

    for member in result.parent.results:
        assert_revoked(member, "nested stop")
    for name in ("b1", "b2"):
        assert_stopped(keys, name)
    assert_revoked(result, "nested stop")
    assert_get_raises(result, "nested stop")
    assert "SUCCESS" == state_of(first)
    time.sleep(1.0)
    assert [] == keys.started("c")


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_cancel_by_a_later_members_id_with_workflow_true(make_worker, keys: Keys, broker):
    """cancel(<id of the chain's second link>, workflow=True), a bare id, while link 1 runs.

    Nothing on the client knows the chain: the worker finds the running
    first link because the id is among the tasks it would send later; the
    first link stops, and the worker marks the two unsent links REVOKED.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker)
    result = chain(loop(worker, keys, "a"), loop(worker, keys, "b"), loop(worker, keys, "c"))()
    second_id = result.parent.id
    wait_for(lambda: keys.flag("a", "looping"), 20, message="the first link to loop")

    cancel(second_id, reason="by member id", workflow=True, app=worker.app)

    for link in (result.parent.parent, result.parent, result):
        assert_revoked(link, "by member id")
    assert_stopped(keys, "a")
    assert_get_raises(worker.app.AsyncResult(result.id), "by member id")
    time.sleep(1.0)
    assert [] == keys.started("b") + keys.started("c")


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_workflow_cancelled_while_no_worker_is_online(make_worker, keys: Keys, broker):
    """A chain and a chord cancelled while no worker runs; a worker started later runs nothing.

    The broadcast reaches nobody; the worker reads the root and group
    targets from the ledger when it starts, discards the queued tasks, and
    marks what they would have sent REVOKED.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker, start=False)
    flow = chain(loop(worker, keys, "a"), loop(worker, keys, "b"), loop(worker, keys, "c"))
    chained = flow.apply_async()
    chorded = chord([loop(worker, keys, f"h{i}") for i in range(3)], loop(worker, keys, "body"))()
    control = si(worker, "cit.loop", keys.key("control"), 0.05).apply_async()

    cancel([chained, chorded], reason="cancelled while offline", workflow=True)
    worker.start()

    assert "done" == control.get(timeout=60)
    for link in (chained.parent.parent, chained.parent, chained):
        assert_revoked(link, "cancelled while offline")
    for member in chorded.parent.results:
        assert_revoked(member, "cancelled while offline")
    assert_revoked(chorded, "cancelled while offline")
    assert_get_raises(chained, "cancelled while offline")
    assert_get_raises(chorded, "cancelled while offline")
    names = ["a", "b", "c", "body", *(f"h{i}" for i in range(3))]
    assert [] == [name for name in names if keys.started(name)]


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_plain_tasks_in_a_cancelled_workflow(make_worker, keys: Keys, broker):
    """chain(plain sleep, plain sleep, loop): cancelled while the plain first link runs.

    A plain task cannot be stopped: it finishes (SUCCESS), the way Celery
    revokes a running task.  The link it sends is discarded on arrival (it
    carries the workflow's root id), so the rest never runs and ends REVOKED
    with the reason, and ``get()`` of the chain raises.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker)
    result = chain(
        si(worker, "cit.plain.sleep", keys.key("p1"), 1.5),
        si(worker, "cit.plain.sleep", keys.key("p2"), 0.1),
        loop(worker, keys, "c"),
    )()
    first = result.parent.parent
    wait_for(lambda: keys.started("p1"), 20, message="the plain first link to start")

    cancel(result, reason="plain workflow stop", workflow=True)

    assert "SUCCESS" == wait_state(first, ("SUCCESS", "FAILURE", "REVOKED"), 20)
    assert_revoked(result.parent, "plain workflow stop")
    assert_revoked(result, "plain workflow stop")
    assert_get_raises(result, "plain workflow stop")
    time.sleep(1.5)  # p1's success has sent p2 by now; it was discarded
    assert "REVOKED" == state_of(result.parent)
    assert [] == keys.started("p2") + keys.started("c")


# --------------------------------------------------------------------------
# Done-when 2: a batch of 10,000 is one target.

BATCH = 10_000


@pytest.mark.timeout(600)
@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_group_of_ten_thousand_cancelled_in_one_call(make_worker, keys: Keys, broker):
    """A group of 10,000 no-op tasks, cancelled in one call before a worker drains it.

    The call returns in under 1 s, writes one ledger entry naming one
    ``group`` target, and sends one revoke broadcast (counted on the control
    exchange).  The worker then starts: none of the 10,000 runs, and every
    one ends REVOKED with the reason.
    """
    from cancellable.celery import cancel

    worker = make_worker(broker=broker, start=False)
    batch = group(si(worker, "cit.plain.count", keys.key("n")) for _ in range(BATCH))
    result = batch.apply_async()
    ids = [member.id for member in result.results]
    assert BATCH == len(set(ids))
    listener = Broadcasts(worker)
    try:
        entries_before = len(ledger_entries())
        t0 = time.perf_counter()
        cancel(result, reason="batch withdrawn")
        took = time.perf_counter() - t0
        revokes = listener.revokes()
    finally:
        listener.close()
    new_entries = ledger_entries()[entries_before:]

    assert took < 1.0, f"cancel() of a group of {BATCH} took {took:.3f} s"
    assert 1 == len(revokes), revokes
    assert [] == revokes[0]["arguments"]["task_id"]
    assert [["group", result.id]] == revokes[0]["arguments"]["cancellable_targets"]
    assert 1 == len(new_entries)
    assert f"group:{result.id}" == new_entries[0]["targets"]

    worker.start()
    wait_for(lambda: states_of(ids).get("REVOKED", 0) == BATCH, 300, interval=1.0,
             message=lambda: f"all {BATCH} members REVOKED ({states_of(ids)})")  # fmt: skip
    assert 0 == keys.runs("n")
    assert "batch withdrawn" in str(task_meta(result.results[-1])["result"])


# --------------------------------------------------------------------------
# Done-when 4: fail fast.


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_fail_fast_member_cancels_its_siblings(make_worker, keys: Keys, broker):
    """One member with ``cancel_siblings_on_failure`` fails: the rest of its group is cancelled.

    ``-c 2``: the failing member and one sibling run; four siblings wait.
    The running sibling stops at its next checkpoint and cleans up, the
    waiting ones never run, all five end REVOKED naming the failed member,
    which stays FAILURE.  The worker records one ``group`` target.
    """
    worker = make_worker(broker=broker)
    entries_before = len(ledger_entries())
    members = [si(worker, "cit.fail_fast", keys.key("f"), 1.0)]
    members += [loop(worker, keys, f"s{i}") for i in range(5)]
    result = group(members).apply_async()
    failing, *siblings = result.results

    assert "FAILURE" == wait_state(failing, ("SUCCESS", "FAILURE", "REVOKED"), 30)
    for sibling in siblings:
        assert_revoked(sibling, f"group member {failing.id} failed", "RuntimeError")
    started = [i for i in range(5) if keys.started(f"s{i}")]
    assert 1 == len(started), f"siblings that started: {started}"
    assert_stopped(keys, f"s{started[0]}")
    new_entries = ledger_entries()[entries_before:]
    assert [f"group:{result.id}"] == [e["targets"] for e in new_entries]


def test_without_the_option_a_failure_leaves_its_siblings_alone(make_worker, keys: Keys):
    """A member without the option fails: its siblings run to the end (Celery's default)."""
    worker = make_worker()
    members = [si(worker, "cit.plain.sleep", keys.key("x"), 0.0)]
    members += [loop(worker, keys, f"s{i}", 0.5) for i in range(3)]
    failing = si(worker, "cit.loop", keys.key("bad"), "not a number")
    result = group([failing, *members]).apply_async()

    assert "FAILURE" == wait_state(result.results[0], ("SUCCESS", "FAILURE", "REVOKED"), 30)
    for sibling in result.results[1:]:
        assert "SUCCESS" == wait_state(sibling, ("SUCCESS", "FAILURE", "REVOKED"), 30)


# --------------------------------------------------------------------------
# Durable: acks_late redeliveries of a cancelled group's members never run.


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_acks_late_members_of_a_cancelled_group_never_rerun(make_worker, keys: Keys, broker):
    """A group of two ``acks_late`` members cancelled in a checkpoint-free section, kill -9.

    Neither can stop, so both messages stay unacknowledged; the broker
    redelivers them to a new worker, which finds the group target in the
    ledger and discards both: each ran once, and both end REVOKED.
    """
    from cancellable.celery import cancel

    from .test_crash import (
        REDELIVERY_WAIT,
        VISIBILITY_TIMEOUT,
        awaiting_redelivery,
        redelivered_and_settled,
    )

    first = make_worker(broker=broker, visibility_timeout=VISIBILITY_TIMEOUT)
    members = [si(first, "cit.blind_then_loop", keys.key(f"m{i}"), 30.0, 20.0) for i in range(2)]
    result = group(members).apply_async()
    wait_for(lambda: keys.flag("m0", "blind") and keys.flag("m1", "blind"), 20,
             message="both members to enter their blind section")  # fmt: skip

    cancel(result, reason="group stop before the crash")
    first.barrier()
    first.kill9()
    for member in result.results:
        wait_for(lambda m=member: awaiting_redelivery(first, m.id) or first.queue_length() == 2,
                 15, message="the broker to hold the messages for redelivery")  # fmt: skip

    second = make_worker(
        broker=broker,
        queue=first.queue,
        control_exchange=first.control_exchange,
        visibility_timeout=VISIBILITY_TIMEOUT,
    )
    for member in result.results:
        assert_revoked(member, "group stop before the crash", timeout=REDELIVERY_WAIT + 5)
    wait_for(
        lambda: all(redelivered_and_settled(second, m.id) for m in result.results),
        REDELIVERY_WAIT,
        interval=0.2,
        message="the redeliveries to settle",
    )
    assert [1, 1] == [keys.runs("m0"), keys.runs("m1")], "a cancelled member ran again"


# --------------------------------------------------------------------------
# The command line.


@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_cli_cancels_a_workflow_by_id_and_reports(make_worker, keys: Keys, broker):
    """``celery cancel --workflow <last link id>`` while the second link runs.

    It reports the running member (stopped) and the finished first link; the
    rest of the chain ends REVOKED with the reason.  An id nothing knows is
    reported unknown and makes the exit status 1.
    """
    import subprocess
    import sys

    from .conftest import REPO_ROOT, worker_env

    worker = make_worker(broker=broker)
    flow = chain(loop(worker, keys, "a", 0.1), loop(worker, keys, "b"), loop(worker, keys, "c"))
    result = flow()
    wait_for(lambda: keys.flag("b", "looping"), 20, message="the second link to loop")
    env = worker_env(
        broker_url=worker.app.conf.broker_url,
        queue=worker.queue,
        control_exchange=worker.control_exchange,
    )
    unknown = str(uuid.uuid4())

    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.app", "cancel", "--workflow",
         result.id, unknown, "--reason", "from the shell", "--by", "ops"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip

    assert 1 == done.returncode, done.stdout + done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    expected = "workflow cancelled: 1 running (1 stopped), 0 queued (will not run), 1 finished"
    assert expected == lines[result.id]
    assert lines[unknown].startswith("workflow unknown")
    assert "SUCCESS" == state_of(result.parent.parent)
    for link in (result.parent, result):
        assert_revoked(link, "revoked by ops: from the shell")
    assert_stopped(keys, "b")
    assert [] == keys.started("c")
