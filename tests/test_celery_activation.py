"""What the integration installs in a process, and when (`cancellable.celery._activation`).

Each scenario runs in a fresh interpreter, so that what an earlier test
installed cannot hide what this one would: importing patches nothing,
building a worker starts no thread and patches nothing, starting it does
both, stopping it ends the thread.  Real Celery objects throughout (an
in-memory broker; the worker is Celery's own embedded test worker).
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import pytest
from celery import Celery
from celery.utils.collections import AttributeDict
from tests.helpers import run_python

from cancellable.celery import SettingError
from cancellable.celery._activation import _mailbox_slots

PROBE = """
import threading
from celery import Celery
from celery.utils.collections import AttributeDict
from celery.app.control import Control
from celery.worker.control import Panel
from celery.worker.request import Request
import cancellable.celery
from cancellable.celery._runtime import runtime


def patched():
    things = [
        ("Control.revoke", Control.revoke),
        ("Request.revoked", Request.revoked),
        ("Request._announce_revoked", Request._announce_revoked),
        ("revoke command", Panel.data["revoke"]),
    ]
    names = [name for name, thing in things if hasattr(thing, "_cancellable_original")]
    if "cancellable_members" in Panel.data:
        names.append("members command")
    return names


def pollers():
    return len([t for t in threading.enumerate() if t.name == "cancellable-poller"])


def worker_state():
    worker = runtime().worker
    return "none" if worker is None else ("active" if worker.active else "built")


def report(moment):
    print(moment, patched(), pollers(), worker_state())


app = Celery("activation", broker="memory://", backend="cache+memory://")
app.conf.cancellable_ledger_url = "none"
app.conf.broker_connection_retry_on_startup = True
"""


def test_building_a_worker_starts_nothing_and_starting_it_installs_everything() -> None:
    """Imported: nothing patched.  A worker built but never started: its runtime
    exists, but no thread and no patch.  Started: every patch and one poller.
    Stopped: no poller, no worker runtime, and the worker's patches removed
    (``Control.revoke``, the client's, stays)."""
    done = run_python(
        PROBE
        + """
report("imported")
app.WorkController(pool_cls="threads", concurrency=1)
report("built")

from celery.contrib.testing.worker import start_worker

with start_worker(app, pool="threads", perform_ping_check=False, shutdown_timeout=10):
    report("started")
report("stopped")
"""
    )

    every = [
        "Control.revoke",
        "Request.revoked",
        "Request._announce_revoked",
        "revoke command",
        "members command",
    ]
    assert [
        "imported [] 0 none",
        "built [] 0 built",
        f"started {every} 1 active",
        "stopped ['Control.revoke'] 0 none",
    ] == done.stdout.splitlines()


def test_once_the_worker_stopped_the_revoke_command_is_celerys_own() -> None:
    """After the worker stopped, the revoke command is Celery's own again: its
    reply and revoked set, nothing indexed; and a second worker patches again."""
    done = run_python(
        PROBE
        + """
from celery.contrib.testing.worker import start_worker
from celery.utils.collections import AttributeDict
from celery.worker import state as celery_state

with start_worker(app, pool="threads", perform_ping_check=False, shutdown_timeout=10):
    pass
tasks = runtime().tasks
reply = Panel.data["revoke"](AttributeDict(app=app), task_id="t-1")
print(patched(), "flagged as revoked" in reply["ok"], "t-1" in celery_state.revoked)
print(tasks.index.match("t-1"), len(tasks.index))
with start_worker(app, pool="threads", perform_ping_check=False, shutdown_timeout=10):
    report("again")
"""
    )

    assert [
        "['Control.revoke'] True True",
        "None 0",
        "again ['Control.revoke', 'Request.revoked', 'Request._announce_revoked', "
        "'revoke command', 'members command'] 1 active",
    ] == done.stdout.splitlines()


def test_a_second_worker_in_the_process_says_it_replaces_the_first() -> None:
    """A worker started while another runs in the same process takes over the one
    worker runtime, and logs ``worker.replaced`` naming both (never silently)."""
    done = run_python(
        PROBE
        + """
import structlog
from structlog.testing import capture_logs
from celery.contrib.testing.worker import start_worker

other = Celery("activation-2", broker="memory://", backend="cache+memory://")
other.conf.cancellable_ledger_url = "none"
other.conf.broker_connection_retry_on_startup = True
options = dict(pool="threads", perform_ping_check=False, shutdown_timeout=10)
with start_worker(app, **options) as first:
    with capture_logs() as logs:
        with start_worker(other, **options) as second:
            print(runtime().worker.app is other)
    names = (first.hostname, second.hostname)
    events = [e for e in logs if e["event"] == "worker.replaced"]
    print([(e["event"], e["log_level"], (e["replaced"], e["by"]) == names) for e in events])
"""
    )

    assert [
        "True",
        "[('worker.replaced', 'warning', True)]",
    ] == done.stdout.splitlines()


@pytest.mark.parametrize(
    ("setting", "value"),
    [("cancellable_ledger_ttl", "7d"), ("cancellable_grace", -1), ("cancellable_grac", 1)],
)
def test_a_bad_setting_stops_the_worker_while_it_is_built(setting: str, value: object) -> None:
    """Building a worker whose app has a bad (or misspelt) ``cancellable_*``
    setting raises `SettingError` naming it: the worker never exists."""
    app = Celery("activation-bad", broker="memory://", backend="cache+memory://")
    app.conf[setting] = value

    with pytest.raises(SettingError) as caught:
        app.WorkController(pool_cls="threads", concurrency=1)

    assert (setting,) == caught.value.settings
    app.close()


def test_mailbox_slots_follow_prefetch_and_concurrency() -> None:
    """Slots: prefetch plus one per child plus headroom; unlimited prefetch is capped."""
    app = Celery("slots", set_as_current=False)
    sender = AttributeDict(concurrency=2)
    app.conf.worker_prefetch_multiplier = 3
    assert 2 * 3 + 2 + 16 == _mailbox_slots(sender, app)
    app.conf.worker_prefetch_multiplier = 0
    assert 1 << 30 == _mailbox_slots(sender, app)
    app.conf.worker_prefetch_multiplier = -5
    assert 2 * 4 + 2 + 16 == _mailbox_slots(sender, app)
    assert _mailbox_slots(AttributeDict(concurrency=None), app) > 16
