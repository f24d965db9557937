"""``python -m cancellable demo``: real tasks on a real worker, cancelled two ways.

The module is both the driver (`main`) and the Celery app the worker loads
(``celery -A cancellable._demo worker``).  By default everything runs on the
filesystem transport and the file result backend in a scratch directory, so
no server is needed; ``--broker redis://...`` or ``--broker amqp://...``
points it at a real broker instead.  Results and the cancellation ledger go
to the same Redis as a Redis broker, and to files in the scratch directory
with any other broker; ``--backend`` overrides.

What it does:

1. starts a real prefork worker (2 children) as a subprocess;
2. sends three ``export`` tasks: two start running, the third waits;
3. cancels the *running* one with `cancellable.celery.cancel` (a reason,
   and who asked), and the *waiting* one with Celery's plain
   ``AsyncResult.revoke()``;
4. prints the final states and the structured events the worker emitted,
   and checks that the cleanup hook of the cancelled export ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Final

import structlog
from celery import Celery
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

from cancellable import cancellable, checkpoint, on_cancel

_ENV_DIR = "CANCELLABLE_DEMO_DIR"
_ENV_BROKER = "CANCELLABLE_DEMO_BROKER"
_ENV_BACKEND = "CANCELLABLE_DEMO_BACKEND"


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, with files that appear only once complete.

    kombu's own ``_put`` creates a message file under its final name and
    only then writes it, and its ``_get`` takes any file with a matching
    name without a lock: a poll that lands in between (milliseconds under
    load) reads an empty or cut-off message.  The reader then raises
    ``JSONDecodeError`` from ``drain_events``: the worker exits on an
    "Unrecoverable error" (the task or revoke is lost with it), and the
    driver's ``control.ping`` raises (kombu issue #1551).  Exchange tables
    have the same gap when they are created.  Here every file is written
    under a hidden name (``.xxx.part``, which no queue name matches) and
    renamed into place, which is atomic: a reader sees all of it or nothing.
    """

    # kombu's filesystem Channel already calls AbstractChannel's ``message``
    # ``payload``; kombu passes both positionally.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # kombu's name: the millisecond first, so the queue stays in order.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        try:
            _write_atomically(folder / name, _encode(payload), replace=True)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to {folder}") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        table = self.control_folder / f"{exchange}.exchange"
        if _SIMPLE_NAME.match(exchange) and not table.exists():
            self.control_folder.mkdir(exist_ok=True)
            entry = [routing_key or "", pattern or "", queue or ""]
            try:
                # Create it complete or not at all; if another binder was
                # first, kombu's own update (under its lock) adds the entry.
                if _write_atomically(table, _encode([entry]), replace=False):
                    return
            except OSError as exc:
                raise ChannelError(f"Cannot open {table}") from exc
        super()._queue_bind(exchange, routing_key, pattern, queue)  # type: ignore[no-untyped-call]


class _AtomicFilesystemTransport(filesystem.Transport):
    """The filesystem transport with `_AtomicFilesystemChannel`."""

    Channel = _AtomicFilesystemChannel


#: The exchange names kombu 5.7 accepts for a file name (older kombu checks none).
_SIMPLE_NAME = re.compile(r"\A(?!\.*\Z)[A-Za-z0-9._-]+\Z")


def _encode(payload: Any) -> bytes:
    """``payload`` as kombu's filesystem transport writes it (kombu's JSON, UTF-8)."""
    return str(dumps(payload)).encode("utf-8")  # type: ignore[no-untyped-call]


def _write_atomically(path: Path, data: bytes, *, replace: bool) -> bool:
    """Write ``data`` to ``path`` through a hidden file in the same folder.

    With ``replace=False`` an existing ``path`` is left alone (returns False).
    """
    fd, name = tempfile.mkstemp(prefix=".", suffix=".part", dir=path.parent)
    part = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if replace:
            part.replace(path)
            return True
        try:
            os.link(part, path)  # unlike a rename, never replaces path
        except FileExistsError:
            return False
        finally:
            part.unlink()
        return True
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _make_app() -> Celery:
    base = Path(os.environ.get(_ENV_DIR) or tempfile.gettempdir()) / "celery"
    broker = os.environ.get(_ENV_BROKER) or "filesystem://"
    backend = os.environ.get(_ENV_BACKEND) or f"file://{base / 'results'}"
    app = Celery("cancellable-demo", broker=broker, backend=backend)
    if os.environ.get(_ENV_DIR):
        for name in ("queue", "control", "results"):
            (base / name).mkdir(parents=True, exist_ok=True)
    if broker.startswith("filesystem"):
        app.conf.broker_transport = _AtomicFilesystemTransport
        app.conf.broker_transport_options = {
            "data_folder_in": str(base / "queue"),
            "data_folder_out": str(base / "queue"),
            "control_folder": str(base / "control"),
            "polling_interval": 0.05,
        }
    app.conf.update(
        task_default_queue="cancellable-demo",
        control_exchange="cancellable-demo",
        # With acks_late and a prefetch of one per child, a task that waits
        # stays in the broker's queue instead of in the worker's hands.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        worker_hijack_root_logger=False,
        cancellable_poll_interval=1.0,
        broker_connection_retry_on_startup=True,
    )
    return app


app = _make_app()


#: What the demo says under the events a newcomer reads first.
_GLOSS: Final = {
    "cancel.delivered": "the worker's main process hands the cancellation to the task's child",
    "cancel.requested": "the task's cancel scope is cancelled, in the child (after the delivery)",
    "ledger.in_use": "the worker started (before cancel()): where it keeps cancellations",
}


def _event_time(event: dict[str, Any]) -> float | None:
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        # structlog's ISO stamps end in "Z", which Python 3.10 cannot parse.
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _in_time_order(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON events of ``lines`` sorted by their time stamps (several processes
    append to the file, each with its own buffer, so the file is not in time order)."""
    events: list[dict[str, Any]] = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return sorted(events, key=lambda event: _event_time(event) or 0.0)


def _configure_worker_logging() -> None:
    # The demo (not the library) decides where events go: one JSON object per
    # line in a file the driver reads back.
    directory = os.environ.get(_ENV_DIR)
    if not directory:
        return
    stream = open(Path(directory) / "events.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream),
    )


if os.environ.get(_ENV_DIR) and "worker" in sys.argv:
    _configure_worker_logging()


@app.task(bind=True)  # type: ignore[untyped-decorator]
@cancellable(timeout=120)
def export(self: Any, report: str, rows: int) -> int:
    """Write ``rows`` rows to a scratch file, slowly; delete it if cancelled."""
    out = Path(os.environ.get(_ENV_DIR) or tempfile.gettempdir()) / f"{report}.csv.part"
    (out.parent / f"{report}.started").touch()
    handle = out.open("w", encoding="utf-8")

    def discard() -> None:
        handle.close()
        out.unlink(missing_ok=True)
        (out.parent / f"{report}.cleaned").write_text("cleanup ran\n", encoding="utf-8")

    on_cancel(discard)
    for row in range(rows):
        checkpoint()  # raises Cancelled once the task is revoked
        handle.write(f"{row},{row * row}\n")
        handle.flush()
        time.sleep(0.05)  # stands for real work on the row
    handle.close()
    out.rename(out.with_suffix(""))
    return rows


# --------------------------------------------------------------------------
# The driver.


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out after {timeout:g}s waiting for {what}")


def _rows_written(directory: Path, report: str) -> int:
    path = directory / f"{report}.csv.part"
    try:
        return sum(1 for _ in path.open(encoding="utf-8"))
    except FileNotFoundError:
        return 0


def _unreachable(client: Celery) -> str | None:
    """Why the broker cannot be reached (one line), or None if it answers."""
    try:
        with client.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
            conn.default_channel  # noqa: B018 - opening a channel is a round trip
    except Exception as exc:  # noqa: BLE001 - any failure is reported in one line
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m cancellable demo",
        description=(
            "Start a real prefork Celery worker, send it three tasks, cancel a running "
            "and a queued one, and show the cleanup and the structured events."
        ),
    )
    parser.add_argument(
        "--broker",
        default=None,
        help="broker URL (default: the filesystem transport, no server needed)",
    )
    parser.add_argument("--backend", default=None, help="result backend URL")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="cancellable-demo-"))
    env = dict(os.environ)
    env[_ENV_DIR] = str(directory)
    if args.broker:
        env[_ENV_BROKER] = args.broker
        if args.broker.startswith(("redis://", "rediss://")):
            # Results and the ledger on the same server (and database) as the broker.
            env[_ENV_BACKEND] = args.backend or args.broker
    if args.backend:
        env[_ENV_BACKEND] = args.backend
    os.environ.update({k: v for k, v in env.items() if k.startswith("CANCELLABLE_DEMO")})
    client = _make_app()  # the driver's own app, configured like the worker's

    print(f"scratch directory: {directory}")
    print(f"broker: {client.conf.broker_url}   results: {client.conf.result_backend}")
    problem = _unreachable(client)
    if problem is not None:
        print(f"demo: cannot reach the broker at {args.broker}: {problem}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        return 2
    print("starting a prefork worker with 2 child processes...")
    worker_log = (directory / "worker.log").open("w")
    node = f"demo-{os.getpid()}@localhost"
    loglevel = os.environ.get("CANCELLABLE_DEMO_LOGLEVEL", "warning")
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "cancellable._demo", "worker",
            "-P", "prefork", "-c", "2", "-n", node, "-l", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ],
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_for(
            lambda: bool(client.control.ping(destination=[node], timeout=0.5)),
            60,
            "the worker to answer a ping",
        )
        first = client.send_task("cancellable._demo.export", args=("first", 400))
        _wait_for(lambda: _rows_written(directory, "first") >= 1, 60, "'first' to start")
        second = client.send_task("cancellable._demo.export", args=("second", 60))
        _wait_for(lambda: _rows_written(directory, "second") >= 1, 60, "'second' to start")
        third = client.send_task("cancellable._demo.export", args=("third", 30))
        print(f"sent: first={first.id}\n      second={second.id}\n      third={third.id}")
        _wait_for(lambda: _rows_written(directory, "first") >= 10, 60, "'first' to make progress")
        print("\nthe first two are running on the two children; the third waits in the queue")

        print("third.revoke()                                                   <- queued task")
        third.revoke()
        _wait_for(lambda: third.state == "REVOKED", 30, "the worker to take note of the revoke")
        print("cancel(first, reason='user pressed stop', requested_by='alice')  <- running task")
        from cancellable.celery import cancel

        receipt = cancel(first, "user pressed stop", requested_by="alice", app=client)
        (outcome,) = receipt.wait(30)
        print(f"receipt.wait(): {outcome.task_id}: {outcome.describe()}")
        _wait_for(lambda: first.state == "REVOKED", 30, "the first task to end REVOKED")
        _wait_for(lambda: second.ready(), 60, "the second task to finish")
        _wait_for(lambda: third.state == "REVOKED", 30, "the third task to end REVOKED")
        time.sleep(0.3)  # let the worker flush its last events

        print("\nfinal states:")
        rows_first = _rows_written(directory, "first")
        for name, result in (("first", first), ("second", second), ("third", third)):
            detail = repr(result.result)
            print(f"  {name:6} {result.state:8} {detail}")
        cleaned = (directory / "first.cleaned").exists()
        print(f"\ncleanup hook of 'first' ran: {cleaned}; partial file removed: {rows_first == 0}")
        print(f"'third' ever started: {(directory / 'third.started').exists()}")

        print("\nstructured events from the worker (cancellable.events), in time order:")
        print(f"  {'+0 ms':>9}  cancel() called by the client (requested_at)")
        events_file = directory / "events.jsonl"
        lines = events_file.read_text().splitlines() if events_file.exists() else []
        for event in _in_time_order(lines):
            at = _event_time(event)
            since = "" if at is None else f"{(at - receipt.reason.requested_at) * 1000:+.0f} ms"
            fields = {
                k: v
                for k, v in event.items()
                if k
                in ("task_id", "task_name", "source", "message", "requested_by", "how", "where")
                or k.endswith("_ms")
            }
            name = str(event.get("event", "?"))
            print(f"  {since:>9}  {name:18} {json.dumps(fields, sort_keys=True)}")
            if name in _GLOSS:
                print(f"  {'':9}  {'':18} ^ {_GLOSS[name]}")

        ok = (
            first.state == "REVOKED"
            and third.state == "REVOKED"
            and second.state == "SUCCESS"
            and cleaned
            and not (directory / "third.started").exists()
        )
        if ok:
            print("\nOK: the running task stopped and cleaned up; the queued task never ran.")
        else:
            print(f"\nUNEXPECTED: see the worker log at {directory / 'worker.log'}")
        return 0 if ok else 1
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        worker_log.close()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
