"""Canvas semantics: downstream ids, REVOKED ends, workflow targets, fail-fast settings.

Canvases are applied for real to a Redis broker (DB 12, flushed per test)
with no worker consuming; the messages Celery published are read back and
turned into the task ``Context`` a worker would build from them, so the
walker sees exactly what Celery puts in ``request.chain``, ``callbacks`` and
``chord``.  Running workers are exercised in
``tests/integration/test_workflows.py``.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group
from celery.app.task import Context
from celery.exceptions import TaskRevokedError
from celery.result import GroupResult
from tests import redis_dbs
from tests.celery_runtime import running_worker

import cancellable.celery as cc
from cancellable import CancelReason
from cancellable.celery import _failfast, _index, _workflow
from cancellable.celery._runtime import runtime

REDIS_URL = redis_dbs.url(redis_dbs.UNIT_DB)


def make_app(**conf: Any) -> Celery:
    """An app on Redis DB 12 with one task, ``t``, a private queue name, and ``conf``."""
    name = f"cwf-{uuid.uuid4().hex[:8]}"
    app = Celery(name, broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    app.conf.control_exchange = name
    app.conf.task_default_queue = name
    app.conf.update(conf)

    @app.task(name=f"{name}.t")
    def t(*args: Any) -> None:
        """Never runs: no worker consumes the queue."""

    return app


@pytest.fixture(name="app")
def app_fixture(rdb: redis.Redis) -> Iterator[Celery]:
    """An app on Redis DB 12 with one task, ``t``, and a private queue name."""
    app = make_app()
    yield app
    app.close()


def published(app: Celery, rdb: redis.Redis) -> dict[str, Context]:
    """The messages on the app's queue, as the task ``Context`` a worker builds, by task id."""
    contexts = {}
    for raw in rdb.lrange(app.conf.task_default_queue, 0, -1):
        message = json.loads(raw)
        headers = message["headers"]
        _args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
        contexts[headers["id"]] = Context({**headers, **embed})
    return contexts


def t(app: Celery, *args: Any) -> Any:
    """A signature of the app's task."""
    return app.signature(f"{app.main}.t", args=args)


class TestDownstream:
    """`downstream_ids` on the messages Celery really sends."""

    def test_chain_lists_the_later_links(self, app: Celery, rdb: redis.Redis) -> None:
        """The running first link of a chain of three would send the other two."""
        result = chain(t(app, 1), t(app), t(app)).apply_async()
        (first,) = published(app, rdb).values()

        assert {result.id, result.parent.id} == set(_workflow.downstream_ids(first))

    def test_chord_header_member_lists_the_body(self, app: Celery, rdb: redis.Redis) -> None:
        """Each header member of a chord carries the body."""
        result = chord([t(app, i) for i in range(3)], t(app)).apply_async()
        members = published(app, rdb)

        assert 3 == len(members)
        for member in members.values():
            assert [result.id] == list(_workflow.downstream_ids(member))

    def test_group_in_a_chain_lists_members_and_body(self, app: Celery, rdb: redis.Redis) -> None:
        """chain(a, group(b, c), d): ``a`` would send b, c (a chord header) and d (its body)."""
        result = chain(t(app, 1), group(t(app), t(app)), t(app)).apply_async()
        (first,) = published(app, rdb).values()
        members = [m.id for m in result.parent.results]

        assert {*members, result.id} == set(_workflow.downstream_ids(first))

    def test_group_of_plain_tasks_lists_nothing(self, app: Celery, rdb: redis.Redis) -> None:
        """Members of a plain group send nothing after them."""
        group(t(app, 1), t(app, 2)).apply_async()

        for member in published(app, rdb).values():
            assert [] == list(_workflow.downstream_ids(member))

    def test_links_are_downstream_too(self, app: Celery, rdb: redis.Redis) -> None:
        """An explicit ``link`` callback (and its own link) count as downstream."""
        callback = t(app).set(task_id="cb")
        callback.link(t(app).set(task_id="cb-of-cb"))
        t(app, 1).apply_async(link=callback)
        (first,) = published(app, rdb).values()

        assert ["cb", "cb-of-cb"] == list(_workflow.downstream_ids(first))

    def test_malformed_embeds_are_ignored(self) -> None:
        """Garbage in a message's canvas fields yields no ids and no error."""
        context = Context({"id": "x", "chain": "nonsense", "callbacks": [1, None], "chord": 3})

        assert [] == list(_workflow.downstream_ids(context))


class TestRevokeMember:
    """`revoke_member` stores REVOKED for a member and everything after it."""

    def test_chain_member_and_later_links_end_revoked(self, app: Celery, rdb: redis.Redis) -> None:
        """The member and both later links are REVOKED with the reason; get() raises it."""
        result = chain(t(app, 1), t(app), t(app)).apply_async()
        first_id, context = next(iter(published(app, rdb).items()))
        reason = CancelReason(source="revoked", message="stop the chain", requested_by="ann")

        _workflow.revoke_member(app.backend, first_id, reason, context)

        for node in (result, result.parent, result.parent.parent):
            assert "REVOKED" == app.AsyncResult(node.id).state
        with pytest.raises(TaskRevokedError, match="revoked by ann: stop the chain"):
            result.get(timeout=1)

    def test_store_result_false_still_ends_the_rest(self, app: Celery, rdb: redis.Redis) -> None:
        """With ``store_result=False`` (ignore_result) only the member's own state is skipped."""
        result = chord([t(app, i) for i in range(2)], t(app)).apply_async()
        member_id, context = next(iter(published(app, rdb).items()))

        _workflow.revoke_member(
            app.backend, member_id, CancelReason(source="revoked"), context, store_result=False
        )

        assert "PENDING" == app.AsyncResult(member_id).state
        assert "REVOKED" == app.AsyncResult(result.id).state


class TestWorkflowIndex:
    """The index treats a root target as "the workflow this id belongs to"."""

    def test_root_target_naming_a_later_link_matches_the_first(
        self, app: Celery, rdb: redis.Redis
    ) -> None:
        """("root", <third link>) matches the first link, which would send it."""
        result = chain(t(app, 1), t(app), t(app)).apply_async()
        (first,) = published(app, rdb).values()
        index = _index.TargetIndex()
        reason = CancelReason(source="revoked", message="w")

        assert index.match_request(first) is None
        index.add([("root", result.id)], reason)

        assert reason == index.match_request(first)
        assert reason == index.match_workflow(first)
        assert index.has("root", result.id)
        assert not index.has("group", result.id)

    def test_root_target_matches_its_own_id(self) -> None:
        """A root target names the task with that id, whatever the task's root id."""
        index = _index.TargetIndex()
        reason = CancelReason(source="revoked")
        index.add([("root", "me")], reason)

        assert reason == index.match_request(Context({"id": "me", "root_id": "other"}))
        assert index.match_request(Context({"id": "you", "root_id": "other"})) is None

    def test_task_target_does_not_reach_upstream(self, app: Celery, rdb: redis.Redis) -> None:
        """cancel(<third link>) without workflow=True does not cancel the first link."""
        result = chain(t(app, 1), t(app), t(app)).apply_async()
        (first,) = published(app, rdb).values()
        index = _index.TargetIndex()
        index.add([("task", result.id)], CancelReason(source="revoked"))

        assert index.match_request(first) is None


class TestClientPlan:
    """What `cancel` records and marks for the results it is given."""

    def test_group_result_is_one_group_target(self, app: Celery) -> None:
        """cancel(group_result) of 5,000 members records one entry with one target."""
        members = [app.AsyncResult(str(uuid.uuid4())) for _ in range(5000)]
        result = GroupResult(str(uuid.uuid4()), members, app=app)

        cc.cancel(result, "batch")
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [(("group", result.id),)] == [e.targets for e in entries]

    def test_workflow_of_a_chain_names_its_root_and_marks_unsent_links(
        self, app: Celery, rdb: redis.Redis
    ) -> None:
        """A held chain: the root (first link) and the held id; links 2 and 3 marked REVOKED.

        The first link is queued, not finished: the others cannot have been
        sent, so the client marks them at once.  The first stays PENDING
        until a worker discards it.
        """
        result = chain(t(app, 1), t(app), t(app)).apply_async()
        first = result.parent.parent

        cc.cancel(result, "whole chain", workflow=True)
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [(("root", result.id), ("root", first.id))] == [e.targets for e in entries]
        assert "PENDING" == app.AsyncResult(first.id).state
        assert "REVOKED" == app.AsyncResult(result.parent.id).state
        with pytest.raises(TaskRevokedError, match="whole chain"):
            result.get(timeout=1)

    def test_workflow_of_a_chord_names_its_header_group_and_marks_the_body(
        self, app: Celery, rdb: redis.Redis
    ) -> None:
        """A held chord: the header's group target, and the unsent body REVOKED."""
        result = chord([t(app, i) for i in range(3)], t(app)).apply_async()

        cc.cancel(result, "chord", workflow=True)
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [(("root", result.id), ("group", result.parent.id))] == [e.targets for e in entries]
        assert "REVOKED" == app.AsyncResult(result.id).state
        for member in result.parent.results:
            assert "PENDING" == app.AsyncResult(member.id).state

    def test_group_of_chains_names_each_chain_by_its_first_link(self, app: Celery) -> None:
        """group(chain(a, b), c): the group, plus a root target for a (it carries no group id)."""
        result = group(chain(t(app, 1), t(app)), t(app, 3)).apply_async()
        chained, _plain = result.results

        cc.cancel(result)
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [(("group", result.id), ("root", chained.parent.id))] == [e.targets for e in entries]

    def test_bare_id_climbs_the_stored_parent_ids(self, app: Celery) -> None:
        """A bare id whose stored meta names a parent and a group: root and group targets."""
        from celery import states

        parent_id, child_id, group_id = (str(uuid.uuid4()) for _ in range(3))
        app.backend.store_result(parent_id, 1, states.SUCCESS)
        app.backend.store_result(
            child_id, 2, states.SUCCESS, request=Context(parent_id=parent_id, group=group_id)
        )

        targets, seen = _workflow.workflow_targets(app, [child_id])

        assert [("root", child_id), ("root", parent_id), ("group", group_id)] == targets
        assert {child_id: "SUCCESS", parent_id: "SUCCESS"} == seen

    def test_bare_unknown_id_is_its_own_root(self, app: Celery) -> None:
        """Nothing stored: the id alone, as a root target."""
        task_id = str(uuid.uuid4())

        assert ([("root", task_id)], {}) == _workflow.workflow_targets(app, [task_id])

    def test_empty_id_is_refused(self, app: Celery) -> None:
        """An empty id in workflow mode is a ValueError, before anything is sent."""
        with pytest.raises(ValueError, match="non-empty"):
            cc.cancel(" ", workflow=True, app=app)


class TestFailFastOption:
    """Who opts in to fail-fast."""

    def test_task_option_and_app_setting(self, app: Celery) -> None:
        """The task option wins; the app setting is the default; off unless chosen."""
        opting = make_app(cancellable_cancel_siblings_on_failure=True)

        @app.task(name=f"{app.main}.opted", cancel_siblings_on_failure=True)
        def opted() -> None:
            """Opted in."""

        @app.task(name=f"{app.main}.silent")
        def silent() -> None:
            """Follows the app setting (off)."""

        @opting.task(name=f"{opting.main}.declined", cancel_siblings_on_failure=False)
        def declined() -> None:
            """Opted out explicitly."""

        @opting.task(name=f"{opting.main}.silent")
        def silent_in_opting() -> None:
            """Follows the app setting (on)."""

        assert _failfast.wants_fail_fast(opted)
        assert not _failfast.wants_fail_fast(silent)
        assert _failfast.wants_fail_fast(silent_in_opting)
        assert not _failfast.wants_fail_fast(declined)
        opting.close()


class TestClientPlanGroups:
    """Groups inside the held tree."""

    def test_group_after_a_link_is_named_by_the_root_and_marked(
        self, app: Celery, rdb: redis.Redis
    ) -> None:
        """chain(a, group(b, c)) held as its GroupResult: root a; b and c (unsent) REVOKED."""
        result = chain(t(app, 1), group(t(app), t(app))).apply_async()
        first = result.parent

        cc.cancel(result, "after a", workflow=True)
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [(("root", first.id),)] == [e.targets for e in entries]
        for member in result.results:
            assert "REVOKED" == app.AsyncResult(member.id).state
        assert "PENDING" == app.AsyncResult(first.id).state

    def test_nested_group_results_each_get_a_group_target(self, app: Celery) -> None:
        """A GroupResult holding a GroupResult: both group ids, no member ids."""
        inner = GroupResult("inner", [app.AsyncResult("i1"), app.AsyncResult("i2")], app=app)
        outer = GroupResult("outer", [inner, app.AsyncResult("o1")], app=app)

        cc.cancel(outer)
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [(("group", "outer"), ("group", "inner"))] == [e.targets for e in entries]

    def test_result_with_an_empty_id_is_refused(self, app: Celery) -> None:
        """An AsyncResult whose id is blank is a ValueError, before anything is sent."""
        with pytest.raises(ValueError, match="non-empty"):
            cc.cancel(app.AsyncResult(" "), app=app)


class TestFailFastSignal:
    """What the ``task_failure`` receiver records (a real task, its real request stack)."""

    def test_member_of_a_group_records_one_group_target(self, app: Celery) -> None:
        """A failing opted-in member: one group target, in the ledger and this process's index."""

        @app.task(name=f"{app.main}.member", cancel_siblings_on_failure=True)
        def member() -> None:
            """Opted in."""

        member.push_request(id="m1", group="g1")
        try:
            with running_worker(app) as rt:
                _failfast._on_failure(sender=member, task_id="m1", exception=ValueError("bad"))
        finally:
            member.pop_request()
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [(("group", "g1"),)] == [e.targets for e in entries]
        assert "revoked: group member m1 failed: ValueError: bad" == (entries[0].reason.describe())
        assert rt.tasks.index.has("group", "g1")

    def test_outside_a_group_or_not_opted_in_records_nothing(self, app: Celery) -> None:
        """No group id, or no opt-in: nothing is recorded."""

        @app.task(name=f"{app.main}.alone", cancel_siblings_on_failure=True)
        def alone() -> None:
            """Opted in, but not in a group."""

        @app.task(name=f"{app.main}.plain")
        def plain() -> None:
            """Not opted in."""

        alone.push_request(id="a1")
        plain.push_request(id="p1", group="g2")
        try:
            _failfast._on_failure(sender=alone, task_id="a1", exception=ValueError("x"))
            _failfast._on_failure(sender=plain, task_id="p1", exception=ValueError("x"))
        finally:
            alone.pop_request()
            plain.pop_request()
        entries, _ = runtime().ledgers.get(app).read(None)

        assert [] == entries
