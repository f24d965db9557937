"""The harness on tasks that do not use the library: what the soak relies on
holds before ``@cancellable`` is involved.

* a private AOF Redis keeps queued messages across a restart;
* the event files record every execution, and a SIGKILLed run is told
  apart (its pid is in the kill record) from the redelivered run that
  follows (``task_reject_on_worker_lost``);
* ``app.control.revoke`` of queued tasks keeps them from starting, and the
  backend (read with ``cache=False``) says REVOKED;
* the audit passes all of this, and it flags tasks that do not stop;
* the private Redis's AOF shows a message taken off the queue and never
  recorded as unacknowledged (what a worker killed right after its ``BRPOP``
  leaves), and nothing else;
* a worker behind the soak's TCP proxy (`tests.proxy`) survives a cut of all
  its connections: its running task runs once, to SUCCESS, and the worker
  answers pings and serves tasks again once the proxy accepts connections;
* the plan's connection cuts and the choice of ledger (``CANCELLABLE_SOAK_LEDGER``);
* a worker that outlives its stop timeout logs its threads' stacks before it is killed.

The workers here run with ``SOAK_WITH_CANCELLABLE=0``: the task module does
not import `cancellable`, and its tasks are not ``@cancellable``.  The
worker's main process still loads the integration, because ``celery``
imports the package's ``celery.commands`` entry point (the ``cancel``
sub-command) at start-up, so its revoke interceptor and ledger are there;
what is missing is the task side (scopes, checkpoints, hooks).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest
from tests.proxy import TcpProxy

from . import aof
from .audit import CancelRecord, KillRecord, TaskRecord, audit, runs_of
from .driver import Soak
from .harness import RedisServer, Worker, free_port, phase_of, read_events, wait_for, worker_env
from .plan import ENV_CUTS, ENV_LEDGER, make_plan, mode_from_env
from .settings import make_app


@pytest.mark.soak
@pytest.mark.timeout(180)
def test_harness_on_plain_celery(tmp_path: Path) -> None:
    """Kill -9, redelivery, revoke of queued tasks and a Redis restart, on plain tasks."""
    if RedisServer.binary() is None:
        pytest.fail("the soak needs redis-server (e.g. apt-get install redis-server); not found")
    uid = uuid.uuid4().hex[:8]
    name = queue = f"soak-self-{uid}"
    events_dir = tmp_path / "events"
    events_dir.mkdir()
    server = RedisServer(tmp_path / "redis", free_port(random.Random()))
    server.start()
    app = make_app(
        main=name, redis_url=server.url, queue=queue, control_exchange=name, visibility_timeout=20
    )
    env = worker_env(
        app_name=name,
        redis_url=server.url,
        queue=queue,
        control_exchange=name,
        run_dir=tmp_path,
        visibility_timeout=20,
        with_cancellable=False,
    )
    worker = Worker.make(run_dir=tmp_path, queue=queue, concurrency=2, env=env, label="self")
    tasks: dict[str, TaskRecord] = {}
    try:
        # Queue everything while no worker runs, restart Redis: the AOF keeps it.
        for i in range(6):
            task_id = str(uuid.uuid4())
            tasks[task_id] = TaskRecord(task_id, "no_checkpoint", [1.5], time.time())
            app.send_task("soak.plain", args=[1.5 if i < 4 else 0.2], task_id=task_id)
        ids = list(tasks)
        server.restart(0.2)
        client = server.client()
        assert 6 == client.llen(queue)
        client.close()

        # Start the worker, then revoke the last two, still queued behind the
        # first four (concurrency 2, prefetch 1, 1.5 s each).
        worker.spawn()
        worker.wait_ready(app, 2)
        phases = {t: phase_of(read_events(events_dir, t)) for t in ids[4:]}
        t_begin = time.time()
        app.control.revoke(ids[4:])
        revoke = CancelRecord(1, "control", ids[4:], t_begin, time.time(), phases)
        assert {"queued"} == set(phases.values()), phases

        # Kill -9 the child running the first task once it has started.
        first = wait_for(
            lambda: next(
                (e for e in read_events(events_dir, ids[0]) if e["ev"] == "started"), None
            ),
            30,
            message="the first task to start",
        )
        os.kill(first["pid"], signal.SIGKILL)
        kill = KillRecord(time.time(), "child", {first["pid"]}, worker.name)

        backend = app.backend

        def final() -> bool:
            states = {t: backend.get_task_meta(t, cache=False)["status"] for t in ids}
            return all(s in ("SUCCESS", "REVOKED") for s in states.values())

        wait_for(final, 60, interval=0.3, message="every task to end")
        metas = {t: dict(backend.get_task_meta(t, cache=False)) for t in ids}
        events = {t: read_events(events_dir, t) for t in ids}
    finally:
        worker.stop()
        app.close()
        server.stop()

    runs, problems = runs_of(events[ids[0]], [kill])
    assert [] == problems
    assert 2 == len(runs), runs
    assert runs[0].killed
    assert not runs[1].killed
    assert runs[1].redelivered
    for task_id in ids[4:]:
        assert [] == events[task_id], f"revoked queued task {task_id} ran"
        assert "REVOKED" == metas[task_id]["status"]
    report = audit(tasks, [revoke], [kill], events, metas, grace=1.0)
    assert [] == report.violations, report.summary()
    assert "after a kill -9" == next(v for v in report.verdicts if v.task_id == ids[0]).duplicate


@pytest.mark.soak
@pytest.mark.timeout(180)
def test_audit_catches_tasks_that_do_not_stop(tmp_path: Path) -> None:
    """A small soak whose workers run the same tasks, not ``@cancellable``.

    Nothing can stop such a task once it runs, so the audit must flag the
    cancelled running ones, and nothing about the harness.
    """
    if RedisServer.binary() is None:
        pytest.fail("the soak needs redis-server (e.g. apt-get install redis-server); not found")
    mode = dataclasses.replace(
        mode_from_env({"CANCELLABLE_SOAK_SEED": "7"}),
        duration=8.0,
        tasks=12,
        workers=1,
        child_kills=0,
        worker_kills=0,
        redis_restarts=0,
        hangs=0,
        connection_cuts=0,
        groups=0,
        cancel_fraction=0.6,
        long_seconds=(3.0, 4.0),
        weights={"long": 1.0},
        drain_timeout=30.0,
    )
    report = Soak(make_plan(mode), tmp_path, with_cancellable=False).run()
    rules = {v.rule for v in report.violations}
    print(report.summary("soak without the library (violations expected):"))

    assert "a cancelled task ran on past its checkpoints" in rules, report.summary()
    assert not {r for r in rules if r.startswith("harness") or "vanished" in r}, report.summary()
    assert all(v.status == "SUCCESS" for v in report.verdicts if v.category == "uncancelled")


@pytest.mark.soak
@pytest.mark.timeout(60)
def test_the_aof_names_a_message_popped_and_never_recorded(tmp_path: Path) -> None:
    """The broker's own record of a message kombu lost (`aof.unrecorded_pops`).

    Three task messages on the soak's Redis.  A real kombu channel takes the
    first and the third (``basic_get``, which records each as unacknowledged,
    as a worker's consumer does); a bare ``BRPOP`` takes the second, as a
    worker does just before it is killed.  Only the second is named, with the
    times of the deliveries recorded around its pop.
    """
    if RedisServer.binary() is None:
        pytest.fail("the soak needs redis-server (e.g. apt-get install redis-server); not found")
    name = queue = f"soak-aof-{uuid.uuid4().hex[:8]}"
    server = RedisServer(tmp_path / "redis", free_port(random.Random()))
    server.start()
    app = make_app(
        main=name, redis_url=server.url, queue=queue, control_exchange=name, visibility_timeout=20
    )
    kept, lost, third = (str(uuid.uuid4()) for _ in range(3))
    try:
        for task_id in (kept, lost, third):
            app.send_task("soak.plain", args=[0], task_id=task_id)
        client = server.client()
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            got_first = channel.basic_get(queue, no_ack=False)
            assert client.brpop([queue], timeout=5) is not None
            got_third = channel.basic_get(queue, no_ack=False)
            got_first.ack()
        client.close()
        commands = aof.read_commands(server.directory)
    finally:
        app.close()
        server.stop()

    assert [kept, third] == [got_first.headers["id"], got_third.headers["id"]]
    assert commands is not None
    pops = aof.unrecorded_pops(commands, queue)
    assert pops is not None
    assert [lost] == list(pops)
    after, before = pops[lost].after, pops[lost].before
    assert after is not None
    assert before is not None
    assert after <= before


@pytest.mark.soak
@pytest.mark.timeout(120)
def test_a_worker_behind_the_proxy_survives_a_cut(tmp_path: Path) -> None:
    """Cut every connection of a plain worker (broker, result backend) mid-task.

    The proxy drops them and refuses new ones for 1.5 s.  Redis redelivers
    nothing on a lost connection, so the task runs once, to SUCCESS; the
    worker reconnects through the proxy, answers a ping and runs another task.
    """
    if RedisServer.binary() is None:
        pytest.fail("the soak needs redis-server (e.g. apt-get install redis-server); not found")
    name = queue = f"soak-cut-{uuid.uuid4().hex[:8]}"
    events_dir = tmp_path / "events"
    events_dir.mkdir()
    server = RedisServer(tmp_path / "redis", free_port(random.Random()))
    server.start()
    proxy = TcpProxy("127.0.0.1", server.port)
    app = make_app(
        main=name, redis_url=server.url, queue=queue, control_exchange=name, visibility_timeout=20
    )
    env = worker_env(
        app_name=name,
        redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        queue=queue,
        control_exchange=name,
        run_dir=tmp_path,
        visibility_timeout=20,
        with_cancellable=False,
    )
    worker = Worker.make(run_dir=tmp_path, queue=queue, concurrency=1, env=env, label="cut")
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        worker.spawn()
        worker.wait_ready(app, 1)
        assert proxy.connections() > 0, "the worker does not go through the proxy"
        app.send_task("soak.plain", args=[3.0], task_id=first)
        wait_for(lambda: read_events(events_dir, first), 30, message="the task to start")
        proxy.cut()
        assert 0 == proxy.connections()
        time.sleep(1.5)
        proxy.restore()
        wait_for(lambda: worker.pings(app, 1.0), 60, interval=0.5, message="a ping after the cut")
        app.send_task("soak.plain", args=[0.1], task_id=second)
        backend = app.backend

        def ended() -> bool:
            states = [backend.get_task_meta(t, cache=False)["status"] for t in (first, second)]
            return all(s == "SUCCESS" for s in states)

        wait_for(ended, 60, interval=0.3, message="both tasks to end SUCCESS")
        events = read_events(events_dir, first)
    finally:
        worker.stop()
        app.close()
        proxy.close()
        server.stop()

    assert ["started", "finished"] == [e["ev"] for e in events], events


def test_the_plan_cuts_connections() -> None:
    """Each mode plans its connection cuts (the short mode's all refuse
    connections for a while; some of the long mode's accept again at once),
    reproducibly from the seed."""
    for env in ({"CANCELLABLE_SOAK_SEED": "5", ENV_CUTS: "2"},
                {"CANCELLABLE_SOAK": "long", "CANCELLABLE_SOAK_SEED": "5",
                 "CANCELLABLE_SOAK_MINUTES": "6"}):  # fmt: skip
        mode = mode_from_env(env)
        cuts = [a for a in make_plan(mode).actions if a.kind == "cut_connections"]
        again = [a for a in make_plan(mode).actions if a.kind == "cut_connections"]

        assert mode.connection_cuts == len(cuts) > 0
        assert [(a.at, a.params) for a in cuts] == [(a.at, a.params) for a in again]
        for action in cuts:
            refuse = action.params["refuse_for"]
            assert (
                refuse == 0.0 or mode.cut_refuse_seconds[0] <= refuse <= mode.cut_refuse_seconds[1]
            )
            assert 0.1 * mode.duration <= action.at <= 0.85 * mode.duration
            if not mode.instant_cuts:
                assert refuse >= mode.cut_refuse_seconds[0] > 0


def test_the_ledger_is_chosen_by_environment() -> None:
    """Redis by default; ``postgresql`` on request; anything else is refused."""
    assert "redis" == mode_from_env({}).ledger
    assert "postgresql" == mode_from_env({ENV_LEDGER: "PostgreSQL"}).ledger
    with pytest.raises(ValueError, match=ENV_LEDGER):
        mode_from_env({ENV_LEDGER: "mysql"})


def test_the_number_of_cuts_is_chosen_by_environment() -> None:
    """``CANCELLABLE_SOAK_CUTS`` replaces the mode's number of cuts (0: none planned;
    the short mode, in ``make test``, has two by default)."""
    assert 2 == mode_from_env({}).connection_cuts
    assert 0 == mode_from_env({ENV_CUTS: "0"}).connection_cuts
    assert 3 == mode_from_env({ENV_CUTS: "3"}).connection_cuts
    none = mode_from_env({ENV_CUTS: "0", "CANCELLABLE_SOAK": "long", "CANCELLABLE_SOAK_SEED": "5"})

    assert 0 == none.connection_cuts
    assert not [a for a in make_plan(none).actions if a.kind == "cut_connections"]
    assert 6 == mode_from_env({ENV_CUTS: "6", "CANCELLABLE_SOAK": "long"}).connection_cuts
    with pytest.raises(ValueError, match=ENV_CUTS):
        mode_from_env({ENV_CUTS: "some"})


@pytest.mark.soak
@pytest.mark.timeout(120)
def test_a_worker_that_outlives_its_stop_logs_its_threads(tmp_path: Path) -> None:
    """`Worker.stop` of a worker still busy after the timeout: it gets SIGUSR1
    first (Celery logs every thread's stack to the worker's log), then SIGKILL."""
    if RedisServer.binary() is None:
        pytest.fail("the soak needs redis-server (e.g. apt-get install redis-server); not found")
    name = queue = f"soak-stop-{uuid.uuid4().hex[:8]}"
    (tmp_path / "events").mkdir()
    server = RedisServer(tmp_path / "redis", free_port(random.Random()))
    server.start()
    app = make_app(
        main=name, redis_url=server.url, queue=queue, control_exchange=name, visibility_timeout=20
    )
    env = worker_env(
        app_name=name,
        redis_url=server.url,
        queue=queue,
        control_exchange=name,
        run_dir=tmp_path,
        visibility_timeout=20,
        with_cancellable=False,
    )
    worker = Worker.make(run_dir=tmp_path, queue=queue, concurrency=1, env=env, label="stop")
    task_id = str(uuid.uuid4())
    try:
        worker.spawn()
        worker.wait_ready(app, 1)
        app.send_task("soak.plain", args=[30.0], task_id=task_id)
        wait_for(lambda: read_events(tmp_path / "events", task_id), 30, message="the task")
        began = time.monotonic()
        worker.stop(timeout=2.0)  # a warm shutdown waits for the plain task
        took = time.monotonic() - began
    finally:
        worker.stop()
        app.close()
        server.stop()

    assert not worker.alive()
    assert took < 15, took
    log = worker.log_path.read_text(errors="replace")
    assert "MainThread" in log, worker.tail()
    assert "LOCAL VARIABLES" in log, worker.tail()
