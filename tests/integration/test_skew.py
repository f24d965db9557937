"""Version skew: what another version wrote never costs a cancellation its targets
(issue 18, point 9).

During a rolling upgrade a worker meets revoke payloads and ledger entries
written by a newer (or older) client: fields it does not know, a source it
does not know, values of other types, longer texts.  Here a real prefork
worker receives such payloads through its revoke command, and reads such
entries from its ledger: every task, group and root target they name is
still cancelled, with the reason degraded as docs/reliability.md says.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from celery import group

from .conftest import APP_NAME, REDIS_URL, Keys, Worker, assert_revoked, task_meta, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LEDGER = f"cancellable:{APP_NAME}:ledger"


def start_looping(worker: Worker, keys: Keys, name: str, **options: Any) -> Any:
    """Send ``cit.loop`` (60 s) and wait until its body checkpoints."""
    result = worker.send("cit.loop", keys.key(name), 60.0, **options)
    wait_for(
        lambda: keys.flag(name, "looping"),
        30,
        message=lambda: f"{name} to loop ({task_meta(result)['status']})",
    )
    return result


def assert_stopped(keys: Keys, *names: str) -> None:
    """Each task left its loop at a raising checkpoint and ran its hook once."""
    for name in names:
        assert "Cancelled" == keys.flag(name, "exc"), name
        assert ["cleanup"] == keys.hooks(name), name


FUTURE_REASONS = {
    "odd": (
        {
            "source": "from-the-future",
            "message": 42,
            "requested_by": ["not", "a", "str"],
            "requested_at": "soon",
            "severity": "high",
            "v": 2,
        },
        ("revoked",),
    ),
    "long": (
        {"source": "manual", "message": "w" * 6000, "requested_by": "carol", "requested_at": 1},
        ("manual by carol: " + "w" * 100, "[trimmed]"),
    ),
    "not-a-dict": ("only text, from an old client", ("revoked: only text, from an old client",)),
}


@pytest.mark.parametrize("case", sorted(FUTURE_REASONS))
def test_a_revoke_whose_reason_cannot_be_parsed_still_cancels_every_target(
    make_worker, keys: Keys, case: str
):
    """A revoke as a newer client might send it (unknown reason fields, an unknown
    source, values of other types, a message over today's limit, a bare string;
    an unreadable grace; a target with an extra field and one of an unknown kind;
    an extra command argument) reaches a prefork worker running three tasks named by
    task id, group id and root id.  All three stop at a checkpoint and end REVOKED
    with the degraded reason; before, the worker dropped the reason and with it the
    group and root targets, and those two ran on."""
    payload, texts = FUTURE_REASONS[case]
    worker = make_worker(concurrency=3)
    by_id = start_looping(worker, keys, "by-id")
    root_id = f"root-{uuid.uuid4()}"
    by_root = start_looping(worker, keys, "by-root", root_id=root_id)
    member = worker.app.signature(
        "cit.loop", args=(keys.key("member"), 60.0), options={"queue": worker.queue}
    )
    grouped = group([member]).apply_async()
    wait_for(lambda: keys.flag("member", "looping"), 30, message="the group member to loop")

    worker.app.control.broadcast(
        "revoke",
        arguments={
            "task_id": [by_id.id],
            "terminate": False,
            "signal": "SIGTERM",
            "cancellable": payload,
            "cancellable_grace": "later",
            "cancellable_targets": [
                ["group", grouped.id, {"scope": "all"}],
                ["root", root_id],
                ["tag", "nightly"],
            ],
            "cancellable_priority": 9,
        },
    )

    for result in (by_id, by_root, grouped.results[0]):
        assert_revoked(result, *texts)
    assert_stopped(keys, "by-id", "by-root", "member")
    assert worker.alive()


def test_ledger_entries_another_version_wrote_still_cancel(make_worker, keys: Keys):
    """Entries a newer version might write to the Redis ledger: a reason that is not
    JSON, one with an unknown source and a wrong type, extra fields, an unknown
    target kind and an unreadable grace.  A prefork worker reading the ledger (its
    poller, every 0.5 s) cancels the three running tasks they name; before, it
    skipped each such entry whole and the tasks ran on."""
    worker = make_worker(concurrency=3)
    tasks = {name: start_looping(worker, keys, name) for name in ("a", "b", "c")}
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.xadd(LEDGER, {"reason": "{not json", "targets": f"task:{tasks['a'].id}"})
        client.xadd(
            LEDGER,
            {
                "reason": json.dumps({"source": "elsewhere", "message": ["x"], "v": 3}),
                "targets": f"task:{tasks['b'].id}\nlabel:nightly",
                "grace": "soon",
                "schema": "2",
            },
        )
        client.xadd(
            LEDGER,
            {
                "reason": json.dumps({"source": "manual", "message": "from v2", "extra": {}}),
                "targets": f"task:{tasks['c'].id}",
            },
        )
    finally:
        client.close()

    assert_revoked(tasks["a"], "revoked")
    assert_revoked(tasks["b"], "revoked")
    assert_revoked(tasks["c"], "manual: from v2")
    assert_stopped(keys, "a", "b", "c")
