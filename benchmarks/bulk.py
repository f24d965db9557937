"""Bulk cancellation over a real prefork worker: one ``cancel()`` of many queued ids.

The worker is ``celery worker --pool=prefork -c 2`` of ``bench_app``,
the harness's shared worker (`real_workers.py`), started with
``CELERY_WORKER_REVOKES_MAX=100``, so Celery's own in-memory revoked set
holds at most 100 ids and cannot be what stops the tasks: the worker's local
index must.  Each round uses queues of its own.

Per size N (1,000 / 10,000 / 100,000 ids; ``bulk.ids_<N>.*``):

1. N messages of ``bench.bulk_count`` (a task that INCRs a counter when it
   runs, result stored) are put on a queue the worker does not consume yet.
   The first is sent by ``app.send_task`` (which declares the queue); the
   others are the same kombu envelope with a fresh task id and delivery tag,
   LPUSHed in pipelines, which is how kombu's Redis transport enqueues
   (``send_task`` in a loop runs at about 1,300 messages/s here).
2. One ``cancellable.celery.cancel(ids, reason=...)`` call, timed
   (``cancel_ms``, the client's wall time).  A pattern subscriber on the
   pidbox exchange records the revoke broadcast as Redis delivered it:
   ``broadcast_wire_bytes`` is the PUBLISH payload (kombu's envelope, body
   base64-encoded), ``broadcast_body_bytes`` the decoded JSON body.
   ``ledger_entries`` is the growth of the ledger stream (XLEN before and
   after).  Right after ``cancel()`` returns, the client asks the worker's
   main process for its index (a control command of ``bench_app``, answered
   in order after the revoke): ``worker_handled_ms`` is the time until that
   answer, from ``cancel()`` returning; ``index_targets_added`` the growth
   of the index; ``worker_rss_bytes_per_entry`` the growth of the main
   process's RSS divided by N (rough: the allocator may reuse freed memory).
3. ``cancel_ms`` gets more values from further ``cancel()`` calls of N fresh
   ids that name no queued task (the same work for the client, ledger and
   worker); the median is reported.
4. The worker is told to consume the queue (``add_consumer``) behind a
   sentinel task that is not cancelled; once the sentinel has run, every
   message before it has been received and discarded or run.
   ``tasks_run`` (must be 0) is the counter; ``tasks_revoked`` the number of
   the N ids whose stored state is REVOKED (all are read back); ``drain_s``
   the time the worker took to go through the queue.

``index_bytes_per_entry`` is measured in this process, with ``tracemalloc``,
on a `TargetIndex` filled the way the worker fills it from a revoke: N ids
decoded from JSON (fresh strings, as the worker gets them) and added with
one shared reason.  It counts the dict entries and the id strings.

Sustained rate (``bulk.sustained.<kind>.*``; kind ``single``: one id per
``cancel()`` call, ``batch100``: 100 ids per call): a client loop calls
``cancel()`` for ``SECONDS`` (10 s in the full run) on the ids of a pool of
queued tasks (``queued_ids_cancelled``), and once the pool is used up on
fresh ids that name no queued task (``ids_cancelled`` counts both).
``calls_per_s`` and ``ids_per_s`` are over that loop; ``worker_caught_up_s``
is how long after the loop the worker's index held every id; then the queue
is drained as above (queued ids the loop did not reach are cancelled in one
untimed call first): ``tasks_run`` counts runs over the whole pool and
``tasks_revoked`` the REVOKED states of the ids the loop cancelled.

Another process flushing DB 14 in the middle of a round (the suite's own
sessions do so when they end) is noticed by a canary key, and the round is
run again (`TRIES`).  ``bulk.parts.*`` times
the three round trips a ``cancel()`` makes, separately, one id each: the
broker check (``_check_broker``: a PING), the ledger write
(``RedisLedger.record``: one XADD pipeline) and the revoke broadcast
(``app.control.broadcast``: a PUBLISH), in µs per call.

Group cancellation (``bulk.group_<N>.<how>.*``, N = 1,000 / 10,000 /
100,000): N messages of one group (every message carries the same group
id, as ``group(...).apply_async()`` sends them) are queued as above, and
cancelled in one of three ways, in the same run: ``group``,
``cancel(group_result)`` (one ``group`` target); ``ids``,
``cancel(list_of_member_ids)``; ``celery``, Celery's own
``GroupResult.revoke()``.  Measured: ``client_ms`` (the call's wall time),
``broadcasts`` and ``broadcast_wire_bytes`` (revoke messages seen on the
pidbox exchange), ``ledger_entries`` (stream growth), ``index_targets_added``
and ``worker_rss_kb`` (growth of the worker main process's index and RSS),
``worker_handled_ms`` (until the worker answered its next control command),
``tasks_run`` (must be 0) and ``all_revoked_s``: from the call until every
one of the N members is stored REVOKED, the worker consuming the queue from
the moment the call returned.

The index size, its bytes per entry and the first two round trips need
private names of the library, read in `_internals` (the results that need
one are skipped, saying why, when it moves).
"""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
import tracemalloc
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _internals
from _common import log, measured

#: Queued ids per ``cancel()`` call, per mode.
SIZES = {"full": (1000, 10000, 100000), "quick": (200,), "smoke": (100,)}
#: Members of the cancelled groups, per mode.
GROUP_SIZES = {"full": SIZES["full"], "quick": (100,), "smoke": (50,)}
#: ``cancel()`` calls per size for the client-time median (the first on queued ids).
REPEATS = {"full": 5, "quick": 2, "smoke": 2}
#: Fewer repeats of the largest size (each is 100,000 ids through the worker).
LARGE = 100000
LARGE_REPEATS = 3
#: (seconds, pool of queued ids for ``single``, pool for ``batch100``) per mode.
SUSTAINED = {
    "full": (10.0, 20000, 50000),
    "quick": (0.5, 100, 300),
    "smoke": (0.3, 100, 300),
}
#: (kind, ids per call) of the sustained loops.
SUSTAINED_KINDS = (("single", 1), ("batch100", 100))
#: Seconds per part in ``bulk.parts.*``, per mode.
PARTS_SECONDS = {"full": 2.0, "quick": 0.5, "smoke": 0.2}
#: Longest wait for the worker to answer, to index, or to drain a queue.
TIMEOUT = 300.0
#: Celery's revoked set is capped at this size in the benchmark's worker.
REVOKES_MAX = 100
TASK = "bench.bulk_count"

PER_SIZE = (
    ("cancel_ms", "ms"),
    ("broadcast_body_bytes", "bytes"),
    ("broadcast_wire_bytes", "bytes"),
    ("ledger_entries", "entries"),
    ("worker_handled_ms", "ms"),
    ("index_targets_added", "targets"),
    ("index_bytes_per_entry", "bytes"),
    ("worker_rss_bytes_per_entry", "bytes"),
    ("tasks_run", "tasks"),
    ("tasks_revoked", "tasks"),
    ("drain_s", "s"),
)
PER_KIND = (
    ("calls_per_s", "calls/s"),
    ("ids_per_s", "ids/s"),
    ("ids_cancelled", "ids"),
    ("queued_ids_cancelled", "ids"),
    ("worker_caught_up_s", "s"),
    ("tasks_run", "tasks"),
    ("tasks_revoked", "tasks"),
)
PARTS = ("broker_check_us", "ledger_record_us", "broadcast_us", "cancel_us")
#: The three ways of cancelling a group, in the order they run.
GROUP_HOWS = ("group", "ids", "celery")
PER_GROUP = (
    ("client_ms", "ms"),
    ("broadcasts", "messages"),
    ("broadcast_wire_bytes", "bytes"),
    ("ledger_entries", "entries"),
    ("index_targets_added", "targets"),
    ("worker_rss_kb", "kB"),
    ("worker_handled_ms", "ms"),
    ("tasks_run", "tasks"),
    ("tasks_revoked", "tasks"),
    ("all_revoked_s", "s"),
)


def size_names(sizes: Sequence[int]) -> list[str]:
    """The per-size result names for ``sizes``."""
    return [f"bulk.ids_{n}.{suffix}" for n in sizes for suffix, _unit in PER_SIZE]


SUSTAINED_NAMES = tuple(
    f"bulk.sustained.{kind}.{suffix}" for kind, _batch in SUSTAINED_KINDS for suffix, _ in PER_KIND
)
PARTS_NAMES = tuple(f"bulk.parts.{part}" for part in PARTS)


def group_names(sizes: Sequence[int]) -> list[str]:
    """The group-cancellation result names for ``sizes``."""
    return [
        f"bulk.group_{n}.{how}.{suffix}"
        for n in sizes
        for how in GROUP_HOWS
        for suffix, _unit in PER_GROUP
    ]


def names(mode: str) -> tuple[str, ...]:
    """Every ``bulk.*`` result name of a run in ``mode`` (the sizes depend on it)."""
    sizes = (*size_names(SIZES[mode]), *group_names(GROUP_SIZES[mode]))
    return (*sizes, *SUSTAINED_NAMES, *PARTS_NAMES)


#: Tries per round when another process flushes DB 14 in the middle of one.
TRIES = 3


class BulkError(RuntimeError):
    """The worker did not answer, index or drain in time."""


class Flushed(BulkError):
    """Another process flushed the benchmark DB (14) during a round: its queue is gone."""


def set_canary(client: Any, key: str) -> None:
    """Mark a round's start; `check_canary` notices if DB 14 was flushed since."""
    client.set(f"{key}:canary", 1, ex=3600)


def check_canary(client: Any, key: str) -> None:
    """Raise `Flushed` if the round's canary is gone."""
    if not client.exists(f"{key}:canary"):
        raise Flushed("Redis DB 14 was flushed by another process during the round")


def retried(what: str, round_: Any, *args: Any) -> Any:
    """``round_(*args)``, again (up to `TRIES` times) when DB 14 was flushed under it."""
    for attempt in range(1, TRIES + 1):
        try:
            return round_(*args)
        except Flushed:
            if attempt == TRIES:
                raise
            log(f"bulk: {what}: DB 14 was flushed by another process; running it again")
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------
# The worker, the queue and the checks.


def worker_report(worker: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The worker main process's index size, Celery revoked set size and RSS."""
    replies = worker.app.control.broadcast(
        "cancellable_bench_index",
        destination=[worker.nodename],
        reply=True,
        timeout=timeout,
        limit=1,
    )
    for reply in replies or []:
        if worker.nodename in reply:
            report = dict(reply[worker.nodename])
            if "error" in report:
                raise BulkError(report["error"])
            return report
    worker.check_alive()
    raise BulkError(f"worker {worker.nodename} did not answer within {timeout} s")


def ledger_key(app: Any) -> str:
    """The Redis stream the ledger writes (``cancellable:<app main>:ledger``)."""
    return f"cancellable:{app.main or 'default'}:ledger"


def publish(
    app: Any, client: Any, queue: str, key: str, count: int, group_id: str | None = None
) -> list[str]:
    """Put ``count`` ``bench.bulk_count(key)`` messages on ``queue``; return their ids.

    The first goes through ``app.send_task``; the others are copies of its
    kombu envelope (as LPUSHed by kombu's Redis transport) with a fresh task
    id and delivery tag each.  With ``group_id`` every message carries it as
    its group, as a group's members do.
    """
    first = str(uuid.uuid4())
    with app.producer_or_acquire() as producer:
        app.send_task(
            TASK, args=(key,), queue=queue, producer=producer, task_id=first, group_id=group_id
        )
    template = client.lindex(queue, 0)
    envelope = json.loads(template)
    tag = envelope["properties"]["delivery_tag"]
    if envelope["headers"]["id"] != first or template.count(tag.encode()) != 1:
        raise BulkError("unexpected kombu envelope: cannot clone it")
    ids = [first]
    first_b, tag_b = first.encode(), tag.encode()
    pipe = client.pipeline(transaction=False)
    for k in range(1, count):
        task_id = str(uuid.uuid4())
        ids.append(task_id)
        body = template.replace(first_b, task_id.encode()).replace(
            tag_b, uuid.uuid4().bytes.hex().encode()
        )
        pipe.lpush(queue, body)
        if k % 5000 == 0:
            pipe.execute()
    pipe.execute()
    if client.llen(queue) != count:
        raise BulkError(f"{queue} holds {client.llen(queue)} messages, not {count}")
    return ids


def drain(worker: Any, client: Any, queue: str, key: str) -> float:
    """Let the worker consume ``queue`` behind a sentinel; seconds until the sentinel ran."""
    app = worker.app
    check_canary(client, key)
    sentinel = f"{key}:sentinel"
    with app.producer_or_acquire() as producer:
        app.send_task(TASK, args=(sentinel,), queue=queue, producer=producer)
    t0 = time.perf_counter()
    app.control.add_consumer(queue, destination=[worker.nodename], reply=True, timeout=10)
    try:
        deadline = time.monotonic() + TIMEOUT
        while client.get(sentinel) is None:
            worker.check_alive()
            check_canary(client, key)
            if time.monotonic() > deadline:
                raise BulkError(
                    f"{queue} was not drained in {TIMEOUT} s ({client.llen(queue)} left)"
                )
            time.sleep(0.02)
        took = time.perf_counter() - t0
    finally:
        app.control.cancel_consumer(queue, destination=[worker.nodename], reply=True, timeout=10)
    return took


def count_revoked(client: Any, ids: Sequence[str]) -> int:
    """How many of ``ids`` have the stored state REVOKED."""
    revoked = 0
    for start in range(0, len(ids), 10000):
        keys = [f"celery-task-meta-{task_id}" for task_id in ids[start : start + 10000]]
        for raw in client.mget(keys):
            if raw is not None and json.loads(raw).get("status") == "REVOKED":
                revoked += 1
    return revoked


def cleanup(client: Any, queue: str, key: str, ids: Sequence[str]) -> None:
    """Drop a round's queue, counters and stored results."""
    client.delete(queue, key, f"{key}:sentinel", f"{key}:canary")
    for start in range(0, len(ids), 10000):
        client.delete(*[f"celery-task-meta-{t}" for t in ids[start : start + 10000]])


class BroadcastListener:
    """A pattern subscriber on the worker's pidbox exchange, keeping revoke messages."""

    def __init__(self, client: Any, control_exchange: str) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"*{control_exchange}.pidbox*")
        while self._pubsub.get_message(timeout=1.0) is None and not self._pubsub.subscribed:
            pass
        self.raw: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.05)
            if message is not None and message["type"] == "pmessage":
                self.raw.append(message["data"])  # decoded later, off the clock

    def revokes(self, wait: float = 5.0) -> list[tuple[int, int]]:
        """``(wire bytes, body bytes)`` of each revoke broadcast seen so far."""
        deadline = time.monotonic() + wait
        found: list[tuple[int, int]] = []
        while True:
            found = []
            for data in list(self.raw):
                envelope = json.loads(data)
                body = envelope["body"]
                if envelope.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                if json.loads(body).get("method") == "revoke":
                    found.append((len(data), len(body)))
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._pubsub.close()


def index_bytes_per_entry(count: int) -> float:
    """Bytes per target of an index filled like the worker fills it (tracemalloc)."""
    from cancellable import CancelReason

    reason = CancelReason.coerce("bulk benchmark", default_source="revoked")
    payload = json.dumps([str(uuid.uuid4()) for _ in range(count)])
    tracemalloc.start()
    try:
        index = _internals.new_index()
        before = tracemalloc.get_traced_memory()[0]
        ids = json.loads(payload)  # fresh strings, as the worker decodes them
        index.add([("task", task_id) for task_id in ids], reason)
        del ids  # the message is dropped once handled; the index keeps the strings
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    if len(index) != count:
        raise BulkError(f"index holds {len(index)} of {count}")
    return used / count


# --------------------------------------------------------------------------
# The measurements.


def one_size(worker: Any, client: Any, count: int, repeats: int) -> dict[str, list[float]]:
    """Every ``bulk.ids_<count>`` value (see the module docstring)."""
    from cancellable.celery import cancel

    app = worker.app
    token = uuid.uuid4().hex[:10]
    queue = f"{worker.queue}-bulk-{token}"
    key = f"cancellable-bench:bulk:{token}"
    stream = ledger_key(app)
    values: dict[str, list[float]] = {suffix: [] for suffix, _unit in PER_SIZE}
    set_canary(client, key)
    t0 = time.perf_counter()
    ids = publish(app, client, queue, key, count)
    log(f"bulk: {count} messages queued in {time.perf_counter() - t0:.1f} s")
    try:
        listener = BroadcastListener(client, worker.control_exchange)
        try:
            for k in range(repeats):
                targets = ids if k == 0 else [str(uuid.uuid4()) for _ in range(count)]
                before = worker_report(worker)
                xlen = client.xlen(stream)
                listener.raw.clear()
                t0 = time.perf_counter()
                cancel(targets, reason=f"bulk benchmark {k}", app=app)
                t1 = time.perf_counter()
                after = worker_report(worker)
                t2 = time.perf_counter()
                values["cancel_ms"].append((t1 - t0) * 1000)
                values["worker_handled_ms"].append((t2 - t1) * 1000)
                values["ledger_entries"].append(client.xlen(stream) - xlen)
                values["index_targets_added"].append(after["targets"] - before["targets"])
                values["worker_rss_bytes_per_entry"].append(
                    (after["rss_kb"] - before["rss_kb"]) * 1024 / count
                )
                seen = listener.revokes()
                if len(seen) != 1:
                    raise BulkError(f"expected one revoke broadcast, saw {len(seen)}")
                values["broadcast_wire_bytes"].append(seen[0][0])
                values["broadcast_body_bytes"].append(seen[0][1])
                if after["celery_revoked_maxlen"] != REVOKES_MAX:
                    raise BulkError(f"the worker's revoked set is not capped: {after}")
        finally:
            listener.close()
        values["drain_s"].append(drain(worker, client, queue, key))
        values["tasks_run"].append(int(client.get(key) or 0))
        values["tasks_revoked"].append(count_revoked(client, ids))
        check_canary(client, key)
    finally:
        cleanup(client, queue, key, ids)
    values["index_bytes_per_entry"].append(index_bytes_per_entry(count))
    log(
        f"bulk: {count} ids: cancel() {statistics.median(values['cancel_ms']):.1f} ms, "
        f"broadcast {values['broadcast_wire_bytes'][0]:.0f} B on the wire, "
        f"{values['ledger_entries'][0]:.0f} ledger entries, worker answered after "
        f"{statistics.median(values['worker_handled_ms']):.0f} ms, "
        f"{values['tasks_run'][0]:.0f} ran, {values['tasks_revoked'][0]:.0f} REVOKED, "
        f"drained in {values['drain_s'][0]:.1f} s"
    )
    return values


def one_group(worker: Any, client: Any, count: int, how: str) -> dict[str, float]:
    """Every ``bulk.group_<count>.<how>`` value (see the module docstring)."""
    from celery.result import GroupResult

    from cancellable.celery import cancel

    app = worker.app
    token = uuid.uuid4().hex[:10]
    queue = f"{worker.queue}-group-{token}"
    key = f"cancellable-bench:group:{token}"
    group_id = str(uuid.uuid4())
    stream = ledger_key(app)
    set_canary(client, key)
    ids = publish(app, client, queue, key, count, group_id=group_id)
    result = GroupResult(group_id, [app.AsyncResult(task_id) for task_id in ids], app=app)
    values: dict[str, float] = {}
    try:
        listener = BroadcastListener(client, worker.control_exchange)
        try:
            before = worker_report(worker)
            xlen = client.xlen(stream)
            t0 = time.perf_counter()
            if how == "group":
                cancel(result, reason="group benchmark", app=app)
            elif how == "ids":
                cancel(ids, reason="group benchmark", app=app)
            else:
                result.revoke()
            t1 = time.perf_counter()
            after = worker_report(worker)
            t2 = time.perf_counter()
            seen = listener.revokes()
        finally:
            listener.close()
        values["client_ms"] = (t1 - t0) * 1000
        values["worker_handled_ms"] = (t2 - t1) * 1000
        values["broadcasts"] = float(len(seen))
        values["broadcast_wire_bytes"] = float(sum(wire for wire, _body in seen))
        values["ledger_entries"] = float(client.xlen(stream) - xlen)
        values["index_targets_added"] = float(after["targets"] - before["targets"])
        values["worker_rss_kb"] = float(after["rss_kb"] - before["rss_kb"])
        drain(worker, client, queue, key)
        deadline = time.monotonic() + TIMEOUT
        while (revoked := count_revoked(client, ids)) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        values["all_revoked_s"] = time.perf_counter() - t0
        values["tasks_revoked"] = float(revoked)
        values["tasks_run"] = float(int(client.get(key) or 0))
        check_canary(client, key)
    finally:
        cleanup(client, queue, key, ids)
    log(
        f"bulk: group of {count}, {how}: client {values['client_ms']:.1f} ms, "
        f"{values['broadcasts']:.0f} broadcast(s) of {values['broadcast_wire_bytes']:.0f} B, "
        f"{values['ledger_entries']:.0f} ledger entries, "
        f"{values['index_targets_added']:.0f} index targets, "
        f"RSS +{values['worker_rss_kb']:.0f} kB, worker answered after "
        f"{values['worker_handled_ms']:.0f} ms, {values['tasks_run']:.0f} ran, "
        f"{values['tasks_revoked']:.0f} REVOKED after {values['all_revoked_s']:.1f} s"
    )
    return values


def wait_indexed(worker: Any, targets: int) -> float:
    """Seconds until the worker's index holds at least ``targets``."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + TIMEOUT
    while worker_report(worker)["targets"] < targets:
        if time.monotonic() > deadline:
            raise BulkError(f"the worker's index did not reach {targets} targets")
        time.sleep(0.05)
    return time.perf_counter() - t0


def sustained(worker: Any, client: Any, batch: int, seconds: float, pool: int) -> dict[str, float]:
    """One sustained loop of ``cancel()`` calls of ``batch`` queued ids each."""
    from cancellable.celery import cancel

    app = worker.app
    token = uuid.uuid4().hex[:10]
    queue = f"{worker.queue}-sustained-{token}"
    key = f"cancellable-bench:sustained:{token}"
    set_canary(client, key)
    ids = publish(app, client, queue, key, pool)
    try:
        base = worker_report(worker)["targets"]
        calls = done = sent = 0
        t0 = time.perf_counter()
        stop = t0 + seconds
        while time.perf_counter() < stop:
            chunk = ids[done : done + batch]
            done += len(chunk)
            if len(chunk) < batch:  # the pool is used up: go on with ids of no queued task
                chunk += [str(uuid.uuid4()) for _ in range(batch - len(chunk))]
            cancel(chunk[0] if batch == 1 else chunk, reason="sustained benchmark", app=app)
            sent += len(chunk)
            calls += 1
        elapsed = time.perf_counter() - t0
        caught_up = wait_indexed(worker, base + sent)
        if done < pool:
            cancel(ids[done:], reason="rest of the pool", app=app)
        drain(worker, client, queue, key)
        result = {
            "calls_per_s": calls / elapsed,
            "ids_per_s": sent / elapsed,
            "ids_cancelled": float(sent),
            "queued_ids_cancelled": float(done),
            "worker_caught_up_s": caught_up,
            "tasks_run": float(int(client.get(key) or 0)),
            "tasks_revoked": float(count_revoked(client, ids[:done])),
        }
        check_canary(client, key)
    finally:
        cleanup(client, queue, key, ids)
    log(
        f"bulk: sustained, {batch} id(s) per call: {result['calls_per_s']:.0f} calls/s, "
        f"{result['ids_per_s']:.0f} ids/s over {elapsed:.1f} s; worker caught up after "
        f"{caught_up:.2f} s; {result['tasks_run']:.0f} ran, "
        f"{result['tasks_revoked']:.0f} of {done} queued ids REVOKED"
    )
    return result


def parts(worker: Any, seconds: float) -> dict[str, list[float]]:
    """µs per call of each round trip of ``cancel()``, timed apart (one id each)."""
    from cancellable import CancelReason
    from cancellable.celery import cancel

    app = worker.app
    reason = CancelReason.coerce("parts benchmark", default_source="revoked")

    def broadcast(task_id: str) -> None:
        with app.pool.acquire(block=True) as conn:
            arguments = {"task_id": [task_id], "terminate": False, "signal": "SIGTERM"}
            arguments["cancellable"] = reason.to_dict()
            app.control.broadcast("revoke", arguments=arguments, connection=conn)

    def whole(task_id: str) -> None:
        cancel(task_id, reason="parts benchmark", app=app)

    steps = {**_internals.cancel_steps(app, reason), "broadcast_us": broadcast, "cancel_us": whole}
    values: dict[str, list[float]] = {name: [] for name in steps}
    rounds = 5
    for _ in range(rounds):  # interleaved, so a noisy moment hits every part
        for name, step in steps.items():
            calls = 0
            t0 = time.perf_counter()
            stop = t0 + seconds / rounds
            while time.perf_counter() < stop:
                step(str(uuid.uuid4()))
                calls += 1
            values[name].append((time.perf_counter() - t0) / calls * 1e6)
    log("bulk: per call " + ", ".join(f"{n} {statistics.median(v):.0f}" for n, v in values.items()))
    return values


def run(worker: Any, client: Any, mode: str, names: list[str]) -> list[dict[str, Any]]:
    """The selected ``bulk.*`` records, on the harness's worker (its revoked set capped)."""
    records: list[dict[str, Any]] = []

    def add(prefix: str, fields: Sequence[tuple[str, str]], values: dict[str, Any]) -> None:
        for suffix, unit in fields:
            if prefix + suffix in names:
                vals = values[suffix] if isinstance(values[suffix], list) else [values[suffix]]
                records.append(measured(prefix + suffix, vals, unit, runs=len(vals), tails=False))

    for count in SIZES[mode]:
        prefix = f"bulk.ids_{count}."
        if any(n.startswith(prefix) for n in names):
            repeats = LARGE_REPEATS if count >= LARGE else REPEATS[mode]
            add(prefix, PER_SIZE, retried(f"{count} ids", one_size, worker, client, count, repeats))
    for count in GROUP_SIZES[mode]:
        for how in GROUP_HOWS:
            prefix = f"bulk.group_{count}.{how}."
            if any(n.startswith(prefix) for n in names):
                add(
                    prefix,
                    PER_GROUP,
                    retried(f"group {count} {how}", one_group, worker, client, count, how),
                )
    seconds, pool_single, pool_batch = SUSTAINED[mode]
    for kind, batch in SUSTAINED_KINDS:
        prefix = f"bulk.sustained.{kind}."
        if any(n.startswith(prefix) for n in names):
            pool = pool_single if batch == 1 else pool_batch
            add(prefix, PER_KIND, retried(kind, sustained, worker, client, batch, seconds, pool))
    if any(n in PARTS_NAMES for n in names):
        add("bulk.parts.", [(part, "us") for part in PARTS], parts(worker, PARTS_SECONDS[mode]))
    return records


def plot_groups(results_json: Path, png: Path) -> None:
    """Draw the ``bulk.group_*`` results of a results JSON as one PNG (four panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {r["name"]: r for r in json.loads(results_json.read_text())["results"]}
    labels = {
        "group": ("cancel(group_result)", "-", "o"),
        "ids": ("cancel(list_of_ids)", "--", "s"),
        "celery": ("GroupResult.revoke()", ":", "^"),
    }
    panels = (
        ("client_ms", "client time of the call (ms)"),
        ("broadcast_wire_bytes", "broadcast on the wire (bytes)"),
        ("index_targets_added", "entries added to each worker's index"),
        ("all_revoked_s", "until every member is REVOKED (s)"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (suffix, title) in zip(axes.flat, panels, strict=True):
        for how, (label, style, marker) in labels.items():
            sizes, values = [], []
            for n in GROUP_SIZES["full"]:
                record = records.get(f"bulk.group_{n}.{how}.{suffix}")
                if record and not record.get("skipped"):
                    sizes.append(n)
                    values.append(max(record["median"], 0.5))
            if sizes:
                ax.plot(sizes, values, linestyle=style, marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("members in the group")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Cancelling a queued group: one call, prefork worker, Redis", fontsize=11)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
