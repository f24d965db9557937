"""The compact task-id table of a worker's index (`cancellable.celery._idtable`).

Exact membership however ids are added (one at a time, in batches, by a
paged bulk load), ids that share the sorted half of a member are not
members, non-UUID ids are kept too, a forked child's table shares its
parent's buffers, and an id costs 20 bytes.
"""

from __future__ import annotations

import random
import threading
import uuid

import pytest

from cancellable import CancelReason
from cancellable.celery._idtable import TaskIdTable, uuid_halves, uuid_key, uuid_keys
from cancellable.celery._index import TargetIndex
from cancellable.celery._ledger import Entry


def near(task_id: str) -> str:
    """Another canonical UUID with the same high 64 bits as ``task_id``."""
    while True:
        digits = task_id.replace("-", "")[:16] + uuid.uuid4().hex[16:]
        other = str(uuid.UUID(digits))
        if other != task_id:
            return other


class TestUuidKey:
    """A canonical UUID and its 128-bit number convert one to one; nothing else converts."""

    def test_canonical_ids_convert(self) -> None:
        """str(uuid4()) converts to its own .int, one at a time and in a batch."""
        ids = [str(uuid.uuid4()) for _ in range(100)]
        assert [uuid.UUID(i).int for i in ids] == [uuid_key(i) for i in ids]
        assert [uuid.UUID(i).int for i in ids] == uuid_keys(ids)

    @pytest.mark.parametrize(
        "task_id",
        [
            "6F9619FF-8B86-D011-B42D-00C04FC964FF",  # upper case
            "6f9619ff8b86d011b42d00c04fc964ff",  # no dashes
            "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
            "6f9619ff-8b86-d011-b42d-00c04fc964f ",  # a space for a digit
            "6f9619ff-8b86-d011-b42d- 0c04fc964ff",
            "6f9619ff-8b86-d011-b42d-00c04fc964fg",
            "6f9619ff-8b86-d011-b42d-00c04fc96_ff",
            "6f9619ff-8b86-d011-b42d_00c04fc964ff",
            "6f9619ff-8b86-d011-b42d-00c04fc964f\u0661",  # a non-ASCII digit
            "+f9619ff-8b86-d011-b42d-00c04fc964ff",
            "6f9619ff-8b86-d011-b42d--0c04fc964ff",
            "6f9619ff-8b86-d011-b42d-00c04fc964ff0",
            "",
        ],
    )
    def test_anything_else_does_not(self, task_id: str) -> None:
        """An id that is not exactly a lower-case canonical UUID has no number, alone or
        in a batch of canonical ones (so it is kept as text, exactly)."""
        assert uuid_key(task_id) is None
        batch = [str(uuid.uuid4()), task_id, str(uuid.uuid4())]
        assert uuid_keys(batch) is None
        assert uuid_halves(batch) is None


class TestExactness:
    """Members are found, non-members never, whatever the path that added them."""

    def test_random_adds_match_a_set(self) -> None:
        """Singles, batches and a staged bulk load, with repeats, custom ids and ids that
        share the high half of a member: the table answers exactly like a set, and each
        id keeps the slot it was first given."""
        rng = random.Random(22)
        table: TaskIdTable[str] = TaskIdTable()
        first: dict[str, int] = {}
        members: list[str] = []

        def fresh(n: int) -> list[str]:
            ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
            ids += [f"custom-{rng.random()}" for _ in range(n // 50)]
            ids += rng.sample(members, min(len(members), n // 20))  # repeats
            return ids

        def note(ids: list[str], slot: int) -> None:
            for task_id in ids:
                first.setdefault(task_id, slot)
            members.extend(ids)

        for _ in range(5):  # a bulk load in pages
            slot = table.new_record("bulk")
            ids = fresh(3000)
            table.stage([(i, slot) for i in ids])
            note(ids, slot)
        table.commit()
        for round_ in range(30):
            slot = table.new_record(f"r{round_}")
            ids = fresh(rng.choice([1, 10, 300, 5000]))
            if len(ids) > 100:
                added = table.add_many([(i, slot) for i in ids])
            else:
                added = [i for i in ids if table.add(i, slot)]
            assert sorted(set(added)) == sorted(set(ids) - set(first))
            assert len(added) == len(set(added))
            note(ids, slot)
        table.flush()

        assert len(first) == len(table)
        for task_id, slot in first.items():
            assert slot == table.slot(task_id), task_id
        strangers = [near(i) for i in rng.sample(list(first), 2000) if uuid_key(i) is not None]
        strangers += [str(uuid.uuid4()) for _ in range(2000)]
        strangers += [i.upper() for i in rng.sample(list(first), 200) if uuid_key(i)]
        strangers = [s for s in strangers if s not in first]
        assert [] == [s for s in strangers if s in table]

    def test_ids_sharing_a_high_half_are_told_apart(self) -> None:
        """Many ids with one high half, some members and some not: each is answered
        exactly (the table compares the low half among the ids that share the high)."""
        base = str(uuid.uuid4())
        same_high = list({near(base) for _ in range(200)})
        members, others = same_high[:100], same_high[100:]
        table: TaskIdTable[str] = TaskIdTable()
        table.stage([(i, table.new_record("x")) for i in members[:50]])
        table.commit()
        table.add_many([(i, table.new_record("y")) for i in members[50:]])
        assert all(i in table for i in members)
        assert not any(i in table for i in others)

    def test_purge_drops_only_expired_records(self) -> None:
        """Purging one cancellation's slot drops its ids, wherever they are kept, and
        no other id."""
        table: TaskIdTable[str] = TaskIdTable()
        old, new = table.new_record("old"), table.new_record("new")
        old_ids = [str(uuid.uuid4()) for _ in range(3000)] + ["custom-old"]
        new_ids = [str(uuid.uuid4()) for _ in range(3000)] + ["custom-new"]
        table.add_many([(i, old) for i in old_ids[:2000]] + [(i, new) for i in new_ids[:2000]])
        for i in old_ids[2000:]:
            table.add(i, old)
        for i in new_ids[2000:]:
            table.add(i, new)
        assert len(old_ids) == table.purge({old}, threading.Lock())
        assert not any(i in table for i in old_ids)
        assert all(i in table for i in new_ids)


class TestMemory:
    """Cost per id, and what a fork shares."""

    def test_ids_take_20_bytes_each(self) -> None:
        """A bulk load of 200,000 ids into an index: 20 bytes an id in its buffers."""
        index = TargetIndex()
        reason = CancelReason(message="bulk")
        entries = []
        for _ in range(200):
            ids = tuple(("task", str(uuid.uuid4())) for _ in range(1000))
            entries.append(Entry(ids, reason, 0.0))  # type: ignore[arg-type]
        index.add_entries(entries)
        assert 200_000 == len(index)
        assert 20 * 200_000 <= index._tasks.buffer_bytes <= 21 * 200_000

    def test_a_forked_table_shares_the_buffers_and_never_merges(self) -> None:
        """A child's table holds the parent's buffers themselves; ids the child adds
        wait in its small dict (its pages of the buffers stay shared)."""
        table: TaskIdTable[str] = TaskIdTable()
        table.add_many([(str(uuid.uuid4()), table.new_record("x")) for _ in range(10_000)])
        child = table.forked()
        buffers = child._sorted
        assert buffers is table._sorted
        added = [str(uuid.uuid4()) for _ in range(10_000)]
        slot = child.new_record("child")
        child.add_many([(i, slot) for i in added])
        assert child._sorted is buffers
        assert all(i in child for i in added)


class TestReasonRecords:
    """One cancellation at a time: each costs a few bytes, its reason comes back whole."""

    def test_single_cancels_cost_bytes_and_keep_their_reasons(self) -> None:
        """20,000 cancels of one id each, from three requesters with one message: the
        index's records take under 30 bytes a cancellation (each reason text is kept
        once), and each id still matches its own reason (message, requester, time)."""
        import tracemalloc

        index = TargetIndex()
        ids = [str(uuid.uuid4()) for _ in range(20_000)]
        reasons = [
            CancelReason(message="user cancelled", requested_by=f"user{i % 3}")
            for i in range(20_000)
        ]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for task_id, reason in zip(ids, reasons, strict=True):
            index.add([("task", task_id)], reason, recorded_at=1.0)
        index._tasks.flush()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        per_cancel = (grown - index._tasks.buffer_bytes) / len(ids)
        assert per_cancel < 30, per_cancel
        for i in (0, 1, 2, 12_345, 19_999):
            assert reasons[i] == index.match(ids[i])
        assert len(ids) == index.purge(ttl=10.0, now=100.0)
        assert index.match(ids[0]) is None
