"""Self-tests of the harness, with plain Celery tasks (no cancellable).

They prove that workers start, run tasks, report through Redis and stop
cleanly on both brokers and all four pools, so a failure elsewhere in this
directory is about the library, not the harness.
"""

from __future__ import annotations

import celery
import pytest

from .conftest import Keys, pid_alive, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

POOLS = ["prefork", "threads", "solo", "gevent"]
BROKER_NAMES = ["redis", "rabbitmq"]

#: The Celery minor the suite runs on (its plain revoke differs on 5.6).
CELERY_MINOR = tuple(int(part) for part in celery.__version__.split(".")[:2])


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_worker_runs_plain_tasks_and_stops_cleanly(make_worker, keys: Keys, broker, pool):
    """A worker starts, runs plain tasks in the expected processes, and exits 0 on SIGTERM."""
    worker = make_worker(broker=broker, pool=pool, with_cancellable=False)

    assert 5 == worker.send("cit.plain.add", 2, 3).get(timeout=20)

    pids = {worker.send("cit.plain.pid", keys.key("p")).get(timeout=20) for _ in range(4)}
    children = worker.children()
    if pool == "prefork":
        assert len(children) == worker.concurrency
        assert pids <= children
    else:
        assert {worker.pid} == pids
    assert {str(p) for p in pids} == set(keys.list("p", "pids"))

    worker.stop()

    assert 0 == worker.proc.returncode, f"stopped in {worker.stop_seconds:.1f}s"
    assert not any(pid_alive(c) for c in children)


def test_plain_revoke_of_running_prefork_task_does_not_stop_it(make_worker, keys: Keys):
    """Baseline without the library: a revoked running prefork task runs to its end
    (SUCCESS; on Celery 5.6, REVOKED at once, then its SUCCESS)."""
    worker = make_worker(with_cancellable=False)
    result = worker.send("cit.plain.sleep", keys.key("t"), 1.5)
    wait_for(lambda: keys.started("t"), 15, message="task start")

    result.revoke()

    if CELERY_MINOR == (5, 6):
        # Celery 5.6 stores REVOKED at once for every revoked id, the running
        # task included; the task runs on and its SUCCESS replaces it (5.7
        # skips running tasks).
        def state() -> str:
            return str(worker.app.AsyncResult(result.id).state)

        wait_for(lambda: state() == "REVOKED", 10, message="Celery 5.6's REVOKED")
        wait_for(lambda: state() == "SUCCESS", 20, message="the task's own SUCCESS")
    else:
        assert "slept" == result.get(timeout=20)
    assert keys.flag("t", "done") == "1"


def test_a_busy_session_lock_fails_fast_with_its_cause(tmp_path):
    """A second session finds the lock taken: it fails within its wait, naming the holder.

    The second session runs on another database (10) so as not to touch this
    session's lock; a pytest-timeout must not be what ends it.
    """
    import os
    import subprocess
    import sys
    import time

    import redis
    from tests import redis_dbs

    from .conftest import REPO_ROOT, SESSION_LOCK_KEY

    other = redis_dbs.url(10)
    client = redis.Redis.from_url(other, decode_responses=True)
    client.set(SESSION_LOCK_KEY, "session test-holder (pid 1 on elsewhere)", ex=60)
    began = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
             "tests/integration/test_harness.py::test_worker_runs_plain_tasks_and_stops_cleanly"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "CIT_REDIS_URL": other, "CIT_LOCK_WAIT": "2"},
        )  # fmt: skip
    finally:
        client.delete(SESSION_LOCK_KEY)
        client.close()
    took = time.monotonic() - began

    assert 0 != run.returncode
    assert "session test-holder (pid 1 on elsewhere)" in run.stdout, run.stdout[-2000:]
    assert "Timeout" not in run.stdout
    assert took < 60, f"the second session took {took:.0f}s to give up"
