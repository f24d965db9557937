"""Bad sizes never corrupt the prefork mailbox (issue 18, point 3).

The main process writes each cancellation into a fixed-size slot of memory
shared with its pool children.  The write is bounded in bytes: a reason of
multi-byte text, or a task id of thousands of characters, never spills into
the next slot, so tasks cancelled at the same moment all stop with their own
reasons.  An id longer than the documented bound is refused by `cancel()`.
"""

from __future__ import annotations

import pytest

from .conftest import Keys, assert_revoked, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EMOJI = "\N{GRINNING FACE}"


def test_three_running_tasks_cancelled_together_all_stop(make_worker, keys: Keys):
    """Three tasks run in three prefork children: one cancelled with 500 emoji and an
    emoji requester, one with a 9,000-character id, one plain.  The long id is refused by
    `cancel()` with a clear error (and reaches the worker by a plain revoke instead);
    all three stop at a checkpoint, each with its own reason, emoji intact."""
    from cancellable import CancelReason
    from cancellable.celery import cancel

    worker = make_worker(concurrency=3)
    long_id = "L" * 9000
    emoji = worker.send("cit.loop", keys.key("emoji"), 60.0)
    long = worker.send("cit.loop", keys.key("long"), 60.0, task_id=long_id)
    plain = worker.send("cit.loop", keys.key("plain"), 60.0)
    for name in ("emoji", "long", "plain"):
        wait_for(lambda name=name: keys.flag(name, "looping"), 30, message=f"{name} to loop")
    assert 3 == len({keys.started(n)[0] for n in ("emoji", "long", "plain")})

    message = EMOJI * 500
    requested_by = EMOJI * 256
    with pytest.raises(ValueError, match="longer than"):
        cancel(long_id, reason="too long", app=worker.app)
    cancel(
        emoji,
        reason=CancelReason(source="revoked", message=message, requested_by=requested_by),
        app=worker.app,
    )
    worker.app.control.revoke(long_id)
    cancel(plain, reason="plain one", requested_by="bob", app=worker.app)

    error = assert_revoked(emoji, message, requested_by)
    assert_revoked(long, "revoked")
    assert_revoked(plain, "plain one", "bob")
    assert message in str(error)
    for name in ("emoji", "long", "plain"):
        assert "Cancelled" == keys.flag(name, "exc"), name
        assert ["cleanup"] == keys.hooks(name), name
