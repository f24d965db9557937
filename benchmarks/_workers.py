"""Real workers for the benchmarks, started as subprocesses and always stopped.

The one place that starts and stops workers:

* `Worker`: ``celery -A bench_app worker --pool=<pool> -c 2 -Q <queue> -n
  <name>@%h``, with a queue, a node name and a control exchange unique to
  this run, so revokes and pings never reach other workers on the same Redis.
  It is ready when the node answers a ping.
* `DramatiqWorker`: ``dramatiq peers_app --processes 1 --threads 2`` on a
  queue of its own (dramatiq-abort beside ours, ``peers.latency.*``).  It is
  ready when its first message starts.

Both run in a session of their own; `Subprocess.stop` (also on any error,
through the context manager) sends SIGTERM to the process group, then
SIGKILL after a grace period, so pool children never outlive a run.  The
``/proc`` helpers (`process_gone`, `live_children`) and `wait_for` serve the
samples that watch a worker's children.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent

#: Longest wait for a worker to answer its first ping.
START_TIMEOUT = 60.0
#: How long each ping of a starting worker waits for its reply before the
#: next is sent: the resolution of a measured start (``index_memory.py``;
#: it was 0.5 s, so starts were measured in steps of 0.5 s).  The pings go
#: through a connection whose Redis transport polls this often too: kombu's
#: waits for replies in a ``BRPOP`` with a 1-s server timeout (its
#: ``polling_interval``), and a ping that got no reply left that ``BRPOP``
#: outstanding, so the replies to the next ones were read only when it
#: returned (a worker that answered at 1.36 s was seen to answer at 2.29 s:
#: starts were measured in steps of about 1 s).
PING_EVERY = 0.1
#: The only Redis database the benchmarks write to, and flush.
BENCH_DB = 14

T = TypeVar("T")
S = TypeVar("S", bound="Subprocess")


class WorkerError(RuntimeError):
    """A worker did not start, died, or did not do something in time."""


class Subprocess:
    """A worker subprocess in a session of its own, its output in a log file."""

    def __init__(self, kind: str) -> None:
        self.token = uuid.uuid4().hex[:10]
        self.kind = kind
        self.logfile = Path(tempfile.gettempdir()) / f"cancellable-bench-{kind}-{self.token}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The pid of the worker's main process (the parent of its pool children)."""
        if self.proc is None:
            raise WorkerError(f"the {self.kind} worker is not running")
        return self.proc.pid

    def launch(self, cmd: list[str], env: dict[str, str]) -> None:
        """Start ``cmd`` with ``env`` added to this environment, from this directory."""
        full_env = {**os.environ, **env}
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(HERE), os.environ.get("PYTHONPATH")])
        )
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=HERE,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() reaches the children
            )

    def check_alive(self) -> None:
        """Raise `WorkerError` if the worker's main process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise WorkerError(f"the {self.kind} worker exited ({code}); {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        """The end of the worker's log, for error messages."""
        try:
            text = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "no log"
        return "log tail:\n" + "\n".join(text)

    def start(self) -> None:
        """Start the worker and wait until it is ready."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the client-side resources (after the process has stopped)."""

    def stop(self) -> None:
        """Stop the worker and every process of its group; idempotent.

        SIGTERM first (a warm shutdown, up to 10 s), then SIGKILL to the
        group: pool children may outlive the main process.
        """
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.close()
        with contextlib.suppress(OSError):
            self.logfile.unlink()

    def __enter__(self: S) -> S:
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


class Worker(Subprocess):
    """One ``celery worker`` of ``bench_app`` with its own queue and control exchange.

    ``env`` adds environment variables (``CELERY_WORKER_REVOKES_MAX``,
    ``CANCELLABLE_BENCH_KILL_AFTER``).  The broker is ``broker_url`` (Redis
    ``redis_url`` by default); the result backend is always ``redis_url``.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        broker_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__("celery")
        self.redis_url = redis_url
        self.broker_url = broker_url or redis_url
        self.queue = f"cancellable-bench-{self.token}"
        self.control_exchange = f"cancellable-bench-ctl-{self.token}"
        self.nodename = f"bench-{self.token}@{socket.gethostname()}"
        self.concurrency = concurrency
        self.pool = pool
        self.env = env or {}
        self._app: Any = None

    @property
    def app(self) -> Any:
        """A client-side app with the worker's queue and control exchange."""
        if self._app is None:
            from bench_app import make_app

            self._app = make_app(self.broker_url, self.redis_url, self.queue, self.control_exchange)
        return self._app

    def start(self) -> None:
        """Start the worker and wait until it answers a ping."""
        env = {
            "CANCELLABLE_BENCH_REDIS_URL": self.redis_url,
            "CANCELLABLE_BENCH_BROKER_URL": self.broker_url,
            "CANCELLABLE_BENCH_QUEUE": self.queue,
            "CANCELLABLE_BENCH_CONTROL": self.control_exchange,
            **self.env,
        }
        cmd = [sys.executable, "-m", "celery", "-A", "bench_app", "worker"]
        cmd += [f"--pool={self.pool}", "-c", str(self.concurrency), "-Q", self.queue]
        cmd += ["-n", self.nodename, "--without-gossip", "--without-mingle"]
        cmd += ["--without-heartbeat", "-l", "WARNING"]
        self.launch(cmd, env)
        deadline = time.monotonic() + START_TIMEOUT
        options = dict(self.app.conf.broker_transport_options or {})
        options["polling_interval"] = PING_EVERY
        with self.app.connection_for_write(transport_options=options) as connection:
            while not self.app.control.ping(
                destination=[self.nodename], timeout=PING_EVERY, connection=connection
            ):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"worker {self.nodename} did not answer a ping; {self.tail()}"
                    )

    def close(self) -> None:
        """Delete this run's RabbitMQ entities (RabbitMQ keeps them) and close the app."""
        if self._app is None:
            return
        if self.broker_url.startswith("amqp"):
            try:
                with self._app.connection_for_write() as conn:
                    channel = conn.default_channel
                    channel.queue_delete(self.queue)
                    channel.exchange_delete(self.queue)
                    channel.exchange_delete(f"{self.control_exchange}.pidbox")
                    channel.exchange_delete(f"reply.{self.control_exchange}.pidbox")
            except Exception as exc:
                sys.stderr.write(f"warning: could not clean up RabbitMQ entities: {exc!r}\n")
        self._app.close()
        self._app = None


class DramatiqWorker(Subprocess):
    """One ``dramatiq peers_app`` worker on a queue of its own, and its sending side."""

    def __init__(self, redis_url: str, threads: int = 2) -> None:
        super().__init__("dramatiq")
        self.redis_url = redis_url
        self.queue = f"cancellable-bench-peers-{self.token}"
        self.threads = threads
        self._actor: Any = None
        self._abortable: Any = None

    def _client_side(self) -> tuple[Any, Any]:
        # The same broker settings and queue as the worker (peers_app.py).
        if self._actor is None:
            import dramatiq
            from dramatiq.brokers.redis import RedisBroker
            from dramatiq_abort import Abortable
            from dramatiq_abort.backends import RedisBackend

            broker = RedisBroker(url=self.redis_url)
            self._abortable = Abortable(backend=RedisBackend.from_url(self.redis_url))
            broker.add_middleware(self._abortable)

            def peers_spin(key: str) -> None:
                """Stands for the worker's actor of this name (only sent from here)."""

            self._actor = dramatiq.actor(broker=broker, queue_name=self.queue, max_retries=0)(
                peers_spin
            )
        return self._actor, self._abortable

    def send(self, key: str) -> str:
        """Enqueue ``peers_spin(key)``; its message id."""
        actor, _ = self._client_side()
        return str(actor.send(key).message_id)

    def abort(self, message_id: str) -> None:
        """dramatiq-abort's ``abort(message_id)`` (mode ABORT, no grace period)."""
        from dramatiq_abort import abort

        _, abortable = self._client_side()
        abort(message_id, middleware=abortable)

    def start(self) -> None:
        """Start the worker (it is ready when its first message starts)."""
        cmd = [sys.executable, "-m", "dramatiq", "peers_app", "--processes", "1"]
        cmd += ["--threads", str(self.threads), "--queues", self.queue]
        self.launch(
            cmd,
            {
                "CANCELLABLE_BENCH_REDIS_URL": self.redis_url,
                "CANCELLABLE_BENCH_PEERS_QUEUE": self.queue,
            },
        )

    def close(self) -> None:
        """Close the sending side's broker."""
        if self._actor is not None:
            self._actor.broker.close()
            self._actor = None


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, worker: Subprocess) -> T:
    """``predicate()``'s first true value, polled every 2 ms; `WorkerError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        worker.check_alive()
        if time.monotonic() > deadline:
            raise WorkerError(f"timed out waiting for {what}; {worker.tail()}")
        time.sleep(0.002)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has died (no ``/proc`` entry, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state follows the command name in parentheses, which may hold spaces.
    return stat[stat.rindex(")") + 2 :][:1] in ("Z", "X", "x")


def live_children(pid: int) -> set[int]:
    """Pids of the live (not zombie) child processes of ``pid``, from ``/proc``."""
    kids: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids.update(int(p) for p in path.read_text().split())
    return {kid for kid in kids if not process_gone(kid)}


def flush_benchmark_db(redis_url: str) -> None:
    """FLUSHDB the benchmark database, and refuse any database but `BENCH_DB`."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        db = int(client.connection_pool.connection_kwargs.get("db", 0))
        if db != BENCH_DB:
            raise ValueError(f"refusing to flush Redis DB {db}: the benchmarks only flush DB 14")
        client.flushdb()
    finally:
        client.close()


@contextlib.contextmanager
def session(redis_url: str, **kwargs: Any) -> Iterator[Worker]:
    """A started `Worker`, stopped at the end, then the benchmark DB flushed."""
    try:
        with Worker(redis_url, **kwargs) as worker:
            yield worker
    finally:
        flush_benchmark_db(redis_url)
