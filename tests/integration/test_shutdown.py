"""Warm shutdowns with ``cancellable_shutdown_grace``: the task stops, cleans up and runs again.

Real prefork workers, real brokers.  Worker A runs the first run of a task;
worker B, started on the same queue once A holds the task, must run it
again.  A background thread reads the task's stored state every 20 ms, from
before the SIGTERM until the end, so a REVOKED or FAILURE on the way would
be seen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Keys, Worker, state_of, task_meta, wait_for
from .reruns import StateWatch, log_lines
from .test_monitoring import EventLog

GRACE = 3.0


def _shutdown_worker(make_worker: Callable[..., Worker], broker: str, **kw: Any) -> Worker:
    kw.setdefault("concurrency", 1)
    return make_worker(
        broker=broker,
        extra_args=("-E",),
        extra_env={"CIT_SETTINGS": json.dumps({"cancellable_shutdown_grace": GRACE})},
        **kw,
    )


def _pids(worker: Worker) -> set[int]:
    """The processes that run the worker's tasks (its children, or itself)."""
    return worker.children() | {worker.pid}


@pytest.mark.parametrize(
    ("broker", "pool", "task", "how"),
    [
        ("redis", "prefork", "cit.rerun.late", "requeued"),
        ("rabbitmq", "prefork", "cit.rerun.late", "requeued"),
        ("redis", "prefork", "cit.rerun.early", "resent"),
        ("redis", "prefork", "cit.rerun.sleep", "requeued"),
        ("redis", "threads", "cit.rerun.late", "requeued"),
        ("redis", "solo", "cit.rerun.late", "requeued"),
    ],
)
def test_warm_shutdown_sends_the_task_back(
    make_worker: Callable[..., Worker],
    keys: Keys,
    request: pytest.FixtureRequest,
    broker: str,
    pool: str,
    task: str,
    how: str,
) -> None:
    """SIGTERM to A mid-task: A exits within 15 s with the task's cleanup run
    on A, the task runs again on B to SUCCESS, the backend never holds REVOKED
    or FAILURE on the way, no ``task-revoked`` or ``task-failed`` event is sent,
    and the two runs do not overlap.

    Cases: acks_late on Redis and on RabbitMQ (the message is returned
    unacked), a task acked early (a copy is re-sent with the same id), and a
    task stuck in ``time.sleep`` (the ladder's interrupt ends it after the
    grace); and acks_late on a pool thread (threads pool) and on the solo
    pool (its task runs on the consumer's thread, which Celery's SIGTERM
    handler only flags).
    """
    a = _shutdown_worker(make_worker, broker, pool=pool)
    events = EventLog(a.app)
    request.addfinalizer(events.close)
    result = a.send(task, keys.key("t"), headers={"x-cit": "kept"})
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the first run to start on A")
    a_child = keys.started("t")[0]
    assert a_child in _pids(a)
    b = _shutdown_worker(make_worker, broker, pool=pool, queue=a.queue)
    watch = StateWatch(result)
    assert watch.seen[:1] != ["REVOKED"]

    sigterm_at = time.time()
    a.stop(timeout=30)
    assert a.proc is not None
    assert a.proc.returncode == 0, a.tail()
    assert a.stop_seconds is not None
    assert a.stop_seconds < 15.0, f"A took {a.stop_seconds:.1f} s"

    seen = watch.wait(30)
    assert state_of(result) == "SUCCESS", task_meta(result)
    assert "REVOKED" not in seen, seen
    assert "FAILURE" not in seen, seen
    assert result.get(timeout=5).startswith("run 2 on ")
    # A sent its events before it exited, before B's run began.
    events.wait(result.id, "task-succeeded")
    assert [] == events.of(result.id, "task-revoked")
    assert [] == events.of(result.id, "task-failed")

    runs = log_lines(keys, "t")
    first = [r for r in runs if r[1] == 1]
    second = [r for r in runs if r[1] == 2]
    assert [r[0] for r in first] == ["start", "cancelled", "cleanup"], runs
    assert {r[2] for r in first} == {a_child}, "the first run and its cleanup ran on A"
    assert [r[0] for r in second] == ["start", "done"], runs
    assert second[0][2] in _pids(b), "the second run ran on B"
    assert second[0][3] >= first[-1][3], "the second run started before the first one's cleanup"
    assert keys.r.get(f"{keys.key('t')}:runs") == "2"
    assert ["'kept'", "'kept'"] == keys.list("t", "headers"), "the same headers both runs"
    assert keys.flag("t", "reason") == ("shutdown|worker shutdown: the task goes back to the queue")
    log = a.log_path.read_text(errors="replace")
    assert "worker.shutdown" in log
    assert f"task.sent_back task_id='{result.id}'" in log
    assert f"how='{how}'" in log
    stopped_after = first[1][3] - sigterm_at
    if task == "cit.rerun.sleep":
        # No checkpoint: interrupted when the grace was over, not before.
        assert stopped_after >= GRACE - 0.2, runs
    else:
        # At its next checkpoint, long before the grace is over.
        assert stopped_after < GRACE, runs
