"""A worker with a large ledger stops exactly the cancelled tasks (issue 22, point 1).

The worker keeps cancelled task ids in a compact table (128-bit numbers in
sorted flat buffers, `cancellable.celery._idtable`).  These tests fill the
ledger with 200,000 ids before a real prefork worker starts, among them the
ids of queued tasks, and queue next to those tasks whose ids come as close
as an id can to a cancelled one without being it: the same high 64 bits
(the half the table sorts by), or the same text in upper case.  Exactness
both ways: every cancelled task is discarded, every other one runs.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from celery.result import AsyncResult

from .conftest import Keys, assert_revoked, wait_state
from .settings import REDIS_URL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: Ids in the ledger besides the tasks' own.
FILLER = 200_000
REASON = json.dumps({"source": "manual", "message": "large ledger"})


def near(task_id: str) -> str:
    """An id with the same high 64 bits as ``task_id`` and other low 64 bits."""
    low = uuid.uuid4().hex[16:]
    digits = task_id.replace("-", "")[:16] + low
    assert digits != task_id.replace("-", "")
    return str(uuid.UUID(digits))


def fill(stream: str, ids: list[str], chunk: int = 1000) -> None:
    """XADD ``ids`` into the ledger ``stream`` in entries of ``chunk`` (as cancel() writes)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        pipe = client.pipeline(transaction=False)
        for start in range(0, len(ids), chunk):
            targets = "\n".join("task:" + i for i in ids[start : start + chunk])
            pipe.xadd(stream, {"reason": REASON, "targets": targets})
        pipe.execute()
    finally:
        client.close()


def test_cancelled_ids_among_200k_are_discarded_and_near_misses_run(
    make_worker, keys: Keys
) -> None:
    """20 queued tasks are cancelled only through a ledger of 200,020 ids written before
    the worker starts; 20 tasks whose ids share the high half of a cancelled id, 5 whose
    ids are a cancelled id in upper case, and 15 others, all queued beside them, run.
    Then, with the worker running, one cancel() names 5,000 more ids (merged into the
    table as a batch): the 5 tasks among them, sent afterwards, are discarded; their near
    misses run."""
    from cancellable.celery import cancel

    worker = make_worker(start=False, concurrency=2, poll_interval=0.2)
    stream = f"cancellable:{worker.app.main}:ledger"
    cancelled = [str(uuid.uuid4()) for _ in range(20)]
    filler = [str(uuid.uuid4()) for _ in range(FILLER)]
    step = FILLER // len(cancelled)
    ledger_ids = list(filler)
    for i, task_id in enumerate(cancelled):
        ledger_ids.insert(i * step, task_id)
    fill(stream, ledger_ids)
    # Upper case: a different id (Celery compares ids as strings).
    survivors = [near(t) for t in cancelled] + [t.upper() for t in cancelled[:5]]
    survivors += [str(uuid.uuid4()) for _ in range(15)]

    sent: dict[str, AsyncResult] = {}
    for task_id in cancelled + survivors:
        sent[task_id] = worker.send("cit.plain.count", keys.key(task_id), task_id=task_id)
    worker.start()

    for task_id in survivors:
        assert "SUCCESS" == wait_state(sent[task_id], "SUCCESS", 60), task_id
        assert 1 == keys.runs(task_id), task_id
    for task_id in cancelled:
        assert_revoked(sent[task_id], "large ledger")
        assert 0 == keys.runs(task_id), task_id

    # While it runs: one cancel() of 5,000 more ids (a batch merged into the table).
    late = [str(uuid.uuid4()) for _ in range(5)]
    cancel([str(uuid.uuid4()) for _ in range(4995)] + late, reason="late", app=worker.app)
    worker.barrier()  # the revoke was handled
    late_near = [near(t) for t in late]
    late_sent = {
        t: worker.send("cit.plain.count", keys.key(t), task_id=t) for t in late + late_near
    }
    for task_id in late_near:
        assert "SUCCESS" == wait_state(late_sent[task_id], "SUCCESS", 30), task_id
        assert 1 == keys.runs(task_id)
    for task_id in late:
        assert_revoked(late_sent[task_id], "late")
        assert 0 == keys.runs(task_id)
