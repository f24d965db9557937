"""A worker receiving cancellations (`cancellable.celery._revokes`): the wrapped revoke
command, Celery's check before the pool, and what a `cancel()` broadcast carries.

Real Celery objects and real Redis (see `tests.celery_worker`); prefork
workers are exercised end to end in ``tests/integration``.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import uuid

import celery
import pytest
import redis
from celery import Celery
from celery.worker import state as worker_state
from celery.worker.control import Panel
from structlog.testing import capture_logs
from tests.celery_runtime import running_worker
from tests.celery_worker import (  # noqa: F401 - fixtures, found by pytest by name
    REDIS_URL,
    Messages,
    app_fixture,
    box_fixture,
    clean_worker_state,
    ledger_entries,
    make_app,
    messages_fixture,
    revoke,
    rt_fixture,
    running,
)

import cancellable.celery  # noqa: F401 - activates the integration (patches at worker start)
from cancellable import CancelReason
from cancellable.celery import _celery_internals as celery_internals
from cancellable.celery._activation import install_patches
from cancellable.celery._poller import Poller
from cancellable.celery._revokes import (
    _grace_from,
    _reason_from,
    revoke_command,
    targets_from,
)
from cancellable.celery._runtime import WorkerRuntime, runtime

#: Celery 5.6 and later mark a revoked id REVOKED in the result backend at once;
#: earlier releases leave it PENDING until a worker receives the task.
CELERY_MARKS_REVOKED = tuple(map(int, celery.__version__.split(".")[:2])) >= (5, 6)


class TestWithoutAWorker:
    """The patches act only while a worker runs in this process."""

    def test_without_a_running_worker_celerys_handler_runs_alone(self, app: Celery) -> None:
        """No worker runtime active here: the wrapper is Celery's handler, nothing
        indexed or recorded, even for a cancel() payload."""
        install_patches()
        task_id = str(uuid.uuid4())

        revoke(app, task_id, cancellable={"source": "revoked", "message": "x"})

        assert runtime().worker is None
        assert task_id in worker_state.revoked
        assert runtime().tasks.index.match(task_id) is None
        assert [] == ledger_entries(app)


@pytest.mark.usefixtures("rt")
class TestRevokeHandler:
    """The wrapper around Celery's own revoke command (`revoke_command`, `_on_revoke`)."""

    def test_wrapper_is_installed_once(self) -> None:
        """Installing again does not wrap the handler twice."""
        install_patches()
        handler = Panel.data["revoke"]

        install_patches()
        wrapped_again = celery_internals.wrap_revoke_command(revoke_command)

        assert handler is Panel.data["revoke"]
        assert not wrapped_again
        assert "revoke" == handler._cancellable_original.__name__  # type: ignore[attr-defined]

    def test_plain_revoke_is_recorded_and_indexed(self, rt: WorkerRuntime, app: Celery) -> None:
        """A plain revoke: Celery's own bookkeeping, plus a ledger entry and an index
        entry with source "revoked"."""
        task_id = str(uuid.uuid4())

        revoke(app, task_id)
        entries = ledger_entries(app)
        indexed = rt.index.match(task_id)

        assert task_id in worker_state.revoked
        assert ("REVOKED" if CELERY_MARKS_REVOKED else "PENDING") == app.AsyncResult(task_id).state
        assert [(("task", task_id),)] == [e.targets for e in entries]
        assert ("revoked", "") == (entries[0].reason.source, entries[0].reason.message)
        assert indexed is not None
        assert "revoked" == indexed.source

    def test_cancel_payload_bypasses_celerys_handler(self, rt: WorkerRuntime, app: Celery) -> None:
        """cancel()'s revoke is indexed with its reason and not passed to Celery's
        handler: no per-id backend write, no revoked-set entry, no second ledger entry;
        the reply has the shape of Celery's own ({"ok": ...})."""
        reason = CancelReason(source="revoked", message="stop", requested_by="alice")
        ids = [str(uuid.uuid4()) for _ in range(3)]

        result = revoke(app, ids, cancellable=reason.to_dict())

        assert {"ok": f"tasks {', '.join(ids)} flagged as revoked"} == result
        assert [reason] * 3 == [rt.index.match(i) for i in ids]
        assert ["PENDING"] * 3 == [app.AsyncResult(i).state for i in ids]
        assert [] == [i for i in ids if i in worker_state.revoked]
        assert [] == ledger_entries(app)

    def test_running_task_in_this_process_is_cancelled(
        self, rt: WorkerRuntime, app: Celery
    ) -> None:
        """A task running here (threads pool) is cancelled directly, with the reason."""
        task_id = str(uuid.uuid4())
        with running(rt, task_id) as entry, capture_logs() as logs:
            revoke(app, task_id, cancellable={"source": "revoked", "message": "halt"})

        assert entry.revoked()
        assert "halt" == entry.scope.cancel_reason.message  # type: ignore[union-attr]
        assert ["local"] == [e["how"] for e in logs if e["event"] == "cancel.delivered"]

    def test_a_reason_another_version_sent_keeps_every_target(
        self, rt: WorkerRuntime, app: Celery
    ) -> None:
        """A cancel() payload this version cannot read as a reason (an unknown source,
        a message of another type, extra fields), with a target of an extra field and
        one of an unknown kind, is still a cancel() revoke: its task, group and root
        targets are indexed with the degraded reason (source "revoked", no message),
        and it is not recorded again (its sender did).  Before, it became a plain
        revoke and lost its group and root targets (issue 18, point 9)."""
        task_id = str(uuid.uuid4())

        revoke(
            app,
            task_id,
            cancellable={"source": "not-a-source", "message": 5, "v": 2},
            cancellable_targets=[["group", "g", {"more": 1}], ["root", "r"], ["tag", "t"]],
        )

        found = [
            rt.index.match(task_id),
            rt.index.match(None, "g"),
            rt.index.match(None, None, "r"),
        ]
        assert [("revoked", "")] * 3 == [(r.source, r.message) for r in found if r is not None]
        assert [] == ledger_entries(app)
        assert task_id not in worker_state.revoked

    def test_reasons_from_a_payload(self) -> None:
        """No payload is a plain revoke (None); any payload gives a reason."""
        assert _reason_from(None) is None
        reason = _reason_from(42)
        assert reason is not None
        assert ("revoked", "", None) == (reason.source, reason.message, reason.requested_by)
        text = _reason_from("stop now")
        assert text is not None
        assert ("revoked", "stop now") == (text.source, text.message)

    def test_ledger_down_is_logged_not_raised(self, rdb: redis.Redis) -> None:
        """A plain revoke with the ledger unreachable still revokes; the ledger thread's
        write fails with an event and keeps the record queued for its next attempt."""
        app = make_app(cancellable_ledger_url="redis://127.0.0.1:1/0")
        task_id = str(uuid.uuid4())

        with running_worker(app) as rt, capture_logs() as logs:
            revoke(app, task_id)
            written = Poller(rt).flush()
            pending = rt.writes.take()

        assert task_id in worker_state.revoked
        assert rt.index.match(task_id) is not None
        assert not written
        assert "ledger.unavailable" in [e["event"] for e in logs]
        assert [[("task", task_id)]] == [list(item.targets) for item in pending]
        app.close()

    def test_running_cancellable_task_is_not_marked_revoked_by_celery(
        self, rt: WorkerRuntime, app: Celery, messages: Messages
    ) -> None:
        """A plain revoke of a @cancellable task this worker runs leaves its state to
        the task (it stores REVOKED itself once its cleanup is done): Celery 5.6's
        handler, which stores REVOKED at once for every id, does not see it.  A plain
        task's id still goes to Celery's handler."""
        ours = messages.request(name="ws.cancellable_job")
        theirs = messages.request(name="ws.job")
        for request in (ours, theirs):
            worker_state.task_reserved(request)
            worker_state.task_accepted(request)

        result = revoke(app, [ours.id, theirs.id])

        assert {"ok": f"tasks {ours.id}, {theirs.id} flagged as revoked"} == result
        assert "PENDING" == app.AsyncResult(ours.id).state
        assert {ours.id, theirs.id} <= set(worker_state.revoked)
        assert rt.index.match(ours.id) is not None

    def test_terminate_is_left_to_celery(self, rt: WorkerRuntime, app: Celery) -> None:
        """revoke(terminate=True) goes to Celery alone: nothing indexed or recorded."""
        task_id = str(uuid.uuid4())

        revoke(app, task_id, terminate=True, signal="SIGTERM")

        assert task_id in worker_state.revoked
        assert rt.index.match(task_id) is None
        assert [] == ledger_entries(app)


@pytest.mark.usefixtures("rt")
class TestRequestPatches:
    """Celery's pre-pool check (``Request.revoked``) consults the index, and its
    discard stores the recorded reason."""

    def test_an_indexed_task_is_discarded_with_its_reason(
        self, rt: WorkerRuntime, app: Celery, messages: Messages
    ) -> None:
        """Indexed but not in Celery's revoked set: revoked() is True, the request
        leaves the worker and REVOKED carries the recorded reason."""
        request = messages.held()
        reason = CancelReason(source="revoked", message="stop", requested_by="alice")
        rt.index.add([("task", request.id)], reason)
        before = request.id in worker_state.revoked

        discarded = request.revoked()
        result = app.AsyncResult(request.id)

        assert (False, True) == (before, discarded)
        assert "REVOKED" == result.state
        assert "revoked by alice: stop" == str(result.result)
        assert request.id not in worker_state.requests

    def test_discarded_even_when_celerys_revoked_set_is_full(
        self, app: Celery, messages: Messages, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bulk cancel larger than Celery's revoked set (here 100 ids, full of
        others) is still honoured for every id, with its reason."""
        monkeypatch.setattr(worker_state.revoked, "maxlen", 100)
        worker_state.revoked.update(f"other-{n}" for n in range(100))
        ids = [str(uuid.uuid4()) for _ in range(300)]
        reason = CancelReason(source="revoked", message="bulk")
        revoke(app, ids, cancellable=reason.to_dict())
        first, last = messages.request(ids[0]), messages.request(ids[-1])

        discarded = (first.revoked(), last.revoked())

        assert (True, True) == discarded
        assert 100 >= len(worker_state.revoked)
        assert ["revoked: bulk"] * 2 == [str(app.AsyncResult(i).result) for i in (ids[0], ids[-1])]

    @pytest.mark.parametrize("kind", ["group", "root"])
    def test_matched_through_its_group_or_root(
        self, rt: WorkerRuntime, app: Celery, messages: Messages, kind: str
    ) -> None:
        """A request whose group id or root id is a live target is discarded too."""
        target = str(uuid.uuid4())
        option = {"group_id": target} if kind == "group" else {"root_id": target}
        request = messages.request(**option)
        rt.index.add([(kind, target)], CancelReason(source="revoked", message=kind))  # type: ignore[list-item]

        discarded = request.revoked()

        assert discarded
        assert f"revoked: {kind}" == str(app.AsyncResult(request.id).result)

    def test_a_request_not_in_the_index_is_untouched(
        self, rt: WorkerRuntime, app: Celery, messages: Messages
    ) -> None:
        """Not indexed and not revoked: revoked() is False and nothing is stored."""
        rt.index.add([("task", "someone-else")], CancelReason())
        request = messages.held()

        discarded = request.revoked()

        assert not discarded
        assert "PENDING" == app.AsyncResult(request.id).state
        assert request.id in worker_state.requests
        assert request.id not in worker_state.revoked

    def test_celerys_own_revoke_keeps_celerys_reason(self, app: Celery, messages: Messages) -> None:
        """An id only in Celery's revoked set is discarded with Celery's "revoked"."""
        request = messages.request()
        worker_state.revoked.add(request.id)

        discarded = request.revoked()

        assert discarded
        assert "revoked" == str(app.AsyncResult(request.id).result)


class TestBroadcastPayload:
    """What the revoke interceptor takes from a `cancel()` broadcast, and what it drops."""

    def test_targets_keep_the_valid_ones(self) -> None:
        """Group and root targets pass; malformed items are dropped, not raised."""
        payload = [
            ["group", "g-1"],
            ("root", "r-1"),
            ["no-such-kind", "x"],
            ["group"],
            "group:g-2",
            ["task", "x" * 1025],
            ["root", ""],
        ]

        assert [("group", "g-1"), ("root", "r-1")] == targets_from(payload)
        assert [] == targets_from(None)
        assert [] == targets_from({"group": "g"})
        # A later version may add fields after [kind, id]: the target is kept.
        assert [("group", "g-3")] == targets_from([["group", "g-3", {"scope": "all"}]])

    @pytest.mark.parametrize(
        ("payload", "expected"),
        [(0, 0.0), (2, 2.0), (0.5, 0.5), (-1, None), (float("inf"), None), (float("nan"), None),
         (True, None), ("3", None), (None, None)],
    )  # fmt: skip
    def test_grace_is_a_finite_number_of_seconds(self, payload: object, expected: object) -> None:
        """The grace travels as a number; anything else (or inf, NaN, < 0) is no grace."""
        assert expected == _grace_from(payload)
