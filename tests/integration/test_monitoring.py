"""What monitoring tools see of a cancelled task, on a real prefork worker with ``-E``.

Issue 20, "Done when" 1 and 3.  One worker (prefork, two children, task
events on, the OpenTelemetry SDK with an in-memory exporter and the Celery
instrumentation in each child), one Celery event receiver and one Flower
2.2 (its HTTP API, ``FLOWER_UNAUTHENTICATED_API=true``) serve the whole
module.  For each way a task can end cancelled (at a checkpoint after
``cancel()`` or a plain ``revoke()``, interrupted after its grace,
terminated, discarded before it started, a workflow member stored
REVOKED), the receiver gets Celery's own ``task-revoked`` event with
Celery's fields and the reason in ``exception``, and Flower's
``/api/task/info/<id>`` (and its task page) shows REVOKED with the reason; a plain task revoked
while queued still shows as Celery shows it (no ``exception``).  The worker
log says "Task name[id] revoked: ..." once, never "ignored"; a cancellation
that no checkpoint saw is logged as a warning.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chain

from cancellable.celery import cancel

from .conftest import (
    REPO_ROOT,
    Keys,
    Worker,
    assert_revoked,
    spawn_worker,
    task_meta,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: How long an event or Flower's view of it may take to arrive (seconds).
SEEN_WITHIN = 15.0


class EventLog:
    """Celery's event receiver (``app.events.Receiver``), capturing every event in a thread."""

    def __init__(self, app: Celery) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self.connection, handlers={"*": self._on_event})
        self.thread = threading.Thread(target=self._run, name="cit-events", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, task_id: str, event_type: str = "task-revoked") -> list[dict[str, Any]]:
        """The events of ``event_type`` received for ``task_id`` so far."""
        with self.lock:
            return [e for e in self.events if e.get("uuid") == task_id and e["type"] == event_type]

    def wait(self, task_id: str, event_type: str = "task-revoked") -> dict[str, Any]:
        """The first ``event_type`` event for ``task_id`` (waits for it)."""
        found = wait_for(
            lambda: self.of(task_id, event_type),
            SEEN_WITHIN,
            message=f"a {event_type} event for {task_id}",
        )
        return found[0]

    def close(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(5)
        self.connection.close()


class Flower:
    """A Flower process on a free port, for the worker's app."""

    def __init__(self, worker: Worker, log_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**worker.env, "FLOWER_UNAUTHENTICATED_API": "true"}
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.integration.app",
                "flower",
                f"--port={self.port}",
                "--address=127.0.0.1",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> Any:
        """``GET path`` on Flower's HTTP API, decoded; None on 404 or no answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def page(self, path: str) -> str:
        """The HTML of one of Flower's pages."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return str(r.read().decode())

    def task(self, task_id: str) -> dict[str, Any] | None:
        """Flower's ``/api/task/info/<id>``."""
        info = self.get(f"/api/task/info/{task_id}")
        return info if isinstance(info, dict) else None

    def wait_state(self, task_id: str, state: str) -> dict[str, Any]:
        """Flower's view of the task once it shows ``state``."""
        last: list[Any] = []

        def shows() -> dict[str, Any] | None:
            info = self.task(task_id)
            last[:] = [info]
            return info if info is not None and info.get("state") == state else None

        return wait_for(
            shows, SEEN_WITHIN, message=lambda: f"Flower to show {task_id} {state} (saw {last})"
        )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(name="monitored", scope="module")
def monitored_fixture(worker_logs: Path) -> Iterator[Worker]:
    """The module's prefork worker: task events on (``-E``), OpenTelemetry in its children."""
    worker = spawn_worker(worker_logs, extra_args=("-E",), extra_env={"CIT_OTEL": "1"})
    worker.start()
    yield worker
    worker.stop()
    worker.app.close()


@pytest.fixture(name="events", scope="module")
def events_fixture(monitored: Worker) -> Iterator[EventLog]:
    """Celery's event receiver, already receiving the worker's events."""
    log = EventLog(monitored.app)
    # The receiver's queue is bound once it consumes: wait until a task's
    # events come through.
    probe = ""

    def seen() -> bool:
        nonlocal probe
        if not probe or not log.of(probe, "task-succeeded"):
            probe = monitored.send("cit.plain.add", 1, 1).id
            time.sleep(0.5)
        return bool(log.of(probe, "task-succeeded"))

    wait_for(seen, 30, interval=0.1, message="the event receiver to get the worker's events")
    yield log
    log.close()


@pytest.fixture(name="flower", scope="module")
def flower_fixture(monitored: Worker, worker_logs: Path) -> Iterator[Flower]:
    """Flower 2.2 on a free port, already showing the worker's tasks."""
    flower = Flower(monitored, worker_logs / "flower.log")
    try:
        probe = ""

        def seen() -> bool:
            nonlocal probe
            assert flower.proc.poll() is None, f"Flower exited\n{flower.tail()}"
            if not probe or flower.task(probe) is None:
                probe = monitored.send("cit.plain.add", 2, 2).id
                time.sleep(0.5)
            info = flower.task(probe)
            return info is not None and info.get("state") == "SUCCESS"

        wait_for(seen, 40, interval=0.2, message="Flower to show the worker's tasks")
        yield flower
    finally:
        flower.stop()


@pytest.fixture(autouse=True)
def _idle_after(request: pytest.FixtureRequest, monitored: Worker) -> Iterator[None]:
    """Each test starts with the worker healthy and ends with it idle."""
    request.node.__dict__.setdefault("cit_workers", []).append(monitored)
    wait_for(
        lambda: len(monitored.children()) == monitored.concurrency,
        20,
        message="the pool at full strength",
    )
    yield
    wait_for(monitored.idle, 30, interval=0.2, message=f"{monitored.name} to be idle")


def start(worker: Worker, keys: Keys, task: str, name: str, *args: object) -> Any:
    """Send ``task`` and wait until its body runs (its ``looping`` flag)."""
    result = worker.send(task, keys.key(name), *args)
    wait_for(
        lambda: keys.flag(name, "looping"),
        20,
        message=lambda: f"{task} to start ({task_meta(result)['status']})",
    )
    return result


def log_lines(worker: Worker, task_id: str) -> list[str]:
    """The worker log's lines that name ``task_id``."""
    return [
        line for line in worker.log_path.read_text(errors="replace").splitlines() if task_id in line
    ]


def assert_announced(
    worker: Worker,
    events: EventLog,
    flower: Flower,
    task_id: str,
    *texts: str,
    terminated: bool = False,
    signum: int | None = None,
) -> dict[str, Any]:
    """One ``task-revoked`` with Celery's fields and the reason; Flower shows REVOKED with it."""
    event = events.wait(task_id)
    assert terminated is event["terminated"]
    assert signum == event["signum"]
    assert event["expired"] is False
    assert event["exception"].startswith("TaskRevokedError("), event
    for text in texts:
        assert text in event["exception"], event
    assert event["hostname"] == worker.name
    info = flower.wait_state(task_id, "REVOKED")
    for text in texts:
        assert text in (info.get("exception") or ""), info
    assert info["revoked"] is not None
    time.sleep(0.3)
    assert 1 == len(events.of(task_id)), events.of(task_id)
    return info


def assert_log_says_revoked(worker: Worker, task: str, task_id: str, text: str) -> None:
    """One INFO line "Task <task>[<id>] revoked: ...<text>...", and no "ignored" line."""
    wanted = f"Task {task}[{task_id}] revoked: "

    def found() -> list[str]:
        return [line for line in log_lines(worker, task_id) if wanted in line]

    lines = wait_for(found, 10, message=f"{wanted!r} in the worker log")
    assert 1 == len(lines), lines
    assert "INFO/" in lines[0], lines[0]
    assert text in lines[0], lines[0]
    assert not [line for line in log_lines(worker, task_id) if "ignored" in line]


def otel_spans(obs: redis.Redis, task_id: str) -> list[dict[str, Any]]:
    """The spans the worker's child finished while running ``task_id`` (SDK JSON)."""
    return [json.loads(raw) for raw in obs.lrange(f"cit:otel:{task_id}", 0, -1)]


def assert_span_cancelled(obs: redis.Redis, task_id: str, task: str, *texts: str) -> None:
    """The Celery instrumentation's run span: ERROR, ``celery.revoked.reason``, an event."""
    spans = wait_for(
        lambda: [s for s in otel_spans(obs, task_id) if s["name"] == f"run/{task}"],
        10,
        message=f"the run span of {task_id}",
    )
    span = spans[0]
    assert "ERROR" == span["status"]["status_code"], span["status"]
    reason = span["attributes"]["celery.revoked.reason"]
    for text in texts:
        assert text in reason
        assert text in span["status"]["description"]
    cancelled = [e for e in span["events"] if e["name"] == "task.cancelled"]
    assert 1 == len(cancelled), span["events"]


class TestEveryCancelledEnding:
    """Done-when 1: each way a task ends cancelled is announced as ``task-revoked``."""

    def test_stopped_at_a_checkpoint(self, monitored, events, flower, keys: Keys, obs):
        """``cancel(reason=, requested_by=)`` of a running task: event, Flower, log line, span.

        Flower showed it STARTED before (a task-started event), and REVOKED
        after, with "revoked by alice: user pressed stop" as its exception.
        """
        result = start(monitored, keys, "cit.loop", "t")
        assert "STARTED" == flower.wait_state(result.id, "STARTED")["state"]

        cancel(result, "user pressed stop", requested_by="alice", app=monitored.app)
        assert_revoked(result, "user pressed stop")

        info = assert_announced(
            monitored, events, flower, result.id, "revoked by alice: user pressed stop"
        )
        assert "cit.loop" == info["name"]
        page = flower.page(f"/task/{result.id}")
        assert "REVOKED" in page
        assert "revoked by alice: user pressed stop" in page
        assert_log_says_revoked(
            monitored, "cit.loop", result.id, "revoked by alice: user pressed stop"
        )
        assert_span_cancelled(obs, result.id, "cit.loop", "user pressed stop")

    def test_plain_revoke_of_a_running_task(self, monitored, events, flower, keys: Keys):
        """``AsyncResult.revoke()`` of a running ``@cancellable`` task: REVOKED "revoked"."""
        result = start(monitored, keys, "cit.loop", "t")
        result.revoke()
        assert_revoked(result, "revoked")

        assert_announced(monitored, events, flower, result.id, "revoked")
        assert_log_says_revoked(monitored, "cit.loop", result.id, "revoked")

    def test_interrupted_after_its_grace(self, monitored, events, flower, keys: Keys, obs):
        """A blocking sleep, ``grace=0.5``: interrupted; the event says so, and so does the span."""
        result = start(monitored, keys, "cit.ladder.sleep", "s")
        cancel(result, "too slow", grace=0.5, app=monitored.app)
        assert_revoked(result, "too slow", "interrupted after")

        assert_announced(monitored, events, flower, result.id, "too slow", "interrupted after")
        assert_log_says_revoked(monitored, "cit.ladder.sleep", result.id, "interrupted after")
        assert_span_cancelled(obs, result.id, "cit.ladder.sleep", "too slow")

    def test_terminated(self, monitored, events, flower, keys: Keys):
        """A call that holds the GIL: killed after grace 0 + kill_after 1 s.

        Celery's own event for a terminate (``terminated=True``, the signal
        number) carries the reason and "terminated after".
        """
        result = start(monitored, keys, "cit.ladder.gil", "g")
        cancel(result, "runaway", grace=0, app=monitored.app)
        assert_revoked(result, "runaway", "terminated after")

        assert_announced(
            monitored,
            events,
            flower,
            result.id,
            "runaway",
            "terminated after",
            terminated=True,
            signum=9,
        )
        assert_log_says_revoked(monitored, "cit.ladder.gil", result.id, "terminated after")

    def test_discarded_before_it_started(self, monitored, events, flower, keys: Keys):
        """A task held for its countdown, cancelled: discarded at once, with the reason."""
        result = monitored.send("cit.loop", keys.key("q"), countdown=60)
        flower.wait_state(result.id, "RECEIVED")

        cancel(result, "not needed any more", app=monitored.app)
        assert_revoked(result, "not needed any more", timeout=10)

        assert_announced(monitored, events, flower, result.id, "not needed any more")
        assert_log_says_revoked(monitored, "cit.loop", result.id, "not needed any more")
        assert [] == keys.started("q")

    def test_workflow_members_stored_revoked(self, monitored, events, flower, keys: Keys):
        """``cancel(chain, workflow=True)``: the running link and the two never sent are announced.

        The unsent links were never received by any worker: their event
        carries their task name, so Flower shows it.
        """
        workflow = chain(
            monitored.signature("cit.loop", keys.key("w")),
            monitored.signature("cit.plain.add", 1, 2).set(immutable=True),
            monitored.signature("cit.plain.add", 3, 4).set(immutable=True),
        ).apply_async()
        first = workflow.parent.parent
        wait_for(lambda: keys.flag("w", "looping"), 20, message="the first link to run")

        cancel(workflow, "drop the pipeline", workflow=True, app=monitored.app)
        for member in (first, workflow.parent, workflow):
            assert_revoked(member, "drop the pipeline")

        assert_announced(monitored, events, flower, first.id, "drop the pipeline")
        for later in (workflow.parent, workflow):
            info = assert_announced(monitored, events, flower, later.id, "drop the pipeline")
            assert "cit.plain.add" == info["name"]


def test_plain_task_revoked_while_queued_shows_as_celery_shows_it(
    monitored, events, flower, keys: Keys
):
    """A plain task held for its countdown and plainly revoked: Celery's event, no reason added.

    Celery discards it when its countdown ends and sends ``task-revoked``
    with only its own fields; Flower shows REVOKED with no exception, as
    without this library.
    """
    result = monitored.send("cit.plain.sleep", keys.key("p"), 0.1, countdown=1.5)
    flower.wait_state(result.id, "RECEIVED")
    result.revoke()
    assert "REVOKED" == wait_state(result, ("REVOKED", "SUCCESS"), 15)

    event = events.wait(result.id)
    assert "exception" not in event
    assert (False, None, False) == (event["terminated"], event["signum"], event["expired"])
    info = flower.wait_state(result.id, "REVOKED")
    assert info["exception"] is None
    assert [] == keys.started("p")


def test_unobserved_cancellation_is_a_warning(monitored, events, keys: Keys):
    """A task cancelled after its last checkpoint ends SUCCESS, and the log says so.

    ``cit.no_checkpoint`` never reaches a checkpoint and has no grace: it
    runs to its end.  The worker logs ``task.cancel_unobserved`` at WARNING
    with the task id and how long it ran after the cancel; no
    ``task-revoked`` event is sent (it did not end REVOKED).
    """
    result = start(monitored, keys, "cit.no_checkpoint", "n", 2.0)
    cancel(result, "too late", app=monitored.app)
    assert "finished" == result.get(timeout=20)
    assert "SUCCESS" == task_meta(result)["status"]

    def warned() -> list[str]:
        return [
            line for line in log_lines(monitored, result.id) if "task.cancel_unobserved" in line
        ]

    lines = wait_for(warned, 10, message="the task.cancel_unobserved line")
    assert 1 == len(lines), lines
    assert "WARNING/ForkPoolWorker-" in lines[0]
    assert "after_cancel_ms=" in lines[0]
    after = float(lines[0].split("after_cancel_ms=")[1].split()[0].rstrip(","))
    assert 500.0 <= after <= 5000.0, lines[0]
    assert "message='too late'" in lines[0]
    events.wait(result.id, "task-succeeded")
    assert [] == events.of(result.id)
