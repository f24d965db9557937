"""Real Celery workers for the benchmarks, started as subprocesses and always stopped.

`Worker` runs ``celery -A bench_app worker --pool=prefork -c 2 -Q <queue>
-n <name>@%h`` with a queue, a node name and a control exchange unique to
this run, so revokes and pings never reach other workers on the same Redis.
It waits until the node answers a ping, and `Worker.stop` (also on any
error, via the context manager) stops the worker and its pool children:
SIGTERM to the process group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

HERE = Path(__file__).resolve().parent

#: Longest wait for a worker to answer its first ping.
START_TIMEOUT = 60.0


def log_tail(logfile: Path, lines: int = 15) -> str:
    """The end of a worker's log file, for error messages."""
    try:
        text = logfile.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "no log"
    return "log tail:\n" + "\n".join(text)


def stop_process_group(proc: subprocess.Popen[Any] | None) -> None:
    """Stop a worker started in its own session, and every process of its group.

    SIGTERM first (a warm shutdown, up to 10 s), then SIGKILL to the group:
    pool children may outlive the main process.
    """
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class WorkerError(RuntimeError):
    """A worker did not start, or died."""


class Worker:
    """One ``celery worker`` subprocess with its own queue and control exchange."""

    def __init__(
        self,
        redis_url: str,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        broker_url: str | None = None,
    ) -> None:
        token = uuid.uuid4().hex[:10]
        self.redis_url = redis_url
        #: The broker; the result backend is always ``redis_url``.
        self.broker_url = broker_url or redis_url
        self.queue = f"cancellable-bench-{token}"
        self.control_exchange = f"cancellable-bench-ctl-{token}"
        self.nodename = f"bench-{token}@{socket.gethostname()}"
        self.concurrency = concurrency
        self.pool = pool
        self.logfile = Path(tempfile.gettempdir()) / f"cancellable-bench-worker-{token}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._app: Any = None

    @property
    def app(self) -> Any:
        """A client-side app with the worker's queue and control exchange."""
        if self._app is None:
            sys.path.insert(0, str(HERE))
            from celery import Celery

            app = Celery("cancellable_bench", broker=self.broker_url, backend=self.redis_url)
            app.conf.update(
                task_default_queue=self.queue,
                control_exchange=self.control_exchange,
                result_expires=3600,
                broker_connection_retry_on_startup=True,
            )
            self._app = app
        return self._app

    @property
    def pid(self) -> int:
        """The pid of the worker's main process (the parent of its pool children)."""
        if self.proc is None:
            raise WorkerError(f"worker {self.nodename} is not running")
        return self.proc.pid

    def start(self) -> None:
        """Start the worker and wait until it answers a ping."""
        env = dict(os.environ)
        env.update(
            CANCELLABLE_BENCH_REDIS_URL=self.redis_url,
            CANCELLABLE_BENCH_BROKER_URL=self.broker_url,
            CANCELLABLE_BENCH_QUEUE=self.queue,
            CANCELLABLE_BENCH_CONTROL=self.control_exchange,
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        )
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench_app",
            "worker",
            f"--pool={self.pool}",
            "-c",
            str(self.concurrency),
            "-Q",
            self.queue,
            "-n",
            self.nodename,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ]
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=HERE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() reaches the children
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check_alive()
            replies = self.app.control.ping(destination=[self.nodename], timeout=0.5)
            if replies:
                return
            if time.monotonic() > deadline:
                raise WorkerError(f"worker {self.nodename} did not answer a ping; {self.tail()}")

    def check_alive(self) -> None:
        """Raise `WorkerError` if the worker process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise WorkerError(f"worker {self.nodename} exited ({code}); {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        """The end of the worker's log, for error messages."""
        return log_tail(self.logfile, lines)

    def stop(self) -> None:
        """Stop the worker and every process of its group; idempotent."""
        proc, self.proc = self.proc, None
        stop_process_group(proc)
        if self.broker_url.startswith("amqp"):
            self._delete_amqp_entities()
        if self._app is not None:
            self._app.close()
            self._app = None
        with contextlib.suppress(OSError):
            self.logfile.unlink()

    def _delete_amqp_entities(self) -> None:
        # RabbitMQ keeps durable queues and exchanges: remove this run's.
        try:
            with self.app.connection_for_write() as conn:
                channel = conn.default_channel
                for queue in (self.queue,):
                    channel.queue_delete(queue)
                for exchange in (f"{self.control_exchange}.pidbox",):
                    channel.exchange_delete(exchange)
                channel.exchange_delete(f"reply.{self.control_exchange}.pidbox")
                channel.exchange_delete(self.queue)
        except Exception as exc:
            sys.stderr.write(f"warning: could not clean up RabbitMQ entities: {exc!r}\n")

    def __enter__(self) -> Worker:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self.proc is not None:
            sys.stderr.write(self.tail() + "\n")
        self.stop()


def flush_benchmark_db(redis_url: str) -> None:
    """FLUSHDB the benchmark database, and refuse any database but 14."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        db = client.connection_pool.connection_kwargs.get("db", 0)
        if int(db) != 14:
            raise ValueError(f"refusing to flush Redis DB {db}: the benchmarks only flush DB 14")
        client.flushdb()
    finally:
        client.close()


@contextlib.contextmanager
def session(redis_url: str, **kwargs: Any) -> Iterator[Worker]:
    """A started worker, stopped at the end, then the benchmark DB flushed."""
    try:
        with Worker(redis_url, **kwargs) as worker:
            yield worker
    finally:
        flush_benchmark_db(redis_url)
