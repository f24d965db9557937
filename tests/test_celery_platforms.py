"""Platforms without some of what the Celery integration uses.

Windows has no ``SIGURG`` and no ``SIGKILL``; the tests simulate it by
removing them from the `signal` module in a fresh interpreter before
anything is imported.  Celery supports only the solo and threads pools
there, so those must cancel; a prefork worker must say once, clearly, that
running tasks in its children cannot be reached.  The spawn start method
has the same limit on every platform.
"""

from __future__ import annotations

import pytest
from celery.app.defaults import DEFAULTS
from tests.helpers import run_python

NO_SIGNALS = """
import signal
for name in ("SIGURG", "SIGKILL"):
    if hasattr(signal, name):
        delattr(signal, name)
"""


def test_decorating_and_cancelling_without_sigurg_and_sigkill():
    """Import, decorate and cancel a task (traced as a worker would) with no SIGURG/SIGKILL."""
    done = run_python(
        NO_SIGNALS
        + """
from celery import Celery
from celery.app.trace import build_tracer
from cancellable import cancellable, checkpoint, current_scope
import cancellable.celery as cc

app = Celery("nosig", broker="memory://", backend="cache+memory://")
app.conf.cancellable_ledger_url = "none"
cc.configure(app, poll_interval=1)

@app.task
@cancellable
def job():
    current_scope().cancel("stop")
    checkpoint()

traced = build_tracer(job.name, job, eager=False, app=app)("t1", (), {}, {"id": "t1"})
print(traced.info.state, app.AsyncResult("t1").state, app.AsyncResult("t1").result)
from cancellable.celery._runtime import WorkerRuntime
print("wakeup available:", WorkerRuntime(app).tasks.wakeup.available)
"""
    )
    assert "IGNORED REVOKED manual: stop" in done.stdout
    assert "wakeup available: False" in done.stdout


#: Celery 5.7 added the spawn start method for the prefork pool (``worker_pool_start_method``).
HAS_SPAWN = "worker_pool_start_method" in DEFAULTS


@pytest.mark.parametrize(
    ("prelude", "options", "why"),
    [
        (NO_SIGNALS, "", "no SIGURG"),
        pytest.param(
            "",
            "pool_start_method='spawn',",
            "spawn start method",
            marks=pytest.mark.skipif(not HAS_SPAWN, reason="this Celery's prefork pool only forks"),
        ),
    ],
)
def test_prefork_worker_warns_once_when_children_cannot_be_reached(prelude, options, why):
    """A prefork worker that cannot reach its children says so, once, at start."""
    done = run_python(
        prelude
        + f"""
import warnings
from celery import Celery
import cancellable.celery
from cancellable.celery import PreforkDeliveryWarning

app = Celery("nosig", broker="memory://", backend="cache+memory://")
app.conf.cancellable_ledger_url = "none"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        try:
            app.WorkController(pool_cls="prefork", concurrency=1, {options})
        except Exception as exc:  # Celery's own prefork pool needs SIGKILL & co.
            print("celery could not build the pool:", type(exc).__name__)
        from celery import signals
        signals.worker_shutdown.send(sender=None)
mine = [w for w in caught if issubclass(w.category, PreforkDeliveryWarning)]
print("warnings:", len(mine), mine[0].message if mine else "")
import threading
print("pollers:", [t.name for t in threading.enumerate() if t.name == "cancellable-poller"])
"""
    )
    [line] = [line for line in done.stdout.splitlines() if line.startswith("warnings:")]
    assert line.startswith("warnings: 1 "), done.stdout
    assert why in line
    assert "pollers: []" in done.stdout


@pytest.mark.parametrize("order", ["cancellable first", "celery first"])
def test_importing_celery_activates_the_integration(order):
    """Whichever is imported first, once both are, the integration is active."""
    imports = ["import cancellable", "import celery"]
    if order == "celery first":
        imports.reverse()
    done = run_python(
        "\n".join(imports)
        + """
import sys
from cancellable import _decorator
from cancellable.celery import _task
print("cancellable.celery" in sys.modules, _task.claim in _decorator._claims)
"""
    )
    assert "True True" == done.stdout.strip()
