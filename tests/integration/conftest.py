"""Harness for the integration tests: real brokers, real worker subprocesses.

* **Services.**  A session fixture checks Redis and RabbitMQ first and fails
  (never skips) with instructions when one does not answer.  It flushes the
  tests' Redis database (`settings.REDIS_URL`, DB 13) once per session.
* **Isolation.**  Every session has its own app main name (so the ledger
  prefix is private); every worker has its own queue, node name
  (``cancellable-test-<uuid>@<host>``) and control exchange (so broadcasts
  never reach other people's workers, nor the other workers of this session
  unless a test asks for that).  Observations written by tasks live under a
  key prefix derived from the test's node id (`Keys`).
* **Workers.**  ``python -m celery -A tests.integration.app worker ...`` as a
  subprocess, configured by ``CIT_*`` environment variables, output captured
  to a file.  Readiness is a bounded `ping` loop.  Teardown stops every worker
  (SIGTERM, then SIGKILL of the main process and its children after a bound).
  When a test fails, the tail of each of its workers' logs is attached to the
  report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from kombu import Connection

from .settings import AMQP_URL, REDIS_URL, make_app

REPO_ROOT = Path(__file__).resolve().parents[2]
SESSION_ID = uuid.uuid4().hex[:10]
APP_NAME = f"cit-{SESSION_ID}"
CONTROL_EXCHANGE = f"cit-{SESSION_ID}"
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}
HOSTNAME = socket.gethostname()

#: Bounds (seconds).
WORKER_START_TIMEOUT = 40.0
WORKER_STOP_TIMEOUT = 20.0

T = TypeVar("T")


# --------------------------------------------------------------------------
# Small helpers, used by the tests too.


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Raises AssertionError naming ``message`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(interval)


def proc_children(pid: int) -> set[int]:
    """The live (non-zombie) child pids of ``pid``, read from /proc."""
    kids: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids.update(int(p) for p in path.read_text().split())
    return {k for k in kids if pid_alive(k)}


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state is the field after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@dataclasses.dataclass
class Keys:
    """Redis observation keys for one test (``<prefix>:<name>[:<sub>]``)."""

    prefix: str
    r: redis.Redis

    def key(self, name: str) -> str:
        """The key prefix a task gets as its ``key`` argument."""
        return f"{self.prefix}:{name}"

    def started(self, name: str) -> list[int]:
        return [int(p) for p in self.r.lrange(f"{self.key(name)}:started", 0, -1)]

    def runs(self, name: str) -> int:
        return int(self.r.get(f"{self.key(name)}:runs") or 0)

    def hooks(self, name: str) -> list[str]:
        return list(self.r.lrange(f"{self.key(name)}:hooks", 0, -1))

    def flag(self, name: str, flag: str) -> str | None:
        return self.r.get(f"{self.key(name)}:{flag}")

    def list(self, name: str, sub: str) -> list[str]:
        return list(self.r.lrange(f"{self.key(name)}:{sub}", 0, -1))


def state_of(result: AsyncResult) -> str:
    """The task's state, read from the backend every time (no client cache)."""
    meta = result.backend.get_task_meta(result.id, cache=False)
    return str(meta["status"])


def wait_state(result: AsyncResult, states: str | tuple[str, ...], timeout: float) -> str:
    """Wait until the task's stored state is one of ``states``; return it."""
    wanted = (states,) if isinstance(states, str) else states
    last: list[str] = []

    def check() -> str | None:
        state = state_of(result)
        last[:] = [state]
        return state if state in wanted else None

    return wait_for(
        check,
        timeout,
        interval=0.05,
        message=lambda: f"task {result.id} to reach {wanted} (last state {last})",
    )


# --------------------------------------------------------------------------
# Workers.


#: How long each ping of a starting worker waits for a reply.  The pings go
#: through a connection whose Redis transport polls as often: kombu's waits
#: for replies in a ``BRPOP`` with a 1-s server timeout (its
#: ``polling_interval``), and a ping that got no reply left that ``BRPOP``
#: outstanding, so the replies to the next ones were read only when it
#: returned: a worker that answered at 0.73 s was seen to answer at 1.13 s,
#: and each start waited up to a second more than it took.
PING_EVERY = 0.1


@dataclasses.dataclass
class Worker:
    """A worker subprocess and the test-side app that talks to it."""

    name: str
    queue: str
    control_exchange: str
    pool: str
    concurrency: int
    broker: str
    app: Celery
    env: dict[str, str]
    log_path: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    _log_file: Any = None
    #: How long the last stop() took (seconds), for diagnostics.
    stop_seconds: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Worker:
        """Spawn the worker; return once it answers a ping."""
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        with self._ping_connection() as connection:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"worker {self.name} exited with {self.proc.returncode} while starting\n"
                        + self.tail()
                    )
                try:
                    replies = self.app.control.ping(
                        destination=[self.name], timeout=PING_EVERY, connection=connection
                    )
                except Exception:  # broker hiccup while starting: keep polling
                    replies = []
                if any(self.name in reply for reply in replies):
                    return self
                if time.monotonic() >= deadline:
                    self.stop()
                    raise RuntimeError(
                        f"worker {self.name} did not answer a ping within "
                        f"{WORKER_START_TIMEOUT}s\n" + self.tail()
                    )

    def _ping_connection(self) -> Any:
        """A broker connection for the start's pings (see `PING_EVERY`)."""
        options = dict(self.app.conf.broker_transport_options or {})
        options["polling_interval"] = PING_EVERY
        return self.app.connection_for_write(transport_options=options)

    def children(self) -> set[int]:
        """The pool's child processes (prefork); empty for in-process pools."""
        return proc_children(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, task: str, *args: Any, **options: Any) -> AsyncResult:
        """Send ``task`` (by name) to this worker's queue."""
        options.setdefault("queue", self.queue)
        return self.app.send_task(task, args=args, **options)

    def signature(self, task: str, *args: Any, **options: Any) -> Any:
        options.setdefault("queue", self.queue)
        return self.app.signature(task, args=args, options=options)

    def inspect(self) -> Any:
        return self.app.control.inspect(destination=[self.name], timeout=1.0)

    def reserved_ids(self) -> set[str]:
        replies = self.inspect().reserved() or {}
        return {req["id"] for reqs in replies.values() for req in reqs}

    def active_ids(self) -> set[str]:
        replies = self.inspect().active() or {}
        return {req["id"] for reqs in replies.values() for req in reqs}

    def barrier(self, timeout: float = 5.0) -> None:
        """Return once the worker has handled every control message sent before.

        Control messages to one worker are handled in order, so a ping
        answered means earlier broadcasts (revokes) were processed.
        """
        replies = self.app.control.ping(destination=[self.name], timeout=timeout)
        assert any(self.name in reply for reply in replies), f"{self.name} did not answer a ping"

    def healthy(self) -> bool:
        """Alive and answering a ping."""
        if not self.alive():
            return False
        try:
            replies = self.app.control.ping(destination=[self.name], timeout=2.0)
        except Exception:
            return False
        return any(self.name in reply for reply in replies)

    def queue_length(self) -> int | None:
        """Messages waiting in the broker queue (not delivered to any consumer)."""
        if self.broker == "redis":
            client = redis.Redis.from_url(REDIS_URL)
            try:
                return int(client.llen(self.queue))
            finally:
                client.close()
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            declared = conn.channel().queue_declare(self.queue, passive=True)
            return int(declared.message_count)

    def idle(self) -> bool:
        """Nothing active or reserved, and nothing waiting in its queue."""
        try:
            return not self.active_ids() and not self.reserved_ids() and self.queue_length() == 0
        except Exception:
            return False

    def kill9(self) -> None:
        """SIGKILL the main process and its children (no cleanup anywhere)."""
        if not self.alive():
            return
        kids = self.children()
        os.kill(self.pid, signal.SIGKILL)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(k) for k in kids), 10, message="children to die")
        self._close_log()

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT) -> None:
        """Warm shutdown (SIGTERM); SIGKILL everything after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            kids = self.children()
            self.proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            try:
                self._wait_waking(timeout)
            except subprocess.TimeoutExpired:
                kids |= self.children()
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.stop_seconds = time.monotonic() - began
            for kid in kids:
                if pid_alive(kid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, signal.SIGKILL)
        self._close_log()

    def _wait_waking(self, timeout: float) -> None:
        """Wait for the process to exit, nudging its event loop meanwhile.

        A worker notices SIGTERM only when its event loop wakes up; with
        RabbitMQ and an idle solo/threads worker that can take 10 s.  A
        no-reply ping addressed to it wakes the loop at once.
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.proc.wait(timeout=0.3)
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
            with contextlib.suppress(Exception):
                self.app.control.broadcast("ping", destination=[self.name], reply=False)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- tail of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])


def worker_env(
    *,
    broker_url: str,
    queue: str,
    control_exchange: str,
    poll_interval: float | None = 0.5,
    prefetch: int | None = None,
    visibility_timeout: float | None = None,
    with_cancellable: bool = True,
    backend_url: str = REDIS_URL,
    settings: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The environment for a worker or CLI subprocess."""
    env = dict(os.environ)
    env.pop("CELERY_RDBSIG", None)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        CIT_APP_NAME=APP_NAME,
        CIT_BROKER_URL=broker_url,
        CIT_BACKEND_URL=backend_url,
        CIT_OBS_URL=REDIS_URL,
        CIT_QUEUE=queue,
        CIT_CONTROL_EXCHANGE=control_exchange,
        CIT_WITH_CANCELLABLE="1" if with_cancellable else "0",
    )
    if settings:
        env["CIT_SETTINGS"] = json.dumps(settings)
    for name, value in (
        ("CIT_POLL_INTERVAL", poll_interval),
        ("CIT_PREFETCH", prefetch),
        ("CIT_VISIBILITY_TIMEOUT", visibility_timeout),
    ):
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def client_app(
    broker: str,
    queue: str = "cit-unused",
    control_exchange: str = CONTROL_EXCHANGE,
    *,
    broker_url: str | None = None,
    backend_url: str = REDIS_URL,
    settings: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Celery:
    """A test-side app for ``broker`` ("redis" or "rabbitmq", or ``broker_url``).

    ``settings``: more app settings, as a worker gets them (``CIT_SETTINGS``).
    """
    _control_exchanges.add(control_exchange)
    app = make_app(
        main=APP_NAME,
        broker_url=broker_url or BROKERS[broker],
        backend_url=backend_url,
        queue=queue,
        control_exchange=control_exchange,
        **kwargs,
    )
    app.conf.update(settings or {})
    return app


# --------------------------------------------------------------------------
# Fixtures.


def _check_redis() -> str | None:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        return (
            f"Redis is not answering at {REDIS_URL} ({exc!r}). Start it, e.g. "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379` or "
            "`docker run -d -p 6379:6379 redis:7`."
        )
    return None


def _check_rabbitmq() -> str | None:
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        return (
            f"RabbitMQ is not answering at {AMQP_URL} ({exc!r}). Start it, e.g. "
            "`sudo service rabbitmq-server start` (user guest/guest, vhost /) or "
            "`docker run -d -p 5672:5672 rabbitmq:3`."
        )
    return None


SESSION_LOCK_KEY = "cit:session-lock"
SESSION_LOCK_TTL = 30
#: How long a session waits for another one that uses the same Redis DB: well
#: under the per-test timeout, so the wait fails with its own message.
SESSION_LOCK_WAIT = float(os.environ.get("CIT_LOCK_WAIT", "60"))


class _SessionLock:
    """Only one integration session at a time may use (and flush) the tests' DB.

    A second session started meanwhile (another developer, an IDE, a
    ``pytest`` from the repository root) would flush the first one's queues,
    unacked messages and results under its feet.  The lock is a Redis key
    with a TTL that a daemon thread refreshes, so a crashed session frees it
    within `SESSION_LOCK_TTL` seconds.
    """

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        started = time.strftime("%H:%M:%S")
        self.holder = f"session {SESSION_ID} (pid {os.getpid()} on {HOSTNAME}, since {started})"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._refresh, name="cit-lock", daemon=True)

    def acquire(self) -> None:
        deadline = time.monotonic() + SESSION_LOCK_WAIT
        while not self.client.set(SESSION_LOCK_KEY, self.holder, nx=True, ex=SESSION_LOCK_TTL):
            if time.monotonic() >= deadline:
                holder = self.client.get(SESSION_LOCK_KEY)
                pytest.fail(
                    f"another integration-test session, {holder}, is using {REDIS_URL} "
                    f"(waited {SESSION_LOCK_WAIT:.0f}s). Run one session at a time, or point "
                    "this one at another server with CANCELLABLE_TEST_REDIS. A crashed "
                    f"session frees the lock within {SESSION_LOCK_TTL}s.",
                    pytrace=False,
                )
            time.sleep(1.0)
        # Start from an empty database, then take the lock again (FLUSHDB removed it).
        self.client.flushdb()
        self.client.set(SESSION_LOCK_KEY, self.holder, ex=SESSION_LOCK_TTL)
        self.thread.start()

    def _refresh(self) -> None:
        while not self.stop.wait(SESSION_LOCK_TTL / 3):
            with contextlib.suppress(Exception):
                self.client.set(SESSION_LOCK_KEY, self.holder, ex=SESSION_LOCK_TTL)

    def release(self) -> None:
        self.stop.set()
        self.thread.join(5)
        with contextlib.suppress(Exception):
            if self.client.get(SESSION_LOCK_KEY) == self.holder:
                self.client.delete(SESSION_LOCK_KEY)
        self.client.close()


@pytest.fixture(scope="session", autouse=True)
def services() -> Iterator[None]:
    """Both brokers must answer; the tests' Redis DB is ours alone and starts empty."""
    problems = [p for p in (_check_redis(), _check_rabbitmq()) if p]
    if problems:
        pytest.fail("integration tests need Redis and RabbitMQ:\n" + "\n".join(problems))
    lock = _SessionLock()
    lock.acquire()
    yield
    _cleanup_rabbitmq()
    lock.release()


_rabbit_queues: set[str] = set()
_control_exchanges: set[str] = set()


def _cleanup_rabbitmq() -> None:
    """Delete the queues and exchanges this session created on RabbitMQ."""
    with contextlib.suppress(Exception), Connection(AMQP_URL, connect_timeout=3) as conn:
        channel = conn.channel()
        for queue in sorted(_rabbit_queues):
            with contextlib.suppress(Exception):
                channel.queue_delete(queue)
                channel.exchange_delete(queue)
        for name in sorted(_control_exchanges):
            for exchange in (f"{name}.pidbox", f"reply.{name}.pidbox"):
                with contextlib.suppress(Exception):
                    channel.exchange_delete(exchange)


@pytest.fixture(name="obs")
def obs_fixture() -> Iterator[redis.Redis]:
    """A Redis client on the tests' database (strings, not bytes)."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(name="keys")
def keys_fixture(request: pytest.FixtureRequest, obs: redis.Redis) -> Keys:
    """Observation keys private to this test."""
    return Keys(prefix=f"cit:{SESSION_ID}:{request.node.nodeid}", r=obs)


@pytest.fixture(name="worker_logs", scope="session")
def worker_logs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


def spawn_worker(
    log_dir: Path,
    *,
    broker: str = "redis",
    pool: str = "prefork",
    concurrency: int | None = None,
    queue: str | None = None,
    prefetch: int | None = None,
    poll_interval: float | None = 0.5,
    visibility_timeout: float | None = None,
    with_cancellable: bool = True,
    control_exchange: str | None = None,
    extra_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    broker_url: str | None = None,
    backend_url: str = REDIS_URL,
    settings: dict[str, Any] | None = None,
) -> Worker:
    """A Worker (not started yet) with its own node name and, unless given, queue.

    ``broker_url`` replaces the URL of ``broker`` (which then only names the
    kind, e.g. ``"filesystem"``); ``backend_url`` replaces the Redis result
    backend; ``settings`` are more app settings, given to the worker and to
    its test-side app alike.

    Each worker also gets its own control exchange unless one is given: a
    revoke then reaches only the worker under test.  (With several workers on
    one exchange, Celery's idle workers store REVOKED for a PENDING task that
    another worker is running; tests that want that pass a shared exchange.)
    """
    if concurrency is None:
        concurrency = {"prefork": 2, "threads": 2, "solo": 1, "gevent": 10}[pool]
    uid = uuid.uuid4().hex[:12]
    name = f"cancellable-test-{uid}@{HOSTNAME}"
    queue = queue or f"cit-{SESSION_ID}-{uid}"
    control_exchange = control_exchange or f"{CONTROL_EXCHANGE}-{uid}"
    if broker == "rabbitmq":
        _rabbit_queues.add(queue)
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.integration.app", "worker",
        "-P", pool, "-c", str(concurrency), "-Q", queue,
        "-n", f"cancellable-test-{uid}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", "info", *extra_args,
    ]  # fmt: skip
    env = worker_env(
        broker_url=broker_url or BROKERS[broker],
        queue=queue,
        control_exchange=control_exchange,
        poll_interval=poll_interval,
        prefetch=prefetch,
        visibility_timeout=visibility_timeout,
        with_cancellable=with_cancellable,
        backend_url=backend_url,
        settings=settings,
    )
    env.update(extra_env or {})
    return Worker(
        name=name,
        queue=queue,
        control_exchange=control_exchange,
        pool=pool,
        concurrency=concurrency,
        broker=broker,
        app=client_app(
            broker,
            queue,
            control_exchange,
            broker_url=broker_url,
            backend_url=backend_url,
            settings=settings,
            poll_interval=poll_interval,
        ),
        env=env,
        log_path=log_dir / f"{uid}-{broker}-{pool}.log",
        argv=argv,
    )


def _report_workers(request: pytest.FixtureRequest) -> list[Worker]:
    """The workers whose logs go into this test's report if it fails."""
    workers: list[Worker] = request.node.__dict__.setdefault("cit_workers", [])
    return workers


@pytest.fixture(name="make_worker")
def make_worker_fixture(
    request: pytest.FixtureRequest, worker_logs: Path
) -> Iterator[Callable[..., Worker]]:
    """Factory for workers private to one test: ``make_worker(broker=, pool=, ...)``.

    Takes the keyword arguments of `spawn_worker`, plus ``start=False`` to get
    the worker unstarted (e.g. to queue tasks while no worker is online).
    ``queue=`` reuses a queue, e.g. to start a second worker on the first
    one's queue.  Every worker is stopped at teardown.
    """
    workers: list[Worker] = []

    def make(*, start: bool = True, **config: Any) -> Worker:
        worker = spawn_worker(worker_logs, **config)
        workers.append(worker)
        _report_workers(request).append(worker)
        if start:
            worker.start()
        return worker

    yield make
    for worker in workers:
        worker.stop()
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.app.close()


@pytest.fixture(name="_shared_workers", scope="session")
def shared_workers_cache(worker_logs: Path) -> Iterator[dict[tuple[str, str], Worker]]:
    """Session cache of long-lived workers, one per (broker, pool)."""
    cache: dict[tuple[str, str], Worker] = {}
    yield cache
    for worker in cache.values():
        worker.stop()
        with contextlib.suppress(Exception):
            worker.app.close()


@pytest.fixture(name="shared_worker")
def shared_worker_fixture(
    request: pytest.FixtureRequest,
    worker_logs: Path,
    _shared_workers: dict[tuple[str, str], Worker],
) -> Iterator[Callable[..., Worker]]:
    """Factory for a session-shared worker: ``shared_worker(broker=, pool=)``.

    Starting a worker costs seconds, so tests that neither crash, restart nor
    reconfigure a worker share one per (broker, pool), with the default
    concurrency and prefetch.  Before a test gets it, it must be alive,
    answer a ping and (prefork) have its full set of children; after the
    test it must be idle (nothing active or reserved, its queue empty) within
    a bound, or it is stopped and replaced for the next test.
    """
    used: list[tuple[tuple[str, str], Worker]] = []

    def get(*, broker: str = "redis", pool: str = "prefork") -> Worker:
        key = (broker, pool)
        worker = _shared_workers.get(key)
        if worker is not None and not worker.healthy():
            worker.stop()
            worker = None
        if worker is None:
            worker = spawn_worker(worker_logs, broker=broker, pool=pool)
            _shared_workers[key] = worker
            worker.start()
        if pool == "prefork":
            wait_for(
                lambda: len(worker.children()) == worker.concurrency,
                20,
                message=f"{worker.concurrency} pool children in {worker.name}",
            )
        used.append((key, worker))
        _report_workers(request).append(worker)
        return worker

    yield get
    for key, worker in used:
        try:
            wait_for(worker.idle, 30, interval=0.2, message=f"{worker.name} to be idle")
        except Exception:
            worker.stop()
            _shared_workers.pop(key, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the tail of every worker's log to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        for worker in getattr(item, "cit_workers", []):
            report.sections.append((f"worker {worker.name} ({worker.pool})", worker.tail()))


# --------------------------------------------------------------------------
# Outcome helpers.

READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")


def task_meta(result: AsyncResult) -> dict[str, Any]:
    """The stored meta of a task, fresh from the backend (result decoded)."""
    return dict(result.backend.get_task_meta(result.id, cache=False))


def assert_revoked(result: AsyncResult, *texts: str, timeout: float = 20.0) -> Exception:
    """Wait for the task to end; assert it ended REVOKED with a TaskRevokedError.

    Each of ``texts`` must appear in the error's message.  Returns the error.
    """
    from celery.exceptions import TaskRevokedError

    state = wait_state(result, READY_STATES, timeout)
    meta = task_meta(result)
    assert "REVOKED" == state, f"task {result.id} ended {state}: {meta.get('result')!r}"
    exc = meta["result"]
    assert isinstance(exc, TaskRevokedError), f"result is {exc!r}, not a TaskRevokedError"
    for text in texts:
        assert text in str(exc), f"{text!r} not in the revoke message {str(exc)!r}"
    return exc


def ledger_keys(task_id: str) -> list[str]:
    """Ledger entries in the tests' Redis DB that name ``task_id`` (``stream/entry-id``).

    Reads every cancellation ledger stream (``cancellable:<app>:ledger``)
    and returns the entries whose targets include the id.
    """
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        found = []
        for stream in client.scan_iter(match="cancellable:*:ledger", count=1000):
            for entry_id, fields in client.xrange(stream):
                if f"task:{task_id}" in fields.get("targets", "").split("\n"):
                    found.append(f"{stream}/{entry_id}")
        return sorted(found)
    finally:
        client.close()
