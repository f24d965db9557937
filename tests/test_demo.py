"""``python -m cancellable demo``: the README's first command, run for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery.result import AsyncResult
from tests import redis_dbs

from cancellable import _demo


class TestDemo:
    """The demo runs a real prefork worker on the filesystem transport."""

    def test_demo_cancels_a_running_and_a_queued_task(self) -> None:
        """Exit 0; the running task ends REVOKED with its reason, the queued one never ran;
        the receipt says stopped at a checkpoint; the worker's events print in time order,
        each at a signed offset from the cancel() call, the worker's start line with where
        it keeps cancellations."""
        run = subprocess.run(
            [sys.executable, "-m", "cancellable", "demo"],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        assert 0 == run.returncode, run.stdout + run.stderr
        out = run.stdout
        assert (
            "first  REVOKED  TaskRevokedError('revoked by alice: user pressed stop "
            "(stopped at a checkpoint"
        ) in out
        receipt_line = r"receipt\.wait\(\): \S+: stopped at a checkpoint after \d+ ms \(REVOKED: "
        assert re.search(receipt_line, out)
        assert "third  REVOKED  TaskRevokedError('revoked')" in out
        assert "second SUCCESS" in out
        assert "cleanup hook of 'first' ran: True" in out
        assert "'third' ever started: False" in out
        names = ("cancel.delivered", "cancel.requested", "cancel.observed", "task.cancelled")
        at = [out.find(f" {name} ") for name in names]
        assert -1 not in at, out
        assert sorted(at) == at, out
        # Offsets are signed once ("-798 ms" for the worker's start, never
        # "+-798 ms"), and the start line says where cancellations are kept.
        assert "+-" not in out, out
        ledger_line = next(line for line in out.splitlines() if " ledger.in_use " in line)
        assert re.match(r"\s+-\d+ ms\s+ledger\.in_use\s+\{.*\"where\": \"\S", ledger_line), out

    def test_usage(self) -> None:
        """Without a command it prints usage; an unknown command exits 2."""
        plain = subprocess.run(
            [sys.executable, "-m", "cancellable"], capture_output=True, text=True, timeout=60
        )
        unknown = subprocess.run(
            [sys.executable, "-m", "cancellable", "frobnicate"],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert 2 == plain.returncode
        assert "usage: python -m cancellable demo" in plain.stdout
        assert 2 == unknown.returncode
        assert "unknown command 'frobnicate'" in unknown.stderr

    def test_demo_help_prints_usage(self) -> None:
        """``demo --help`` prints the demo's usage and options, not a module docstring."""
        run = subprocess.run(
            [sys.executable, "-m", "cancellable", "demo", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert 0 == run.returncode
        assert run.stdout.startswith("usage: python -m cancellable demo")
        assert "--broker" in run.stdout
        assert "``" not in run.stdout

    def test_unreachable_broker_is_one_clear_line(self) -> None:
        """A broker that refuses connections: exit 2 and one line on stderr, no traceback."""
        run = subprocess.run(
            [sys.executable, "-m", "cancellable", "demo", "--broker", "redis://127.0.0.1:1/0"],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert 2 == run.returncode
        assert 1 == len(run.stderr.strip().splitlines()), run.stderr
        assert run.stderr.startswith("demo: cannot reach the broker at redis://127.0.0.1:1/0")

    def test_redis_broker_keeps_results_and_ledger_there(self) -> None:
        """With ``--broker redis://.../N``, results and the ledger go to database N."""
        url = redis_dbs.url(redis_dbs.DEMO_DB)
        run = subprocess.run(
            [sys.executable, "-m", "cancellable", "demo", "--broker", url],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        assert 0 == run.returncode, run.stdout + run.stderr
        ids = re.findall(r"(?:first|second|third)=([0-9a-f-]{36})", run.stdout)
        assert 3 == len(ids), run.stdout
        here = redis.Redis.from_url(url)
        default = redis.Redis.from_url(redis_dbs.url(0))
        try:
            assert [1, 1, 1] == [here.exists(f"celery-task-meta-{i}") for i in ids]
            assert [0, 0, 0] == [default.exists(f"celery-task-meta-{i}") for i in ids]
            entries = here.xrange("cancellable:cancellable-demo:ledger")
            named = {line for _id, fields in entries for line in fields[b"targets"].split(b"\n")}
            assert f"task:{ids[0]}".encode() in named
        finally:
            here.close()
            default.close()


class TestDemoBroker:
    """The demo's filesystem broker never hands a reader a half-written message."""

    def test_broadcasts_that_take_long_to_write_all_reach_the_worker(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Five plain revokes of 4 MB each reach the demo's real worker, which lives on.

        Writing one takes longer than the worker's 50 ms poll.  kombu's own
        filesystem transport creates a message file under its final name and
        then writes it, so the worker read a cut-off revoke and exited on
        "Unrecoverable error: JSONDecodeError" (under load, the same happened
        to small messages: the demo's "timed out ... waiting for the worker to
        take note of the revoke").  The demo's transport renames complete
        files into place: every revoke is stored REVOKED and the worker runs on.
        """
        monkeypatch.setenv("CANCELLABLE_DEMO_DIR", str(tmp_path))
        app = _demo._make_app()
        node = f"demo-broker-{os.getpid()}@localhost"
        log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "cancellable._demo", "worker",
                "-P", "prefork", "-c", "1", "-n", node, "-l", "warning",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
            env={**os.environ, "CANCELLABLE_DEMO_DIR": str(tmp_path)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(destination=[node], timeout=0.5):
                assert time.monotonic() < deadline, "the worker never answered a ping"
            ids = [str(uuid.uuid4()) for _ in range(5)]
            for task_id in ids:
                # Celery's revoke takes (and ignores) extra keyword arguments.
                app.control.broadcast(
                    "revoke", arguments={"task_id": task_id, "padding": "x" * 4_000_000}
                )
            results = [AsyncResult(task_id, app=app) for task_id in ids]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and worker.poll() is None:
                if all(result.state == "REVOKED" for result in results):
                    break
                time.sleep(0.1)
            states = [result.state for result in results]
            alive = worker.poll() is None
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            log.close()

        assert ["REVOKED"] * 5 == states, (tmp_path / "worker.log").read_text()[-3000:]
        assert alive
