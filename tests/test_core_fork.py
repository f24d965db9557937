"""Fork safety of the core: a child never inherits a lock held by a thread it does not have.

Each test forks for real.  The child does its work under an alarm (so a
deadlock kills it instead of hanging the suite), reports through a pipe, and
leaves with ``os._exit``; the parent waits with a timeout of its own.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from cancellable import Cancelled, CancelScope, _hooks, _scope, checkpoint, on_cancel
from cancellable.testing import capture_events

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(os, "register_at_fork"),
    reason="needs os.fork and os.register_at_fork",
)

#: Seconds a child may take before its alarm kills it (a deadlock).
CHILD_ALARM = 5
#: Seconds the parent waits for a child before killing it.
PARENT_WAIT = 15.0


def fork_and_report(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work()`` in a forked child; return what it reported, or fail on a hang or crash."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which coverage does not follow
        code = 1
        try:
            os.close(read_end)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(CHILD_ALARM)
            report = work()
            os.write(write_end, json.dumps(report).encode())
            code = 0
        except BaseException as exc:
            os.write(write_end, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + PARENT_WAIT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            raise AssertionError(f"the forked child did not finish in {PARENT_WAIT}s")
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    if os.WIFSIGNALED(status):
        raise AssertionError(
            f"the forked child was killed by signal {os.WTERMSIG(status)} (SIGALRM: it deadlocked)"
        )
    report: dict[str, Any] = json.loads(data) if data else {}

    assert 0 == os.waitstatus_to_exitcode(status), report
    return report


def enter_cancel_check() -> dict[str, Any]:
    """In the child: the bookkeeping it started with, then a scope entered, cancelled, caught."""
    started = {
        "pending": _scope._pending,
        "cancelled_live": _scope._cancelled_live,
        "stack": len(_scope._get_stack()),
    }
    with CancelScope() as scope:
        scope.cancel("in the child")
        checkpoint()
        raise AssertionError("checkpoint() did not raise in a cancelled scope")
    return {
        **started,
        "caught": scope.cancelled_caught,
        "pending_after": _scope._pending,
    }


class TestLockAcrossFork:
    def test_fork_while_another_thread_holds_the_lock(self, spawn):
        """A fork while another thread holds the scope lock waits for it; the child can use scopes.

        Without the at-fork handlers the child would inherit the lock held
        by a thread that does not exist there, and its first scope would
        wait forever (here: until the child's alarm kills it).
        """
        held = threading.Event()

        def hold_the_lock():
            with _scope._lock:
                held.set()
                time.sleep(0.3)

        holder = spawn(hold_the_lock)
        assert held.wait(5)
        report = fork_and_report(enter_cancel_check)
        holder.result()

        assert {
            "pending": False,
            "cancelled_live": 0,
            "stack": 0,
            "caught": True,
            "pending_after": False,
        } == report

    def test_fork_while_another_thread_keeps_taking_the_lock(self, spawn):
        """Repeated forks while another thread enters and cancels scopes never deadlock.

        Events are captured, not printed: structlog's default PrintLogger
        guards its file with a lock of its own that has no at-fork handling,
        so a fork while the other thread prints could leave the child stuck
        in structlog, which is not what this test is about.
        """
        stop = threading.Event()

        def churn():
            rounds = 0
            while not stop.is_set():
                with CancelScope() as scope:
                    scope.cancel()
                rounds += 1
            return rounds

        with capture_events():
            churner = spawn(churn)
            try:
                reports = [fork_and_report(enter_cancel_check) for _ in range(10)]
            finally:
                stop.set()
                rounds = churner.result()

        assert rounds > 0
        assert all(report["caught"] for report in reports)
        assert all(report["cancelled_live"] == 0 for report in reports)

    def test_parent_lock_is_released_after_the_fork(self):
        """In the parent, the lock taken for the fork is released again."""
        fork_and_report(dict)
        acquired = _scope._lock.acquire(timeout=2)
        if acquired:
            _scope._lock.release()

        assert acquired
        assert not _scope._lock._is_owned()  # type: ignore[attr-defined]


class TestChildBookkeeping:
    def test_another_threads_cancelled_scope_does_not_count_in_the_child(self, spawn):
        """The child does not inherit a cancelled scope of a thread it does not have.

        In the parent that scope keeps the pending flag up (every checkpoint
        takes a closer look); in the child it can never exit, so counting it
        would keep every checkpoint there slower for the child's whole life.
        """
        cancelled = threading.Event()
        release = threading.Event()

        def hold_a_cancelled_scope():
            with CancelScope() as scope:
                scope.cancel("parent thread")
                cancelled.set()
                assert release.wait(10)
                checkpoint()

        runner = spawn(hold_a_cancelled_scope)
        assert cancelled.wait(5)
        parent = (_scope._pending, _scope._cancelled_live)
        try:
            report = fork_and_report(enter_cancel_check)
        finally:
            release.set()
        runner.result()

        assert (True, 1) == parent
        assert (False, 0, True) == (report["pending"], report["cancelled_live"], report["caught"])

    def test_the_forking_threads_own_cancelled_scope_still_counts(self):
        """A cancelled scope of the forking thread stays cancelled, and counted, in the child."""

        def check_in_child() -> dict[str, Any]:
            state = {"pending": _scope._pending, "cancelled_live": _scope._cancelled_live}
            try:
                checkpoint()
            except Cancelled as exc:
                state["raised"] = exc.reason.message
            return state

        with CancelScope() as scope:
            scope.cancel("before the fork")
            report = fork_and_report(check_in_child)
            checkpoint()

        assert {"pending": True, "cancelled_live": 1, "raised": "before the fork"} == report
        assert scope.cancelled_caught

    def test_child_can_run_hooks_with_a_budget(self):
        """In the child the timer starts afresh, so a hook budget still works there."""

        def hooks_in_child() -> dict[str, Any]:
            ran = []
            with CancelScope(hook_timeout=5.0) as scope:
                on_cancel(ran.append, "hook")
                scope.cancel()
                checkpoint()
            return {"ran": ran, "errors": len(scope.cleanup_errors)}

        assert {"ran": ["hook"], "errors": 0} == fork_and_report(hooks_in_child)


class TestHookBudgetsAcrossFork:
    def test_permission_to_raise_anywhere_is_not_inherited(self):
        """A child forked from a process that lets budgets raise anywhere does not.

        The permission comes from an integration that will retire the process
        that gave it (a Celery prefork child), not the processes it forks.
        """
        take_back = _hooks.allow_async_raise(lambda: None)
        try:
            report = fork_and_report(lambda: {"allowed": _hooks.async_raise_allowed()})
            here = _hooks.async_raise_allowed()
        finally:
            take_back()

        assert ({"allowed": False}, True) == (report, here)

    def test_child_keeps_only_its_own_running_budget_with_a_free_lock(self, monkeypatch):
        """After a fork, the forking thread's budget gets a new lock; other threads' are dropped.

        The timer thread may hold a budget's lock at the moment of the fork;
        the child, which has no timer thread, must not wait for it.
        """
        mine = _hooks._Budget()
        theirs = _hooks._Budget()
        theirs.thread_id = -1  # a thread that does not exist in the child
        mine.lock.acquire()  # as if the timer thread were inside expire()
        monkeypatch.setattr(_hooks, "_running", {mine, theirs})
        held = mine.lock
        _hooks._after_fork_in_child()

        assert {mine} == _hooks._running
        assert mine.lock is not held
        assert not mine.lock.locked()
        held.release()
