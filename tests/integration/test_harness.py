"""Self-tests of the harness, with plain Celery tasks (no cancellable).

They prove that workers start, run tasks, report through Redis and stop
cleanly on both brokers and all four pools, so a failure elsewhere in this
directory is about the library, not the harness.
"""

from __future__ import annotations

import pytest

from .conftest import Keys, pid_alive, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

POOLS = ["prefork", "threads", "solo", "gevent"]
BROKER_NAMES = ["redis", "rabbitmq"]


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
    """Baseline without the library: a revoked running prefork task runs to SUCCESS."""
    worker = make_worker(with_cancellable=False)
    result = worker.send("cit.plain.sleep", keys.key("t"), 1.5)
    wait_for(lambda: keys.started("t"), 15, message="task start")

    result.revoke()

    assert "slept" == result.get(timeout=20)
    assert keys.flag("t", "done") == "1"
