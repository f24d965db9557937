"""Where the interrupt step may land: only in the body of the task it names, never in our code.

The checks of `cancellable.celery._interrupt.Interrupts`, on real threads
and real scopes: `raise_if_asked` (what the wake-up signal handler calls on
the main thread of a prefork child), and the mark it leaves on the process
(`Interrupts.landed`, which retires a prefork child).  Each test has a
`TaskRuntime` of its own.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest

from cancellable import (
    Cancelled,
    CancelReason,
    CancelScope,
    HookTimeoutError,
    _hooks,
    _scope,
    checkpoint,
    on_cancel,
)
from cancellable.celery._registry import RunningTask
from cancellable.celery._runtime import TaskRuntime


def spin(limit: float = 10.0) -> None:
    """Pure Python without a checkpoint (until ``limit``, so a broken budget fails, not hangs)."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        pass


REASON = CancelReason(source="revoked", message="grace over")


@pytest.fixture(name="tasks")
def tasks_fixture() -> TaskRuntime:
    """The runtime of a process that runs tasks (no mailbox: not a prefork child)."""
    return TaskRuntime()


@pytest.fixture(name="entry")
def entry_fixture(tasks: TaskRuntime) -> Iterator[RunningTask]:
    """A registered task running on this thread, inside its scope, asked to be interrupted."""
    with CancelScope() as scope:
        entry = RunningTask("task-1", "t", scope)
        entry.interrupt_reason = REASON
        tasks.running.register(entry)
        try:
            yield entry
        finally:
            tasks.running.unregister(entry)


class TestRaiseIfAsked:
    """`raise_if_asked`, as the signal handler calls it on the task's thread."""

    def test_raises_in_the_body_with_the_reason(
        self, tasks: TaskRuntime, entry: RunningTask
    ) -> None:
        """Window open: Cancelled with the reason, and the ending says "interrupted"."""
        tasks.interrupts.open_window(entry)
        with pytest.raises(Cancelled) as info:
            tasks.interrupts.raise_if_asked()
        tasks.interrupts.close_window(entry)

        assert REASON == info.value.reason
        assert entry.ended_by is not None
        assert entry.ended_by.startswith("interrupted")

    def test_marks_the_process_once_it_lands(self, tasks: TaskRuntime, entry: RunningTask) -> None:
        """Only an interrupt that lands marks the process (a prefork child then retires)."""
        tasks.interrupts.raise_if_asked()  # window closed: nothing lands
        marked_before = tasks.interrupts.landed
        tasks.interrupts.open_window(entry)
        with pytest.raises(Cancelled):
            tasks.interrupts.raise_if_asked()
        tasks.interrupts.close_window(entry)

        assert not marked_before
        assert tasks.interrupts.landed

    def test_a_hook_budget_raised_into_marks_the_process(self, tasks: TaskRuntime) -> None:
        """A cleanup hook's budget that raises at an arbitrary bytecode marks the process too.

        `TaskRuntime.child_started` gives the core that permission with
        `Interrupts.mark_landed` in a prefork child that will be retired.
        """
        take_back = _hooks.allow_async_raise(tasks.interrupts.mark_landed)
        try:
            with CancelScope(hook_timeout=0.05) as scope:
                on_cancel(spin)
                scope.cancel()
                checkpoint()
        finally:
            take_back()

        assert tasks.interrupts.landed
        assert [HookTimeoutError] == [type(error) for error in scope.cleanup_errors]

    def test_not_outside_the_body(self, tasks: TaskRuntime, entry: RunningTask) -> None:
        """Window closed (boundary code before or after the body): nothing happens."""
        tasks.interrupts.raise_if_asked()

        assert entry.ended_by is None

    def test_not_while_the_core_holds_its_lock(
        self, tasks: TaskRuntime, entry: RunningTask
    ) -> None:
        """This thread holds the core's lock: the interrupt waits for the next signal."""
        tasks.interrupts.open_window(entry)
        with _scope._lock:
            tasks.interrupts.raise_if_asked()
        with pytest.raises(Cancelled):
            tasks.interrupts.raise_if_asked()
        tasks.interrupts.close_window(entry)

    def test_not_inside_a_shield(self, tasks: TaskRuntime, entry: RunningTask) -> None:
        """Cleanup hooks run in a shield, and user shields are respected too."""
        tasks.interrupts.open_window(entry)
        with CancelScope(shield=True):
            tasks.interrupts.raise_if_asked()
        tasks.interrupts.close_window(entry)

        assert entry.ended_by is None

    def test_only_once_per_task(self, tasks: TaskRuntime, entry: RunningTask) -> None:
        """After one interrupt, later signals do not land in the code that handles it."""
        tasks.interrupts.open_window(entry)
        with pytest.raises(Cancelled):
            tasks.interrupts.raise_if_asked()
        try:
            tasks.interrupts.raise_if_asked()  # e.g. in the body's finally block
        finally:
            tasks.interrupts.close_window(entry)

    def test_not_while_the_signal_interrupted_library_code(
        self, tasks: TaskRuntime, entry: RunningTask
    ) -> None:
        """The frame the signal arrived in is cancellable's own: wait for the next signal.

        A scope's ``__exit__`` before it takes the core's lock, or the run of
        queued work, must not be cut in half; user code is fair game.
        """
        tasks.interrupts.open_window(entry)
        try:
            tasks.interrupts.raise_if_asked(sys._getframe().f_back)  # pytest's own frame: fair game
        except Cancelled:
            pass
        else:
            raise AssertionError("did not raise in user code")
        entry.interruptible = True
        library_frame = _frame_of(_scope.current_scope)
        tasks.interrupts.raise_if_asked(library_frame)
        # Code of another module (the standard library, a callback) called
        # by the library's bookkeeping: the stack still says "not now".
        called: list[object] = []
        _scope._fire([(lambda reason: called.append(sys._getframe()), REASON)])
        tasks.interrupts.raise_if_asked(called[0])
        tasks.interrupts.close_window(entry)

        assert "cancellable._scope" == library_frame.f_globals["__name__"]
        assert "cancellable._scope" == called[0].f_back.f_globals["__name__"]  # type: ignore[attr-defined]

    def test_not_for_a_task_of_another_thread(self, tasks: TaskRuntime) -> None:
        """An entry running on another thread is never interrupted from this one."""
        ready = threading.Event()
        done = threading.Event()
        holder: list[RunningTask] = []

        def run() -> None:
            with CancelScope() as scope:
                entry = RunningTask("task-2", "t", scope)
                entry.interrupt_reason = REASON
                tasks.running.register(entry)
                tasks.interrupts.open_window(entry)
                holder.append(entry)
                ready.set()
                done.wait(5)
                tasks.interrupts.close_window(entry)
                tasks.running.unregister(entry)

        thread = threading.Thread(target=run)
        thread.start()
        ready.wait(5)
        try:
            tasks.interrupts.raise_if_asked()
        finally:
            done.set()
            thread.join(5)

        assert holder[0].ended_by is None

    def test_not_for_a_task_that_was_not_asked(self, tasks: TaskRuntime) -> None:
        """A running task with no interrupt request (and no mailbox slot): nothing."""
        with CancelScope() as scope:
            entry = RunningTask("task-3", "t", scope)
            tasks.running.register(entry)
            tasks.interrupts.open_window(entry)
            try:
                tasks.interrupts.raise_if_asked()
            finally:
                tasks.interrupts.close_window(entry)
                tasks.running.unregister(entry)

        assert entry.ended_by is None


def _frame_of(function: object) -> object:
    """A real frame of ``function`` (its globals are those of its module)."""
    frames: list[object] = []

    def tracer(frame: object, event: str, arg: object) -> None:
        if event == "call" and getattr(frame, "f_code", None) is getattr(function, "__code__", 0):
            frames.append(frame)

    previous = sys.getprofile()
    sys.setprofile(tracer)
    try:
        function()  # type: ignore[operator]
    finally:
        sys.setprofile(previous)
    return frames[0]
