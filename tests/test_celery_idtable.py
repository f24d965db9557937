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
from array import array
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cancellable import CancelReason
from cancellable.celery import _idtable
from cancellable.celery._idtable import (
    TaskIdTable,
    _build,
    _same_as_previous,
    uuid_halves,
    uuid_key,
    uuid_keys,
    uuid_lines,
)
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


def _pool() -> list[str]:
    """Ids for the properties: canonical UUIDs, some sharing a high half (or a low
    half) with another, the upper-case spelling of one, and ids that are not UUIDs."""
    rng = random.Random(2022)
    base = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(8)]
    high = base[0].replace("-", "")[:16]
    same_high = [str(uuid.UUID(high + f"{rng.getrandbits(64):016x}")) for _ in range(4)]
    low = base[1].replace("-", "")[16:]
    same_low = [str(uuid.UUID(f"{rng.getrandbits(64):016x}" + low)) for _ in range(2)]
    edges = [str(uuid.UUID(int=0)), str(uuid.UUID(int=(1 << 128) - 1))]
    others = [base[2].upper(), "custom-1", "custom-2", base[3].replace("-", ""), ""]
    return base + same_high + same_low + edges + others


POOL = _pool()
_ids = st.lists(st.sampled_from(POOL), max_size=30)


class TableMachine(RuleBasedStateMachine):
    """Random adds, batches, staged loads (as text and as pairs), commits and merges,
    against a dict: each id keeps the slot it was first given (an id staged counts as
    given when it is committed), and no other id is ever found."""

    def __init__(self) -> None:
        super().__init__()
        self.table: TaskIdTable[str] = TaskIdTable()
        self.model: dict[str, int] = {}
        self.pending: list[tuple[str, int]] = []

    def slot(self) -> int:
        return self.table.new_record("r")

    @rule(task_id=st.sampled_from(POOL))
    def add(self, task_id: str) -> None:
        """One id (it waits in the small dict)."""
        added = self.table.add(task_id, slot := self.slot())
        assert (task_id not in self.model) == added
        self.model.setdefault(task_id, slot)

    @rule(ids=_ids)
    def add_many(self, ids: list[str]) -> None:
        """A batch, merged at once."""
        slot = self.slot()
        added = self.table.add_many([(i, slot) for i in ids])
        assert sorted(set(ids) - set(self.model)) == sorted(added)
        for task_id in ids:
            self.model.setdefault(task_id, slot)

    @rule(ids=_ids)
    def stage(self, ids: list[str]) -> None:
        """A page of a bulk load as pairs: ids that are not UUIDs count at once."""
        slot = self.slot()
        self.table.stage([(i, slot) for i in ids])
        for task_id in ids:
            if uuid_key(task_id) is None:
                self.model.setdefault(task_id, slot)
            else:
                self.pending.append((task_id, slot))

    @rule(ids=_ids)
    def stage_lines(self, ids: list[str]) -> None:
        """A ledger entry's text: converted in one piece when every id is canonical,
        else decoded into pairs (as `TargetIndex.load` does)."""
        keys = uuid_lines("\n".join(f"task:{i}" for i in ids))
        if keys is None:
            self.stage(ids)
            return
        assert all(uuid_key(i) is not None for i in ids)
        slot = self.slot()
        self.table.stage_keys(keys, slot)
        self.pending.extend((i, slot) for i in ids)

    @rule()
    def commit(self) -> None:
        """The end of a bulk load."""
        self.table.commit()
        for task_id, slot in self.pending:
            self.model.setdefault(task_id, slot)
        self.pending = []

    @rule()
    def flush(self) -> None:
        """The small dict merged into the buffers."""
        self.table.flush()

    @invariant()
    def answers_like_the_dict(self) -> None:
        """Every id of the pool: its first slot, or not found."""
        assert {i: self.model.get(i) for i in POOL} == {i: self.table.slot(i) for i in POOL}
        if not self.pending:
            assert len(self.model) == len(self.table)


TableMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)


class TestTableStateMachine(TableMachine.TestCase):
    """`TableMachine`: the table answers like a dict whatever the order of operations."""


class TestUuidLines:
    """A ledger entry's text converts to the numbers of its ids only when each is canonical."""

    def test_a_bulk_entry_converts_to_its_numbers(self) -> None:
        """1,000 ids written as `cancel()` writes them: 16 big-endian bytes each, in order."""
        ids = [str(uuid.uuid4()) for _ in range(1000)]
        text = "\n".join(f"task:{i}" for i in ids)
        assert b"".join(uuid.UUID(i).bytes for i in ids) == uuid_lines(text)

    @given(ids=st.lists(st.sampled_from(POOL) | st.text(max_size=40), min_size=1, max_size=8))
    @settings(max_examples=500, deadline=None)
    def test_any_lines_convert_exactly_when_every_id_does(self, ids: list[str]) -> None:
        """Ids of any text (newlines, ``task:`` inside, dashes elsewhere, ...): the text
        converts if and only if every line is ``task:`` and a canonical UUID, and then
        to those ids' numbers."""
        text = "\n".join(f"task:{i}" for i in ids)
        lines = text.split("\n")
        keys = [uuid_key(line[5:]) if line.startswith("task:") else None for line in lines]
        numbers = b"".join(k.to_bytes(16, "big") for k in keys if k is not None)
        assert (None if None in keys else numbers) == uuid_lines(text)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "task:",
            "group:6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "task:6f9619ff-8b86-d011-b42d-00c04fc964ff\n",
            "task:6f9619ff-8b86-d011-b42d-00c04fc964ff\r\ntask:6f9619ff-8b86-d011-b42d-00c04fc964f",
            "task:6f9619ff-8b86-d011-b42d-00c04fc964ff\ngroup:6f9619ff-8b86-d011-b42d-00c04fc964f",
            " task:6f9619ff-8b86-d011-b42d-00c04fc964f",
            "task:6f9619ff-8b86-d011-b42d-00c04fc964ff\ntask:6f9619ff8b86-d011-b42d-00c04fc964ff-",
        ],
    )
    def test_other_layouts_do_not_convert(self, text: str) -> None:
        """Empty text, another kind, a trailing newline, CRLF, a leading space, a dash
        out of place: no numbers (the entry is then decoded id by id)."""
        assert uuid_lines(text) is None


class TestBuild:
    """The sort behind a bulk load and a large merge."""

    @given(
        rows=st.lists(
            st.tuples(
                st.sampled_from([0, 1, 2**63, 2**64 - 1, 12345]),
                st.sampled_from([0, 7, 2**64 - 1, 2**32]),
                st.sampled_from([0, 1, 5, 2**32 - 1]),
            ),
            max_size=60,
        )
    )
    @settings(max_examples=300, deadline=None)
    def test_rows_sort_by_id_and_an_id_keeps_its_first_row(
        self, rows: list[tuple[int, int, int]]
    ) -> None:
        """Rows with shared high halves, shared low halves, extreme values and repeated
        ids: sorted by (high, low), one row per id, the slot of its first row."""
        first: dict[tuple[int, int], int] = {}
        for high, low, slot in rows:
            first.setdefault((high, low), slot)
        arrays = (
            array("Q", [r[0] for r in rows]),
            array("Q", [r[1] for r in rows]),
            array("I", [r[2] for r in rows]),
        )
        built = _build(*arrays)
        with mock.patch.object(_idtable, "_PARTITION_OVER", 2):  # split at every byte
            split = _build(*arrays)
            with mock.patch.object(_idtable, "_CHUNK", 3):  # as bytes, 3 strings at a time
                split_as_bytes = _build(*arrays)
        assert built.arrays() == split.arrays() == split_as_bytes.arrays()
        expected = sorted(first.items())
        assert [k[0] for k, _ in expected] == built.hi.tolist()
        assert [k[1] for k, _ in expected] == built.lo.tolist()
        assert [s for _, s in expected] == built.rec.tolist()

    def test_a_large_build_matches_a_sort_of_python_ints(self) -> None:
        """80,000 rows, one in eight a repeat (more than one `struct` chunk, more than
        one `_CHUNK`): random ids, ids whose first bytes are all zero (a split by byte
        that gives one full list, split again), and one id 35,000 times (split to its
        last byte)."""
        rng = random.Random(7)
        keys = [rng.getrandbits(128) for _ in range(15_000)]
        keys += [rng.getrandbits(88) for _ in range(20_000)]
        keys += [rng.getrandbits(128)] * 35_000
        keys += rng.sample(keys, 10_000)
        rng.shuffle(keys)
        slots = [rng.getrandbits(32) for _ in keys]
        built = _build(
            array("Q", [k >> 64 for k in keys]),
            array("Q", [k & (2**64 - 1) for k in keys]),
            array("I", slots),
        )
        first: dict[int, int] = {}
        for key, slot in zip(keys, slots, strict=True):
            first.setdefault(key, slot)
        expected = sorted(first.items())
        assert [k >> 64 for k, _ in expected] == built.hi.tolist()
        assert [k & (2**64 - 1) for k, _ in expected] == built.lo.tolist()
        assert [s for _, s in expected] == built.rec.tolist()

    @given(
        values=st.lists(
            st.sampled_from([0, 1, 2**8, 2**56, 2**64 - 1, 2**32 - 1, 2**32, 0xFF00]),
            max_size=40,
        )
    )
    @settings(max_examples=300, deadline=None)
    def test_neighbours_that_are_equal_are_all_found(self, values: list[int]) -> None:
        """Values with zero bytes at either end (so zero runs straddle two values):
        exactly the indexes equal to their predecessor."""
        expected = [i for i in range(1, len(values)) if values[i] == values[i - 1]]
        assert expected == _same_as_previous(array("Q", values))


class TestCommit:
    """Ids a bulk load stages that the table already holds."""

    def test_an_id_waiting_in_the_small_dict_keeps_its_slot_and_leaves_it(self) -> None:
        """An id added one at a time while a load is staged (a broadcast during the
        worker's first read), and also in the load: it keeps the slot it was added
        with, and is counted once."""
        table: TaskIdTable[str] = TaskIdTable()
        ids = [str(uuid.uuid4()) for _ in range(5)]
        loaded = table.new_record("ledger")
        table.stage_keys(uuid_lines("\n".join(f"task:{i}" for i in ids)) or b"", loaded)
        early = table.new_record("broadcast")
        assert table.add(ids[2], early)
        table.commit()
        assert [loaded, loaded, early, loaded, loaded] == [table.slot(i) for i in ids]
        assert 5 == len(table)
        assert {} == table._recent
