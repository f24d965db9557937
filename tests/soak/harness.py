"""Processes for the soak: a private redis-server and prefork worker subprocesses.

* **Redis.**  `RedisServer` runs ``redis-server`` on a free port in
  20000-30000 with ``--appendonly yes --appendfsync always --save ""`` in a
  private directory, so `restart` (``SHUTDOWN``, which with AOF on keeps
  every acknowledged write) loses nothing: queued messages, unacked
  messages, results and the ledger survive.  Automatic AOF rewrites are
  off, so the AOF keeps the whole run's history (`aof` reads it back).  The
  shared Redis on 6379 is never touched.
* **Workers.**  ``python -m celery -A tests.soak.app worker -P prefork -c 2``
  subprocesses on one queue and one control exchange, configured through
  ``SOAK_*`` variables, with ``CELERY_WORKER_REVOKES_MAX=100`` (a scaled-down
  stand-in for Celery's 50,000-id revoked set).  Readiness is a bounded ping
  loop.  `Worker.kill9` kills the main process and its children;
  `kill_child` kills one pool child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import Celery

REPO_ROOT = Path(__file__).resolve().parents[2]
HOSTNAME = socket.gethostname()
REVOKES_MAX = "100"

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float, *, interval: float = 0.1, message: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def proc_children(pid: int) -> set[int]:
    """The live child pids of ``pid``, from /proc/<pid>/task/*/children."""
    kids: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids.update(int(p) for p in path.read_text().split())
    return {k for k in kids if pid_alive(k)}


def free_port(rng: random.Random) -> int:
    """A port in 20000-30000 that nothing listens on right now."""
    for _ in range(200):
        port = rng.randint(20000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-30000")


# --------------------------------------------------------------------------
# Redis.


class RedisServer:
    """A private, persistent (AOF, fsync always) redis-server."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.down_since: float | None = None
        #: time.monotonic() of the running `pause` (None: not paused).
        self.paused_since: float | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        )

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> None:
        binary = self.binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        argv = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--auto-aof-rewrite-percentage", "0",
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no", "--protected-mode", "yes",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=self.directory)
        ours = self.proc.pid

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
                try:
                    # Loading the AOF answers LOADING errors until done.  The
                    # server must be ours: another one may have taken the port
                    # since free_port chose it (ours then fails to bind, exits,
                    # and the check above raises).
                    pid = client.info("server").get("process_id")
                    return bool(client.ping()) and pid == ours
                finally:
                    client.close()
            except redis.RedisError:
                return False

        wait_for(up, 30, interval=0.05, message=f"redis-server on port {self.port}")
        self.down_since = None

    def shutdown(self) -> None:
        """``SHUTDOWN`` (AOF on: every write is kept), then wait for the exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(redis.RedisError):
            client = self.client()
            try:
                client.shutdown()
            finally:
                client.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.down_since = time.time()

    def restart(self, down_for: float = 1.0, while_down: Callable[[], None] | None = None) -> None:
        self.shutdown()
        began = time.monotonic()
        if while_down is not None:
            while_down()
        time.sleep(max(0.0, down_for - (time.monotonic() - began)))
        self.start()
        self.restarts += 1

    def pause(self) -> None:
        """``SIGSTOP`` the server: it keeps its connections and its port, and answers nothing."""
        assert self.proc is not None, "redis-server was never started"
        assert self.proc.poll() is None, "redis-server is not running"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused_since = time.monotonic()

    def resume(self) -> float:
        """``SIGCONT`` a paused server; return how long it was paused (0.0 if it was not)."""
        if self.paused_since is None:
            return 0.0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        paused, self.paused_since = time.monotonic() - self.paused_since, None
        return paused

    def stop(self) -> None:
        self.resume()
        self.shutdown()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------
# Workers.

WORKER_START_TIMEOUT = 60.0


def worker_env(
    *,
    app_name: str,
    redis_url: str,
    queue: str,
    control_exchange: str,
    run_dir: Path,
    visibility_timeout: float,
    with_cancellable: bool = True,
    ledger_url: str | None = None,
) -> dict[str, str]:
    """The environment of a soak worker (``ledger_url`` None: the ledger is at ``redis_url``)."""
    env = dict(os.environ)
    for name in list(env):
        if name.startswith(("CELERY_", "SOAK_", "CIT_")):
            env.pop(name)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        CELERY_WORKER_REVOKES_MAX=REVOKES_MAX,
        SOAK_APP_NAME=app_name,
        SOAK_REDIS_URL=redis_url,
        SOAK_QUEUE=queue,
        SOAK_CONTROL_EXCHANGE=control_exchange,
        SOAK_RUN_DIR=str(run_dir),
        SOAK_VISIBILITY_TIMEOUT=str(visibility_timeout),
        SOAK_WITH_CANCELLABLE="1" if with_cancellable else "0",
    )
    if ledger_url is not None:
        env["SOAK_LEDGER_URL"] = ledger_url
    return env


@dataclasses.dataclass
class Worker:
    """A prefork worker subprocess."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float | None = None
    ready_at: float | None = None
    killed_at: float | None = None
    _log: Any = None

    @classmethod
    def make(
        cls, *, run_dir: Path, queue: str, concurrency: int, env: dict[str, str], label: str
    ) -> Worker:
        uid = uuid.uuid4().hex[:8]
        node = f"soak-{label}-{uid}"
        argv = [
            sys.executable, "-m", "celery", "-A", "tests.soak.app", "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", queue, "-n", f"{node}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
        ]  # fmt: skip
        return cls(
            name=f"{node}@{HOSTNAME}",
            argv=argv,
            env=env,
            log_path=run_dir / "logs" / f"{node}.log",
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _close_log()
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(
        self, app: Celery, concurrency: int, timeout: float = WORKER_START_TIMEOUT
    ) -> None:
        """Bounded: answers a ping and has its full set of pool children."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"worker {self.name} exited while starting\n{self.tail()}")
            if self.pings(app, 0.5) and len(self.children()) >= concurrency:
                self.ready_at = time.time()
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"worker {self.name} not ready in {timeout}s\n{self.tail()}")
            time.sleep(0.2)

    def pings(self, app: Celery, timeout: float = 1.0) -> bool:
        try:
            replies = app.control.ping(destination=[self.name], timeout=timeout)
        except Exception:
            return False
        return any(self.name in reply for reply in replies)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> set[int]:
        return proc_children(self.pid) if self.alive() else set()

    def kill9(self) -> set[int]:
        """SIGKILL the main process and its children; return the pids killed."""
        if not self.alive():
            return set()
        kids = self.children()
        os.kill(self.pid, signal.SIGKILL)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        self.killed_at = time.time()
        assert self.proc is not None
        self.proc.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(k) for k in kids), 10, message="children to die")
        self._close_log()
        return {self.pid, *kids}

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL everything after ``timeout``.

        A worker still alive then first gets ``SIGUSR1``, on which Celery
        logs the stack of each of its threads: its log says where it hung.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            kids = self.children()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1.0)
                kids |= self.children()
                self.proc.kill()
                self.proc.wait(timeout=10)
            for kid in kids:
                if pid_alive(kid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, signal.SIGKILL)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- tail of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# Event files.


def read_events(events_dir: Path, task_id: str) -> list[dict[str, Any]]:
    """The events a task's executions recorded (complete lines only), in file order."""
    try:
        raw = (events_dir / f"{task_id}.jsonl").read_bytes()
    except FileNotFoundError:
        return []
    events = []
    for line in raw.split(b"\n"):
        if line.strip():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def phase_of(
    events: list[dict[str, Any]], dead_pids: set[int] | frozenset[int] = frozenset()
) -> str:
    """What a task's own file says right now: queued, running, killed or finished.

    A run has ended once it wrote ``finished`` or ``checkpoint_raised``; a run
    that did not, in a process in ``dead_pids`` (killed with SIGKILL), is
    dead.  ``running``: some run is neither ended nor dead.  ``finished``:
    otherwise, if some run finished.  ``killed``: every run is dead (the
    message waits for redelivery).  ``queued``: no run yet.
    """
    started: dict[str, int] = {}
    ended: set[str] = set()
    finished = False
    for e in events:
        if e["ev"] == "started":
            started[e["run"]] = int(e["pid"])
        elif e["ev"] in ("finished", "checkpoint_raised"):
            ended.add(e["run"])
            finished = finished or e["ev"] == "finished"
    if not started:
        return "queued"
    open_runs = [run for run in started if run not in ended and started[run] not in dead_pids]
    if open_runs:
        return "running"
    if finished:
        return "finished"
    return "killed" if any(run not in ended for run in started) else "stopped"
