"""Logging like a library: silent unless the application configures logging.

Each case runs in a fresh interpreter, because structlog's configuration is
process-wide and the rest of the suite configures it (``capture_logs``).
"""

from __future__ import annotations

import json

from tests.helpers import run_python

WORK = """
from celery import Celery
from celery.app.trace import build_tracer
from cancellable import CancelScope, cancellable, checkpoint, current_scope, on_cancel

with CancelScope() as scope:
    scope.cancel("plain scope")
    checkpoint()

app = Celery("logs", broker="memory://", backend="cache+memory://", set_as_current=False)
app.conf.cancellable_ledger_url = "none"

def failing_hook():
    raise RuntimeError("hook failed")

@app.task(shared=False)
@cancellable
def job():
    on_cancel(failing_hook)
    current_scope().cancel("stop the task")
    checkpoint()

build_tracer(job.name, job, eager=False, app=app)("t-1", (), {}, {"id": "t-1"})
"""


def test_unconfigured_prints_nothing():
    """With neither logging nor structlog configured, a cancelled task prints nothing."""
    done = run_python(WORK)

    assert ("", "") == (done.stdout, done.stderr)


def test_stdlib_logging_gets_the_events_at_their_levels():
    """With logging configured, events arrive on the "cancellable" logger, task fields included."""
    done = run_python(
        "import logging\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(levelname)s %(name)s %(message)s')\n"
        "logging.getLogger('celery').setLevel(logging.CRITICAL)\n" + WORK
    )
    lines = [line for line in done.stderr.splitlines() if " cancellable " in line]

    observed = [line for line in lines if "cancel.observed" in line]
    assert 2 == len(observed), lines
    assert "task_id='t-1'" in observed[1]
    assert "task_name=" in observed[1]
    failed = [line for line in lines if "cleanup.failed" in line]
    assert 1 == len(failed), lines
    assert failed[0].startswith("WARNING cancellable cleanup.failed")
    assert "task_id='t-1'" in failed[0]
    cancelled = [line for line in lines if line.startswith("INFO cancellable task.cancelled")]
    assert 1 == len(cancelled), lines


def test_structlog_configured_gets_structured_events():
    """With structlog configured, events are key/values; every task event has id and name."""
    done = run_python(
        "import structlog, sys\n"
        "structlog.configure(processors=[structlog.processors.add_log_level,"
        " structlog.processors.JSONRenderer()],"
        " logger_factory=structlog.PrintLoggerFactory(sys.stdout))\n" + WORK
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    about_task = [e for e in events if e.get("message") == "stop the task" or "hook" in e]

    assert {"cancel.requested", "cancel.observed", "scope.cancelled", "cleanup.failed"} <= {
        e["event"] for e in about_task
    }
    assert ["t-1"] * len(about_task) == [e.get("task_id") for e in about_task]
    assert all(e.get("task_name", "").endswith("job") for e in about_task), about_task
    assert "task.cancelled" in {e["event"] for e in events}
