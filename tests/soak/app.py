"""The Celery app the soak's workers run (``-A tests.soak.app``).

Configuration comes from ``SOAK_*`` environment variables (see `settings`).
Every task execution appends JSON lines describing its own events to its own
file, ``$SOAK_RUN_DIR/events/<task id>.jsonl``:

``started``
    the body began: ``pid``, ``attempt`` (1 + the ``started`` lines already
    in the file), ``redelivered`` (the broker's flag) and ``hostname``;
``checkpoint_raised``
    a checkpoint raised `Cancelled` (``reason`` is the scope's reason,
    ``source`` its source; ``"shutdown"``: a warm shutdown, also when its
    interrupt ended a task without checkpoints);
``hook_ran`` / ``hook_done``
    the ``on_cancel`` hook began / ended;
``finished``
    the body is about to return normally.

Each event carries ``run``, a token unique to one execution, so duplicate or
concurrent runs of one task are told apart.  Lines are written with one
``write`` on an ``O_APPEND`` descriptor, so concurrent writers never
interleave and a run killed with SIGKILL leaves every line it wrote complete.
The events are written straight to a local file, not to Redis, so they are
recorded while Redis restarts.

``SOAK_WITH_CANCELLABLE=0`` registers the same tasks without the library
(checkpoints and hooks do nothing), for the harness self-tests.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .settings import ENV_PREFIX, app_from_env

app = app_from_env()

EVENTS_DIR = Path(os.environ.get(ENV_PREFIX + "RUN_DIR", "/nonexistent")) / "events"
WITH_CANCELLABLE = os.environ.get(ENV_PREFIX + "WITH_CANCELLABLE", "1") != "0"


def event(task_id: str, run: str, ev: str, **fields: Any) -> None:
    """Append one event line to the task's own file."""
    record = {"ev": ev, "ts": time.time(), "pid": os.getpid(), "run": run, **fields}
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(EVENTS_DIR / f"{task_id}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _attempt(task_id: str) -> int:
    try:
        text = (EVENTS_DIR / f"{task_id}.jsonl").read_text()
    except OSError:
        return 1
    return 1 + text.count('"ev": "started"')


def start(task: Any) -> tuple[str, str]:
    """Record ``started`` for this execution; return (task id, run token)."""
    task_id = task.request.id
    run = uuid.uuid4().hex[:10]
    delivery = task.request.delivery_info or {}
    event(
        task_id,
        run,
        "started",
        attempt=_attempt(task_id),
        redelivered=bool(delivery.get("redelivered")),
        hostname=task.request.hostname,
    )
    return task_id, run


def sleep_blind(seconds: float) -> None:
    """Sleep without any checkpoint."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


@app.task(bind=True, name="soak.plain")
def plain(self: Any, seconds: float) -> str:
    """A plain Celery task (no cancellable): sleeps, records started/finished."""
    task_id, run = start(self)
    sleep_blind(seconds)
    event(task_id, run, "finished")
    return "plain"


if WITH_CANCELLABLE:
    from cancellable import Cancelled, cancellable, checkpoint, on_cancel
    from cancellable.celery import configure

    # The ledger: the soak's Redis, or the database SOAK_LEDGER_URL names.
    ledger_url = os.environ.get(ENV_PREFIX + "LEDGER_URL") or os.environ[ENV_PREFIX + "REDIS_URL"]
    configure(app, ledger_url=ledger_url, poll_interval=0.5)
else:
    # The same tasks without the library (checkpoints and hooks do nothing):
    # a soak over these shows that the audit catches tasks that do not stop.

    class Cancelled(BaseException):  # type: ignore[no-redef]
        reason: Any

    def cancellable(fn: Any) -> Any:  # type: ignore[no-redef]
        return fn

    def checkpoint() -> None:  # type: ignore[no-redef]
        pass

    def on_cancel(*args: Any, **kwargs: Any) -> None:  # type: ignore[no-redef]
        pass


def hook(task_id: str, run: str, seconds: float) -> None:
    """The cleanup hook: records that it ran (and, after ``seconds``, that it ended)."""
    event(task_id, run, "hook_ran")
    if seconds:
        time.sleep(seconds)
    event(task_id, run, "hook_done")


def checkpoints(task_id: str, run: str, count: int | None, seconds: float, step: float) -> None:
    """``count`` checkpoints ``step`` apart, or checkpoints for ``seconds``."""
    n = 0
    end = time.monotonic() + seconds
    try:
        while (n < count) if count is not None else (time.monotonic() < end):
            checkpoint()
            n += 1
            time.sleep(step)
        checkpoint()
    except Cancelled as exc:
        event(
            task_id,
            run,
            "checkpoint_raised",
            n=n,
            reason=exc.reason.describe(),
            source=exc.reason.source,
        )
        raise


@app.task(bind=True, name="soak.short")
@cancellable
def short(self: Any, count: int, step: float) -> str:
    """A few checkpoints, well under half a second."""
    task_id, run = start(self)
    on_cancel(hook, task_id, run, 0.0)
    checkpoints(task_id, run, count, 0.0, step)
    event(task_id, run, "finished")
    return "short"


@app.task(bind=True, name="soak.long")
@cancellable
def long(self: Any, seconds: float) -> str:
    """A checkpoint loop for ``seconds``."""
    task_id, run = start(self)
    on_cancel(hook, task_id, run, 0.0)
    checkpoints(task_id, run, None, seconds, 0.05)
    event(task_id, run, "finished")
    return "long"


@app.task(bind=True, name="soak.slow_cleanup")
@cancellable
def slow_cleanup(self: Any, seconds: float, hook_seconds: float) -> str:
    """A checkpoint loop whose hook takes ``hook_seconds``."""
    task_id, run = start(self)
    on_cancel(hook, task_id, run, hook_seconds)
    checkpoints(task_id, run, None, seconds, 0.05)
    event(task_id, run, "finished")
    return "slow_cleanup"


@app.task(bind=True, name="soak.no_checkpoint")
@cancellable
def no_checkpoint(self: Any, seconds: float) -> str:
    """Sleeps without a checkpoint: cannot be stopped cooperatively."""
    task_id, run = start(self)
    on_cancel(hook, task_id, run, 0.0)
    try:
        sleep_blind(seconds)
    except Cancelled as exc:
        if exc.reason.source == "shutdown":
            # Interrupted by a warm shutdown's ladder: it goes back to the broker.
            event(task_id, run, "checkpoint_raised", n=0, reason=exc.reason.describe(),
                  source="shutdown")  # fmt: skip
        raise
    event(task_id, run, "finished")
    return "no_checkpoint"


# --------------------------------------------------------------------------
# The longest waits of this worker's threads, for the soak's report.

TIMINGS_DIR = EVENTS_DIR.parent / "timings"


def _report_timings(hostname: str, stop: threading.Event) -> None:
    """Every half second, write the library's figures to ``timings/<node>.json``.

    The worker's consumer, ticker and ledger thread note their longest waits
    (`cancellable.celery._runtime.Timings`).  One write of a whole file
    (rename into place), so a worker killed with SIGKILL leaves its last one
    complete.  This thread does no network I/O and takes none of the
    library's locks.
    """
    from cancellable.celery._runtime import runtime

    TIMINGS_DIR.mkdir(parents=True, exist_ok=True)
    path = TIMINGS_DIR / f"{hostname}.json"
    while not stop.wait(0.5):
        worker = runtime().worker
        if worker is None:
            continue
        figures = {"pid": os.getpid(), "ts": time.time(), **worker.timings.as_dict()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures))
        os.replace(tmp, path)


if WITH_CANCELLABLE:
    from celery import signals

    @signals.worker_ready.connect
    def _start_timings(sender: Any = None, **kwargs: Any) -> None:
        hostname = getattr(sender, "hostname", None) or f"pid-{os.getpid()}"
        thread = threading.Thread(
            target=_report_timings,
            args=(hostname, threading.Event()),
            name="soak-timings",
            daemon=True,
        )
        thread.start()
