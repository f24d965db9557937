"""A worker's local index of live cancellations (`cancellable.celery._index`)."""

from __future__ import annotations

import uuid

from celery.app.task import Context

from cancellable import CancelReason
from cancellable.celery._index import TargetIndex, request_targets
from cancellable.celery._ledger import Entry


class TestTargetIndex:
    """Adding, matching, syncing and expiring targets."""

    def test_first_reason_wins(self) -> None:
        """A target keeps the reason it was first given; add() returns only new targets."""
        index = TargetIndex()
        first = CancelReason(source="revoked", message="first")

        new_first = index.add([("task", "a")], first)
        new_second = index.add([("task", "a"), ("task", "b")], CancelReason(message="second"))

        assert [("task", "a")] == new_first
        assert [("task", "b")] == new_second
        assert first == index.match("a")
        assert "second" == index.match("b").message  # type: ignore[union-attr]
        assert 2 == len(index)

    def test_match_by_task_group_or_root(self) -> None:
        """A task matches through its own id, its group id or its root id; kinds do
        not mix (a group target does not match a task id that happens to equal it)."""
        index = TargetIndex()
        by_group = CancelReason(message="group")
        by_root = CancelReason(message="root")
        index.add([("group", "g")], by_group)
        index.add([("root", "r")], by_root)

        assert by_group == index.match("t1", "g", None)
        assert by_root == index.match("t2", None, "r")
        assert by_group == index.match("t3", "g", "r")
        assert index.match("g") is None
        assert index.match("t4", "other", "other") is None
        assert index.match(None) is None

    def test_match_request_with_a_celery_context(self) -> None:
        """match_request reads id, group and root_id from Celery's task Context."""
        index = TargetIndex()
        reason = CancelReason(message="root")
        index.add([("root", "workflow")], reason)
        context = Context(id=str(uuid.uuid4()), group=None, root_id="workflow")

        assert reason == index.match_request(context)
        assert (context.id, None, "workflow") == request_targets(context)

    def test_add_entries_in_order(self) -> None:
        """Ledger entries are indexed in order with their recording time."""
        index = TargetIndex()
        early = Entry((("task", "a"),), CancelReason(message="early"), 100.0)
        late = Entry((("task", "a"), ("task", "b")), CancelReason(message="late"), 200.0)

        added = index.add_entries([early, late])

        assert [("task", "a"), ("task", "b")] == added
        assert "early" == index.match("a").message  # type: ignore[union-attr]

    def test_purge_drops_expired_targets(self) -> None:
        """purge() drops targets recorded before the TTL horizon, of every kind."""
        index = TargetIndex()
        index.add([("task", "old"), ("group", "old-g")], CancelReason(), recorded_at=100.0)
        index.add([("root", "new")], CancelReason(), recorded_at=1000.0)

        dropped = index.purge(ttl=500.0, now=1200.0)

        assert 2 == dropped
        assert index.match("old", "old-g") is None
        assert index.match("x", None, "new") is not None

    def test_a_forked_index_keeps_targets_and_cursor_with_its_own_lock(self) -> None:
        """forked() (a pool child) sees every target and the cursor, behind a new lock."""
        index = TargetIndex()
        reason = CancelReason(message="before the fork")
        index.add([("task", "a"), ("group", "g"), ("root", "r")], reason)
        index.cursor = "5-0"

        child = index.forked()

        assert [reason] * 3 == [
            child.match("a"),
            child.match("x", "g"),
            child.match("x", None, "r"),
        ]
        assert ("5-0", 3) == (child.cursor, len(child))
        assert child.lock is not index.lock
