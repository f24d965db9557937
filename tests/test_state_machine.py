"""Random sequences of scope operations checked against a simple reference model.

The model is a list of dicts, one per entered scope (innermost last), holding
the scope's own ``cancelled`` flag, its ``shield`` flag, the first ``reason``
and how many ``hooks`` it has.  "Effectively cancelled" is computed the slow,
obvious way, by walking up the list, which is exactly what the library avoids
doing per checkpoint: the machine checks that the cheap bookkeeping agrees.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from cancellable import Cancelled, CancelScope, _scope, checkpoint, is_cancelled, on_cancel


class ScopeMachine(RuleBasedStateMachine):
    """Drives CancelScope by hand (``__enter__``/``__exit__``) and compares with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[CancelScope] = []
        self.model: list[dict] = []
        self.exited: list[CancelScope] = []
        self.hooks_ran: list[int] = []
        self.counter = 0

    # -- the model ----------------------------------------------------------

    def effective(self) -> list[bool]:
        """Effectively-cancelled flag of each open scope, by walking up from the outermost."""
        flags: list[bool] = []
        for index, entry in enumerate(self.model):
            parent_visible = index > 0 and flags[index - 1] and not entry["shield"]
            flags.append(parent_visible or entry["cancelled"])
        return flags

    def expected_catcher(self) -> int:
        """Index of the scope that absorbs the innermost scope's Cancelled."""
        flags = self.effective()
        index = len(self.model) - 1
        while True:
            entry = self.model[index]
            parent_visible = index > 0 and flags[index - 1] and not entry["shield"]
            if entry["cancelled"] and not parent_visible:
                return index
            index -= 1

    def innermost_cancelled(self) -> bool:
        return bool(self.model) and self.effective()[-1]

    def model_cancel(self, index: int, reason: tuple[str, str]) -> None:
        entry = self.model[index]
        if not entry["cancelled"]:
            entry["cancelled"] = True
            entry["reason"] = reason

    def next_message(self) -> str:
        self.counter += 1
        return f"cancel #{self.counter}"

    # -- rules ----------------------------------------------------------------

    @rule(kind=st.sampled_from(["plain", "shield", "cancelled before entering"]))
    def enter(self, kind: str) -> None:
        """Enter a new innermost scope."""
        scope = CancelScope(shield=kind == "shield")
        entry = {"cancelled": False, "shield": kind == "shield", "reason": None, "hooks": 0}
        if kind == "cancelled before entering":
            message = self.next_message()
            scope.cancel(message)
            entry["cancelled"] = True
            entry["reason"] = ("manual", message)

        assert scope is scope.__enter__()
        self.scopes.append(scope)
        self.model.append(entry)

    @precondition(lambda self: self.scopes)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """Cancel a random open scope (the first reason wins)."""
        index = data.draw(st.integers(0, len(self.scopes) - 1), label="index")
        message = self.next_message()
        self.scopes[index].cancel(message)
        self.model_cancel(index, ("manual", message))

    @precondition(lambda self: self.scopes)
    @rule(data=st.data())
    def expire_deadline(self, data: st.DataObject) -> None:
        """Give a random open scope a deadline that has already passed."""
        index = data.draw(st.integers(0, len(self.scopes) - 1), label="index")
        self.scopes[index].deadline = time.monotonic() - 1
        self.model_cancel(index, ("deadline", "deadline expired"))

    @precondition(lambda self: self.scopes)
    @rule(data=st.data())
    def toggle_shield(self, data: st.DataObject) -> None:
        """Flip the shield of a random open scope."""
        index = data.draw(st.integers(0, len(self.scopes) - 1), label="index")
        self.scopes[index].shield = not self.scopes[index].shield
        self.model[index]["shield"] = not self.model[index]["shield"]

    @precondition(lambda self: self.scopes)
    @rule()
    def register_hook(self) -> None:
        """Register a cleanup hook on the innermost scope."""
        scope_id = id(self.scopes[-1])
        on_cancel(self.hooks_ran.append, scope_id)
        self.model[-1]["hooks"] += 1

    @precondition(lambda self: self.exited)
    @rule(data=st.data())
    def cancel_exited(self, data: st.DataObject) -> None:
        """Cancelling a scope that has exited changes nothing."""
        scope = data.draw(st.sampled_from(self.exited), label="exited scope")
        before = scope.cancel_reason
        scope.cancel(self.next_message())

        assert before is scope.cancel_reason

    @rule()
    def check(self) -> None:
        """checkpoint() raises exactly when the model says the innermost scope is cancelled."""
        expected = self.innermost_cancelled()
        raised = None
        try:
            checkpoint()
        except Cancelled as exc:
            raised = exc

        assert expected == (raised is not None)
        if raised is not None:
            catcher = self.model[self.expected_catcher()]
            assert catcher["reason"] == (raised.reason.source, raised.reason.message)

    @rule()
    def ask(self) -> None:
        """is_cancelled() agrees with the model."""
        assert self.innermost_cancelled() == is_cancelled()

    @precondition(lambda self: self.scopes)
    @rule()
    def exit_innermost(self) -> None:
        """Leave the innermost block, as a ``with`` would after one last checkpoint.

        If that checkpoint raises, the Cancelled unwinds scope after scope
        until the model's catcher absorbs it.
        """
        try:
            checkpoint()
        except Cancelled as exc:
            raised = exc
        else:
            raised = None

        if raised is None:
            assert not self.innermost_cancelled()
            scope = self.scopes.pop()
            self.model.pop()
            assert scope.__exit__(None, None, None) is False
            assert not scope.cancelled_caught
            self.exited.append(scope)
            return

        catcher = self.expected_catcher()
        expected_hooks: list[int] = []
        while len(self.scopes) > catcher:
            scope = self.scopes.pop()
            entry = self.model.pop()
            expected_hooks.extend([id(scope)] * entry["hooks"])
            caught = scope.__exit__(Cancelled, raised, None)
            self.exited.append(scope)

            assert (len(self.scopes) == catcher) == caught
            assert caught == scope.cancelled_caught
        assert expected_hooks == self.hooks_ran
        self.hooks_ran.clear()

    # -- invariants ---------------------------------------------------------

    @invariant()
    def bookkeeping_matches(self) -> None:
        """The stack is our list; _pending is up exactly while an open scope is cancelled.

        (No deferred work or probes exist here, so _shared_work stays down.)
        The thread's innermost scope, which the hot path reads, is the top of
        the stack.
        """
        assert self.scopes == _scope._get_stack()
        assert (self.scopes[-1] if self.scopes else None) is _scope.current_scope()
        live = sum(entry["cancelled"] for entry in self.model)
        assert live == _scope._cancelled_live
        assert (live > 0) is _scope._pending
        assert _scope._shared_work is False
        assert [] == self.hooks_ran

    def teardown(self) -> None:
        """Exit what is still open, innermost first, then check that nothing is left."""
        try:
            while self.scopes:
                self.scopes.pop().__exit__(None, None, None)
        finally:
            leftover = list(_scope._get_stack())
            pending = _scope._pending
            with _scope._lock:
                _scope._get_stack().clear()
                _scope._local.innermost = None
                _scope._cancelled_live = 0
                _scope._update_pending()

        assert [] == leftover
        assert pending is False


ScopeMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


class TestScopeStateMachine(ScopeMachine.TestCase):
    """Random nest / cancel / shield / deadline / exit sequences agree with the model."""
