"""Revoking a RUNNING ``@cancellable`` task on a real worker.

Acceptance items (a) running revoke, (b) only the revoked one stops,
(c) every way of revoking, (g) the ``current_task.request.revoked()`` idiom,
(k) ``terminate=True`` keeps Celery's meaning.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from celery import group
from celery.exceptions import TaskRevokedError

from .conftest import (
    REPO_ROOT,
    Keys,
    Worker,
    assert_revoked,
    pid_alive,
    task_meta,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BROKER_NAMES = ["redis", "rabbitmq"]
PROCESS_POOLS = ["prefork", "threads"]


def start_loop(worker: Worker, keys: Keys, name: str, seconds: float = 20.0):
    """Send ``cit.loop`` and wait until its body is inside the checkpoint loop."""
    result = worker.send("cit.loop", keys.key(name), seconds)
    wait_for(
        lambda: keys.flag(name, "looping"),
        20,
        message=lambda: f"task {name} to start looping ({task_meta(result)['status']})",
    )
    return result


def assert_stopped_at_checkpoint(keys: Keys, name: str) -> None:
    """The body left its loop through a raising checkpoint; its hook ran once."""
    assert "Cancelled" == keys.flag(name, "exc")
    assert keys.flag(name, "done") is None
    assert ["cleanup"] == keys.hooks(name)


def assert_same_processes(worker: Worker, children_before: set[int], task_pid: int) -> None:
    """No pool process was killed or replaced, and the pool still runs tasks."""
    assert worker.alive()
    if worker.pool == "prefork":
        assert task_pid in children_before
        assert pid_alive(task_pid)
        assert children_before == worker.children()
        # The pool still works, on the very same children.
        pids = {worker.send("cit.plain.pid", "cit:pids").get(timeout=20) for _ in range(4)}
        assert pids <= children_before
        assert children_before == worker.children()
    else:
        assert worker.pid == task_pid


@pytest.mark.parametrize("how", ["AsyncResult.revoke", "cancel"])
@pytest.mark.parametrize("pool", PROCESS_POOLS)
@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_revoke_running_task_stops_at_checkpoint(shared_worker, keys: Keys, broker, pool, how):
    """(a) A running task stops at its next checkpoint and ends REVOKED with the reason.

    The hook runs exactly once, the checkpoint raised `Cancelled`, the result
    is a TaskRevokedError carrying "revoked" (plain revoke) or the reason and
    the requester (`cancel`), and no pool process was killed or replaced.
    """
    worker = shared_worker(broker=broker, pool=pool)
    children_before = worker.children()
    result = start_loop(worker, keys, "t")
    task_pid = keys.started("t")[0]

    if how == "cancel":
        from cancellable.celery import cancel

        cancel(result.id, reason="user pressed stop", requested_by="alice", app=worker.app)
        assert_revoked(result, "user pressed stop", "alice")
    else:
        result.revoke()
        assert_revoked(result, "revoked")

    assert_stopped_at_checkpoint(keys, "t")
    assert_same_processes(worker, children_before, task_pid)
    assert ["cleanup"] == keys.hooks("t"), "a hook ran again later"
    assert 1 == keys.runs("t")


@pytest.mark.parametrize("pool", PROCESS_POOLS)
@pytest.mark.parametrize("broker", BROKER_NAMES)
def test_revoke_one_of_two_running_tasks(shared_worker, keys: Keys, broker, pool):
    """(b) Two tasks run side by side (two children); revoking one leaves the other alone."""
    worker = shared_worker(broker=broker, pool=pool)
    victim = start_loop(worker, keys, "victim", seconds=30)
    survivor = start_loop(worker, keys, "survivor", seconds=3)
    if pool == "prefork":
        assert keys.started("victim") != keys.started("survivor"), "both ran in one child"

    victim.revoke()

    assert_revoked(victim, "revoked")
    assert "done" == survivor.get(timeout=20)
    assert "SUCCESS" == survivor.state
    assert keys.flag("survivor", "done") == "1"
    assert [] == keys.hooks("survivor")
    assert_stopped_at_checkpoint(keys, "victim")


def test_app_control_revoke(shared_worker, keys: Keys):
    """(c) ``app.control.revoke(id)`` stops a running task."""
    worker = shared_worker()
    result = start_loop(worker, keys, "t")

    worker.app.control.revoke(result.id)

    assert_revoked(result, "revoked")
    assert_stopped_at_checkpoint(keys, "t")


def test_group_result_revoke(shared_worker, keys: Keys):
    """(c) ``GroupResult.revoke()`` on a group of running tasks stops all of them."""
    worker = shared_worker()
    job = group(
        worker.signature("cit.loop", keys.key("g0"), 20.0),
        worker.signature("cit.loop", keys.key("g1"), 20.0),
    )
    group_result = job.apply_async()
    for name in ("g0", "g1"):
        wait_for(lambda name=name: keys.flag(name, "looping"), 20, message=f"{name} to loop")

    group_result.revoke()

    for member, name in zip(group_result.results, ("g0", "g1"), strict=True):
        assert_revoked(member, "revoked")
        assert_stopped_at_checkpoint(keys, name)


def test_cli_control_revoke(shared_worker, keys: Keys):
    """(c) ``celery -A tests.integration.app control revoke ID`` stops a running task."""
    worker = shared_worker()
    result = start_loop(worker, keys, "t")

    cli = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.app", "control", "revoke",
         result.id],
        cwd=REPO_ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip

    assert 0 == cli.returncode, cli.stdout + cli.stderr
    assert_revoked(result, "revoked")
    assert_stopped_at_checkpoint(keys, "t")


def test_cli_celery_cancel(shared_worker, keys: Keys):
    """(c) The ``celery cancel ID --reason .. --by ..`` sub-command stops a running task."""
    worker = shared_worker()
    result = start_loop(worker, keys, "t")

    cli = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.app", "cancel", result.id,
         "--reason", "cli stop", "--by", "ops"],
        cwd=REPO_ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip

    assert 0 == cli.returncode, cli.stdout + cli.stderr
    line = next((ln for ln in cli.stdout.splitlines() if result.id in ln), "")
    assert "REVOKED" in line, cli.stdout + cli.stderr
    assert_revoked(result, "cli stop", "ops")
    assert_stopped_at_checkpoint(keys, "t")


def test_cli_says_stopped_only_after_the_cleanup_of_the_running_worker(make_worker, keys: Keys):
    """With two workers, ``celery cancel`` reports "stopped" only once cleanup is done.

    Before, the idle worker stored an early REVOKED for the running task, and
    the command printed "stopped" about a second before the hook finished.
    """
    first = make_worker()
    second = make_worker(queue=first.queue, control_exchange=first.control_exchange)
    result = first.send("cit.slow_cleanup", keys.key("t"), 1.5)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the task to loop")

    cli = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.app", "cancel", result.id,
         "--reason", "stop", "--wait", "20"],
        cwd=REPO_ROOT, env=first.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    done_when_cli_returned = keys.flag("t", "cleanup_done")

    assert 0 == cli.returncode, cli.stdout + cli.stderr
    line = next((ln for ln in cli.stdout.splitlines() if ln.startswith(result.id)), "")
    assert line.startswith(f"{result.id}: stopped at a checkpoint after "), cli.stdout
    assert line.endswith(" (REVOKED: revoked: stop)"), cli.stdout
    assert "1" == done_when_cli_returned, "the command said stopped before cleanup ended"
    assert_revoked(result, "stop")
    assert second.alive()


def test_cancel_with_reason_by_id_and_by_results(shared_worker, keys: Keys):
    """(c) ``cancel()`` takes an id, an AsyncResult or a list; the reason reaches the result."""
    from cancellable import CancelReason
    from cancellable.celery import cancel

    worker = shared_worker()
    first = start_loop(worker, keys, "a")
    second = start_loop(worker, keys, "b")

    returned = cancel([first, second.id], reason="quota exceeded", requested_by="billing",
                      app=worker.app)  # fmt: skip

    assert isinstance(returned.reason, CancelReason)
    assert "quota exceeded" == returned.reason.message
    assert "billing" == returned.reason.requested_by
    for result, name in ((first, "a"), (second, "b")):
        assert_revoked(result, "quota exceeded", "billing")
        assert_stopped_at_checkpoint(keys, name)


def test_cancel_single_async_result(shared_worker, keys: Keys):
    """(c) ``cancel(AsyncResult)`` with no reason stops the task; the message says revoked."""
    from cancellable.celery import cancel

    worker = shared_worker()
    result = start_loop(worker, keys, "t")

    cancel(result)

    assert_revoked(result, "revoked")
    assert_stopped_at_checkpoint(keys, "t")


@pytest.mark.parametrize("pool", [*PROCESS_POOLS, "gevent"])
def test_current_task_request_revoked_idiom(shared_worker, keys: Keys, pool):
    """(g) ``current_task.request.revoked()`` is False before a revoke and True after.

    The tutorial loop ``if current_task.request.revoked(): break`` works as
    written inside a ``@cancellable`` task, without any checkpoint.
    """
    worker = shared_worker(pool=pool)
    result = worker.send("cit.idiom", keys.key("t"), 20.0)
    wait_for(lambda: keys.list("t", "revoked"), 20, message="the first revoked() answer")

    result.revoke()

    wait_state(result, ("SUCCESS", "FAILURE", "REVOKED"), 20)
    assert ["False", "True"] == keys.list("t", "revoked"), task_meta(result)
    assert "stopped" == keys.flag("t", "outcome")


def test_revoke_terminate_keeps_celery_meaning(make_worker, keys: Keys):
    """(k) ``revoke(terminate=True)`` terminates the child process; the task ends REVOKED."""
    worker = make_worker()
    children_before = worker.children()
    result = start_loop(worker, keys, "t")
    task_pid = keys.started("t")[0]
    assert task_pid in children_before

    result.revoke(terminate=True)

    exc = assert_revoked(result)
    assert isinstance(exc, TaskRevokedError)
    wait_for(lambda: not pid_alive(task_pid), 15, message=f"child {task_pid} to be terminated")
    assert keys.flag("t", "done") is None


def test_cancel_reason_visible_with_a_second_worker_online(make_worker, keys: Keys):
    """(a) With two workers online, the REVOKED a client first sees already carries the reason.

    Worker B is idle on the same control exchange.  Celery's revoke handler
    on B stores REVOKED("revoked") for any id it does not run whose state is
    still PENDING; the client must nevertheless never read a REVOKED result
    without the reason given to `cancel` (AsyncResult caches the first ready
    result it reads).  (B's REVOKED may be visible before the task on A has
    unwound and run its hooks; that is not asserted either way.)
    """
    from cancellable.celery import cancel

    running = make_worker()
    make_worker(control_exchange=running.control_exchange)
    result = start_loop(running, keys, "t")

    cancel(result.id, reason="user pressed stop", requested_by="alice", app=running.app)

    wait_for(lambda: result.state in ("SUCCESS", "FAILURE", "REVOKED"), 20, interval=0.005,
             message="the task to end")  # fmt: skip
    first_seen = result.result
    assert "REVOKED" == result.state
    assert "user pressed stop" in str(first_seen), f"first REVOKED result read: {first_seen!r}"
    assert "alice" in str(first_seen)
    assert_revoked(result, "user pressed stop", "alice")
    # B may store REVOKED before A's task has unwound: wait for the task itself.
    wait_for(lambda: keys.flag("t", "exc") and keys.hooks("t"), 20, message="the task to unwind")
    wait_for(lambda: not running.active_ids(), 20, message="the running worker to finish")
    assert_stopped_at_checkpoint(keys, "t")
    assert_revoked(result, "user pressed stop", "alice")


@pytest.mark.parametrize("pool", PROCESS_POOLS)
def test_revoke_racing_task_end_never_hits_the_next_task(shared_worker, keys: Keys, pool):
    """(a) A revoke that races the end (or start) of its task never cancels another task.

    Celery warns that a signal aimed at one task can hit the next task the
    process picked up.  Short victims are revoked at random moments around
    their start and end while innocent tasks keep both pool slots busy; every
    victim ends SUCCESS or REVOKED, every innocent task ends SUCCESS with no
    hook run.
    """
    import random

    rng = random.Random(1234)
    worker = shared_worker(pool=pool)
    victims, innocents = [], []
    for i in range(12):
        victim = worker.send("cit.loop", keys.key(f"v{i}"), rng.uniform(0.05, 0.3))
        innocents.append(worker.send("cit.loop", keys.key(f"i{i}"), 0.3))
        time.sleep(rng.uniform(0.0, 0.35))  # deliberately random: the revoke's timing
        victim.revoke()
        victims.append(victim)

    for i, innocent in enumerate(innocents):
        assert "done" == innocent.get(timeout=30), f"innocent task {i} was hit"
        assert [] == keys.hooks(f"i{i}")
    for i, victim in enumerate(victims):
        state = wait_state(victim, ("SUCCESS", "FAILURE", "REVOKED"), 30)
        assert state in ("SUCCESS", "REVOKED"), f"victim {i}: {state} {task_meta(victim)}"
        assert len(keys.hooks(f"v{i}")) <= 1


def test_revoke_in_replacement_child(make_worker, keys: Keys):
    """(a) prefork with --max-tasks-per-child 1: a child forked later still gets the revoke."""
    worker = make_worker(extra_args=("--max-tasks-per-child", "1"))
    first_children = worker.children()
    for i in range(3):
        assert "done" == worker.send("cit.loop", keys.key(f"warm{i}"), 0.05).get(timeout=20)
    wait_for(lambda: len(worker.children()) == 2, 20, message="replacement children")
    result = start_loop(worker, keys, "t")
    task_pid = keys.started("t")[0]
    assert task_pid not in first_children, "the task did not run in a replacement child"

    result.revoke()

    assert_revoked(result, "revoked")
    assert_stopped_at_checkpoint(keys, "t")
