"""In a real worker, the library's events go through Celery's logging.

Nothing in the worker configures structlog, so the events go to the standard
library logger ``cancellable``, which Celery's worker logging picks up: each
line carries Celery's level and process name, the event name, and the task's
id and name.
"""

from __future__ import annotations

import pytest

from .conftest import Keys, assert_revoked, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_events_appear_in_the_worker_log_at_their_levels(make_worker, keys: Keys):
    """A cancelled prefork task's events are in the worker's log, with task id and name."""
    from cancellable.celery import cancel

    worker = make_worker()
    result = worker.send("cit.loop_raising_hook", keys.key("t"))
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")

    cancel(result, reason="log me", app=worker.app)
    assert_revoked(result, "log me")
    worker.stop()

    lines = worker.log_path.read_text(errors="replace").splitlines()
    tagged = f"task_id='{result.id}'"

    def lines_of(event: str) -> list[str]:
        return [line for line in lines if f"] {event} " in line and tagged in line]

    delivered = lines_of("cancel.delivered")
    assert 1 == len(delivered), worker.tail()
    assert "INFO/MainProcess]" in delivered[0]
    for event in ("cancel.requested", "cancel.observed", "scope.cancelled", "task.cancelled"):
        found = lines_of(event)
        assert 1 == len(found), f"{event}: {found}\n{worker.tail()}"
        assert "INFO/ForkPoolWorker-" in found[0]
        assert "task_name='cit.loop_raising_hook'" in found[0]
    failed = lines_of("cleanup.failed")
    assert 1 == len(failed), worker.tail()
    assert "WARNING/ForkPoolWorker-" in failed[0]
    assert not [line for line in lines if "[info     ]" in line], "structlog's printer was used"
