"""A compact, exact table of cancelled task ids, for a worker's index.

`cancellable.celery._index.TargetIndex` keeps every live cancelled task id
for the ledger's TTL, a million of them or more.  A dict of strings costs
about 150 bytes per id in every process, and a prefork child that inherits
it pays for it again: CPython writes the reference count of every object it
touches, so the copy-on-write pages of a dict of strings are soon copied.
This table keeps the ids in a few flat buffers instead:

* A Celery task id is a canonical UUID (``str(uuid.uuid4())``: 36
  characters, lower-case hex and four dashes).  Such an id *is* a 128-bit
  number: the text and the number convert into each other one to one.  The
  table keeps those numbers in two sorted ``array('Q')`` buffers (the high
  and low 64 bits) and, beside them, an ``array('I')`` naming each id's
  *record* (its reason and when it was recorded), one record shared by all
  the ids of one cancellation: 20 bytes per id, in three objects whose
  pages nothing writes after they are built, so a fork shares them.
* Any other id (a custom ``task_id``) is kept in a dict, as before.
* Ids added since the last merge wait in a small dict (``_recent``); it is
  merged into the buffers when it reaches an eighth of their size (at
  least `MERGE_AT` ids), building new buffers and swapping them in.
* A worker's first read of the ledger stages each entry's ids as numbers
  (`uuid_lines` converts an entry's ``task:<id>`` lines in one piece) and
  sorts them once (`commit`).  Pure Python, no Python loop or int per id:
  each id becomes one 24-byte string (number, row, slot, big-endian) that
  sorts as ``(id, row)``; the strings are split by their leading bytes
  into lists of a few ids before they are sorted, so that every pass stays
  in the CPU's caches (`_sort_rows`), and strided array copies take the
  sorted strings apart into the buffers.  A million ids load in about a
  fifth of the time of a sort of row numbers by key and three gathers.

Exact, never probabilistic: a lookup finds the id's full 128 bits (the
high half by binary search, then the low half among the ids that share
it), so an id that was not added is never found, and one that was is
always found.

Concurrency: the caller serializes writers (``TargetIndex.lock``); readers
take no lock.  The buffers are never changed once built: a merge or a
purge builds new ones and swaps them in with one assignment, and an id
leaves ``_recent`` only after the buffers that hold it are in place.
A forked child's table (`forked`) never merges, so it keeps sharing its
parent's pages; what the child adds itself stays in its small dict.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from contextlib import AbstractContextManager
from itertools import chain, compress, repeat
from operator import and_ as _and
from operator import eq, not_
from operator import lshift as _shl
from operator import or_ as _or
from operator import rshift as _shr
from typing import Final, Generic, Protocol, TypeVar

__all__ = ["MERGE_AT", "TaskIdTable", "trim_heap", "uuid_halves", "uuid_key", "uuid_keys"]

#: The fewest waiting ids that trigger a merge.
MERGE_AT: Final = 4096

#: A record (the index keeps ``(reason, recorded at)``).
R = TypeVar("R")

_M32: Final = (1 << 32) - 1
_M64: Final = (1 << 64) - 1
_HEX: Final = frozenset("0123456789abcdef")
#: Characters per line of a ledger entry's task targets: ``task:``, a UUID, a newline.
_LINE: Final = 42
#: What every such line has, where (`uuid_lines`).
_FIXED: Final = (*enumerate("task:"), (13, "-"), (18, "-"), (23, "-"), (28, "-"))
_TO_FROMHEX: Final = str.maketrans({"-": " ", "\n": " ", **dict.fromkeys("ABCDEF", "x")})
_LITTLE: Final = sys.byteorder == "little"


def uuid_key(task_id: str) -> int | None:
    """The 128-bit number a canonical lower-case UUID string spells, or None.

    One to one: ``uuid_key(a) == uuid_key(b) is not None`` only when ``a == b``.
    """
    if len(task_id) != 36 or not (task_id[8] == task_id[13] == task_id[18] == task_id[23] == "-"):
        return None
    digits = task_id[:8] + task_id[9:13] + task_id[14:18] + task_id[19:23] + task_id[24:]
    if not _HEX.issuperset(digits):
        return None
    return int(digits, 16)


def uuid_lines(text: str) -> bytes | None:
    """The numbers of the ids in ``text``, ``task:<id>`` lines, if every id is a canonical UUID.

    ``text`` is a ledger entry's targets as written (`cancellable.celery._ledger`);
    the result holds each id's 128-bit number in 16 big-endian bytes, in the
    order of the lines (None unless every line is ``task:`` and a canonical
    lower-case UUID).  A few C-level string operations over the whole text,
    no object per id: strided slices check that every line has ``task:``,
    its dashes and its newline where they must be; those become spaces, which
    ``bytes.fromhex`` skips, and upper-case hex digits become ``x``, which it
    refuses; it must then read 16 bytes a line, so the other 32 characters
    of each line were lower-case hex digits (a space or a dash among them
    makes the result short).
    """
    n = (len(text) + 1) // _LINE
    if not n or len(text) != n * _LINE - 1 or text[_LINE - 1 :: _LINE] != "\n" * (n - 1):
        return None
    for at, char in _FIXED:
        if text[at::_LINE] != char * n:
            return None
    try:
        raw = bytes.fromhex(text.replace("task:", "     ").translate(_TO_FROMHEX))
    except ValueError:
        return None
    return raw if len(raw) == 16 * n else None


def trim_heap() -> None:
    """Give the memory a bulk load freed back to the system (glibc's ``malloc_trim``).

    A load allocates and frees a page of Python objects at a time; glibc
    keeps freed memory in its heap, where it counts in the process's RSS
    (and a pool child forked then inherits it).  Best effort, and only where
    glibc is the allocator.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def uuid_keys(task_ids: list[str]) -> list[int] | None:
    """`uuid_key` of each id, if every one is a canonical UUID; else None."""
    halves = uuid_halves(task_ids)
    if halves is None:
        return None
    hi, lo = halves
    return list(map(_or, map(_shl, hi, repeat(64)), lo))


def uuid_halves(task_ids: list[str]) -> tuple[array[int], array[int]] | None:
    """The high and low 64 bits of each id, if every one is a canonical UUID; else None.

    C-level string operations over the joined ids, no Python loop per id:
    every id is 36 characters with its four dashes in place (and no other
    dash), and the other 32 are lower-case hex digits (``bytes.fromhex``
    takes nothing else but spaces, which would make it return fewer bytes).
    """
    n = len(task_ids)
    joined = "".join(task_ids)
    if len(joined) != 36 * n or joined.count("-") != 4 * n:
        return None
    dashes = "-" * n
    if not (joined[8::36] == joined[13::36] == joined[18::36] == joined[23::36] == dashes):
        return None
    digits = joined.replace("-", "")
    del joined
    if digits != digits.lower():
        return None
    try:
        raw = bytes.fromhex(digits)  # raises for anything but hex digits and spaces
    except ValueError:
        return None
    if len(raw) != 16 * n:  # it skipped spaces
        return None
    both = array("Q")
    both.frombytes(raw)
    if sys.byteorder == "little":
        both.byteswap()
    return both[0::2], both[1::2]


class _Sorted:
    """Three parallel buffers sorted by ``(hi, lo)``; never changed once built."""

    __slots__ = ("hi", "lo", "rec")

    def __init__(self, hi: array[int], lo: array[int], rec: array[int]) -> None:
        self.hi = hi
        self.lo = lo
        self.rec = rec

    @classmethod
    def empty(cls) -> _Sorted:
        return cls(array("Q"), array("Q"), array("I"))

    @classmethod
    def from_keys(cls, keys: list[int]) -> _Sorted:
        """From sorted ``key << 32 | slot`` numbers (one per id)."""
        return cls(
            array("Q", map(_shr, keys, repeat(96))),
            array("Q", map(_and, map(_shr, keys, repeat(32)), repeat(_M64))),
            array("I", map(_and, keys, repeat(_M32))),
        )

    def arrays(self) -> tuple[array[int], array[int], array[int]]:
        """``(hi, lo, rec)``."""
        return self.hi, self.lo, self.rec

    def concat(self, other: _Sorted) -> _Sorted:
        """New buffers: these rows, then ``other``'s (not sorted)."""
        return _Sorted(self.hi + other.hi, self.lo + other.lo, self.rec + other.rec)

    def keep(self, mask: list[bool]) -> _Sorted:
        """New buffers with the rows whose ``mask`` entry is true (order kept)."""
        return _Sorted(
            array("Q", compress(self.hi, mask)),
            array("Q", compress(self.lo, mask)),
            array("I", compress(self.rec, mask)),
        )

    def find(self, key: int) -> int | None:
        """The slot of ``key``, or None."""
        row = self.row(key)
        return None if row is None else int(self.rec[row])

    def row(self, key: int) -> int | None:
        """The row of ``key``, or None."""
        hi, lo = self.hi, self.lo
        high, low = key >> 64, key & _M64
        i = bisect_left(hi, high)
        n = len(hi)
        while i < n and hi[i] == high:
            if lo[i] == low:
                return i
            i += 1
        return None

    def __len__(self) -> int:
        return len(self.hi)


class RecordStore(Protocol[R]):
    """Where a table keeps its records, by slot (a ``list`` will do)."""

    def append(self, record: R, /) -> None:
        """Keep ``record`` in the next slot."""

    def __getitem__(self, slot: int, /) -> R | None:
        """The record in ``slot`` (None once dropped)."""

    def __setitem__(self, slot: int, value: None, /) -> None:
        """Drop the record in ``slot``."""

    def __len__(self) -> int:
        """Slots used so far."""


class TaskIdTable(Generic[R]):
    """Task id -> record, exact, in a few flat buffers (see the module docstring).

    Records are kept by ``slot`` (an index into ``records``); the caller
    adds a record once per cancellation (`new_record`) and then the ids it
    names (`add`).  Writers must be serialized by the caller.
    """

    def __init__(self, merge: bool = True, records: RecordStore[R] | None = None) -> None:
        self._sorted = _Sorted.empty()
        #: Canonical-UUID ids not merged yet.
        self._recent: dict[str, int] = {}
        #: Every other id, for good.
        self._other: dict[str, int] = {}
        #: Records by slot; an expired record's slot is None.
        self.records: RecordStore[R] = [] if records is None else records
        self._merge = merge
        #: Ids a bulk load staged, not merged yet (`stage`, `commit`): their
        #: numbers (16 big-endian bytes each), row numbers and slots.
        self._staged: tuple[bytearray, array[int], array[int]] | None = None
        self._staged_rows = 0

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent) + len(self._other)

    @property
    def buffer_bytes(self) -> int:
        """Bytes held in the sorted buffers."""
        s = self._sorted
        return sum(b.buffer_info()[1] * b.itemsize for b in (s.hi, s.lo, s.rec))

    def new_record(self, record: R) -> int:
        """Keep ``record``; return its slot."""
        self.records.append(record)
        return len(self.records) - 1

    def slot(self, task_id: str) -> int | None:
        """The slot of ``task_id``'s record, or None if it is not in the table."""
        slot = self._recent.get(task_id)
        if slot is not None:
            return slot
        key = uuid_key(task_id)
        if key is None:
            return self._other.get(task_id)
        return self._sorted.find(key)

    def get(self, task_id: str) -> R | None:
        """``task_id``'s record, or None."""
        slot = self.slot(task_id)
        return None if slot is None else self.records[slot]

    def __contains__(self, task_id: str) -> bool:
        return self.slot(task_id) is not None

    def add(self, task_id: str, slot: int) -> bool:
        """Add ``task_id`` with the record at ``slot`` unless present; True if added.

        The id waits in the small dict, which is merged when it is large
        enough; `add_many` is the fast way to add a batch.
        """
        if task_id in self._recent:
            return False
        key = uuid_key(task_id)
        if key is None:
            if task_id in self._other:
                return False
            self._other[task_id] = slot
            return True
        if self._sorted.find(key) is not None:
            return False
        self._recent[task_id] = slot
        if self._merge and len(self._recent) >= max(MERGE_AT, len(self._sorted) // 8):
            self.flush()
        return True

    def add_many(self, items: Sequence[tuple[str, int]]) -> list[str]:
        """Add each ``(task id, slot)`` unless present; return the ids added.

        A batch goes straight into new buffers (one merge), without the
        small dict; an id named twice keeps its first slot.  A batch of
        canonical UUIDs is converted without a Python loop per id.
        """
        if not self._merge:
            return [tid for tid, slot in items if self.add(tid, slot)]
        recent, other, table = self._recent, self._other, self._sorted
        if recent or other:
            items = [item for item in items if item[0] not in recent and item[0] not in other]
        added: list[str] = []  # ids that are not canonical UUIDs
        uuids = [tid for tid, _slot in items]
        keys = uuid_keys(uuids)
        if keys is None:  # some are not canonical UUIDs: sort them out one by one
            uuids, keys = [], []
            for tid, slot in items:
                key = uuid_key(tid)
                if key is not None:
                    uuids.append(tid)
                    keys.append(key << 32 | slot)
                elif tid not in other:
                    other[tid] = slot
                    added.append(tid)
        else:
            keys = list(map(_or, map(_shl, keys, repeat(32)), [slot for _tid, slot in items]))
        if len(table):
            fresh = [table.find(k >> 32) is None for k in keys]
            keys = list(compress(keys, fresh))
            uuids = list(compress(uuids, fresh))
        if keys:
            keys.sort()
            ids = list(map(_shr, keys, repeat(32)))
            if any(map(eq, ids[1:], ids[:-1])):  # an id named twice
                keys = _unique(keys)
                uuids = list(dict.fromkeys(uuids))
            del ids
            self._merge_keys(keys)
        added.extend(uuids)
        return added

    def stage(self, items: Sequence[tuple[str, int]]) -> None:
        """Stage ``(task id, slot)`` pairs for `commit`: a bulk load, page by page.

        Staged canonical UUIDs are kept as numbers in a flat buffer (24
        bytes an id, `_lanes`), so a loader holds one page of Python objects
        at a time; they are not found until `commit`.  Other ids are added
        at once.
        """
        recent, other = self._recent, self._other
        if recent or other:
            items = [item for item in items if item[0] not in recent and item[0] not in other]
        halves = uuid_halves([tid for tid, _slot in items])
        if halves is not None:
            both = _zeros("Q", 2 * len(items))
            both[0::2], both[1::2] = halves
            slots = array("I", [slot for _tid, slot in items])
        else:
            keys, numbers = [], []
            for tid, slot in items:
                key = uuid_key(tid)
                if key is None:
                    other.setdefault(tid, slot)
                else:
                    keys.append(key >> 64)
                    keys.append(key & _M64)
                    numbers.append(slot)
            both, slots = array("Q", keys), array("I", numbers)
        if _LITTLE:
            both.byteswap()
        first = _STAGED_ROW + self._staged_rows
        self._stage_rows(both.tobytes(), array("I", range(first, first + len(slots))), slots)

    def stage_keys(self, keys: bytes, slot: int) -> None:
        """Stage ids given as numbers (`uuid_lines`), all with the record at ``slot``.

        Like `stage`; an id that is also waiting in the small dict when
        `commit` runs keeps the slot it has there.
        """
        n = len(keys) // 16
        # One row number for them all: an id named twice here has one slot.
        rows = array("I", (_STAGED_ROW + self._staged_rows,)) * n
        self._stage_rows(keys, rows, array("I", (slot,)) * n)

    def _stage_rows(self, keys: bytes, rows: array[int], slots: array[int]) -> None:
        # ``keys``: 16 big-endian bytes an id; staged rows are numbered from
        # `_STAGED_ROW`, after the rows of the buffers (which `commit` keeps).
        # `commit` makes `_lanes` of them, in one pass over them all.
        if self._staged is None:
            self._staged = (bytearray(), array("I"), array("I"))
        numbers, staged_rows, staged_slots = self._staged
        numbers += keys
        staged_rows += rows
        staged_slots += slots
        self._staged_rows += len(slots)

    def commit(self) -> None:
        """Merge what was staged into the buffers (one sort); ids present already keep theirs.

        Present already: in the buffers (their rows come first, and `_build`
        keeps an id's first row), or waiting in the small dict (the new
        buffers get that slot, and the id leaves the dict once they are in
        place).
        """
        staged, self._staged, self._staged_rows = self._staged, None, 0
        if staged is None or not staged[0]:
            return
        numbers, rows, slots = staged
        lanes = _lanes(array("I", numbers), rows, slots)
        del staged, numbers, rows, slots
        old = self._sorted
        if len(old):
            lanes[:0] = _lanes(_big_endian(old.hi, old.lo), array("I", range(len(old))), old.rec)
        built = _build_rows(lanes)
        del lanes
        moved: list[str] = []
        for task_id, slot in self._recent.items():
            key = uuid_key(task_id)
            row = None if key is None else built.row(key)
            if row is not None:
                built.rec[row] = slot  # not shared yet: nothing reads these buffers
                moved.append(task_id)
        self._sorted = built
        for task_id in moved:
            del self._recent[task_id]

    def flush(self) -> None:
        """Merge the waiting ids into the buffers (a forked child's table never does)."""
        if not self._merge or not self._recent:
            return
        self._merge_keys(
            sorted((uuid_key(tid) or 0) << 32 | slot for tid, slot in self._recent.items())
        )
        self._recent = {}

    def _merge_keys(self, new: list[int]) -> None:
        # ``new``: sorted ``key << 32 | slot`` numbers of ids not in the buffers.
        old = self._sorted
        if len(new) * 8 < len(old):
            merged = _insert(old, new)
        else:
            merged = _build(*old.concat(_Sorted.from_keys(new)).arrays())
        self._sorted = merged  # readers see the ids here before they leave _recent

    def purge(self, expired: set[int], lock: AbstractContextManager[object]) -> int:
        """Drop the ids whose record's slot is in ``expired``; return how many.

        New buffers without them are built outside ``lock`` (the caller's
        writer lock) and swapped in under it, unless a merge replaced the
        buffers meanwhile (the next purge does it then).
        """
        if not expired:
            return 0
        dropped = 0
        with lock:
            for table in (self._recent, self._other):
                gone = [tid for tid, slot in table.items() if slot in expired]
                for tid in gone:
                    del table[tid]
                dropped += len(gone)
            old = self._sorted
        if not expired.isdisjoint(old.rec):
            kept = old.keep(list(map(not_, map(expired.__contains__, old.rec))))
            with lock:
                if self._sorted is not old:
                    return dropped
                self._sorted = kept
            dropped += len(old) - len(kept)
        with lock:
            for slot in expired:
                self.records[slot] = None
        return dropped

    def forked(self) -> TaskIdTable[R]:
        """The same ids for a forked child; it never merges (its buffers stay shared)."""
        child: TaskIdTable[R] = TaskIdTable(merge=False, records=self.records)
        child._sorted = self._sorted
        child._recent = self._recent
        child._other = self._other
        return child


def _build(hi: array[int], lo: array[int], rec: array[int]) -> _Sorted:
    """Buffers sorted by ``(hi, lo)`` from unsorted rows; an id in several rows keeps its first."""
    return _build_rows(_lanes(_big_endian(hi, lo), array("I", range(len(hi))), rec))


def _build_rows(lanes: bytes | bytearray | array[int]) -> _Sorted:
    """Buffers sorted by id from `_lanes` rows; an id in several rows keeps its lowest row.

    Each row is one 24-byte string, the id's number, the row's number and
    its slot, big-endian, so that the strings sort as ``(id, row)``: a sort
    of short byte strings (``memcmp``, `_sort_records`), then C-level
    strided copies back into the buffers (`_from_records`), with no Python
    loop per row and no Python int per row.
    """
    # One growing buffer, not a list of sorted pieces joined at the end: a
    # million ids made 65,536 pieces of a few hundred bytes on Python's
    # small-object heap, then a 24 MB copy of them all while they lived.
    parts = bytearray()
    _sort_rows(memoryview(lanes).cast("B"), 0, parts)
    out = _from_records(parts)
    del parts
    # The rows of an id are adjacent, its first row first.
    slo = out.lo
    drop = {i for i in _same_as_previous(out.hi) if slo[i] == slo[i - 1]}
    if drop:
        out = out.keep(list(map(not_, map(drop.__contains__, range(len(slo))))))
    return out


#: 4-byte lanes of a row (`_lanes`): the id's number (4), the row's number, the slot.
_LANES: Final = 6
#: ``struct`` format taking `_RECORDS_AT_ONCE` row strings out of a buffer.
_RECORDS_AT_ONCE: Final = 4096
_UNPACK: Final = struct.Struct(f"{_LANES * 4}s" * _RECORDS_AT_ONCE)
#: The number of the first row a bulk load stages (rows of the buffers come first).
_STAGED_ROW: Final = 1 << 31


def _zeros(typecode: str, n: int) -> array[int]:
    """``n`` zeros of ``typecode``, in one allocation.

    Not ``array(typecode, bytes(size))``, which first makes a temporary as
    large as the array: the peak of a load, and what the heap keeps after it,
    grow with each such temporary.
    """
    return array(typecode, (0,)) * n


def _big_endian(hi: array[int], lo: array[int]) -> array[int]:
    """Each id's number (its halves) in 16 big-endian bytes, as 4-byte lanes."""
    both = _zeros("Q", 2 * len(hi))
    both[0::2], both[1::2] = hi, lo
    if _LITTLE:
        both.byteswap()
    return _retyped(both, "I")


def _lanes(keys: array[int], rows: array[int], slots: array[int]) -> array[int]:
    """One 24-byte big-endian row per id: its number (``keys``: `_big_endian`), row, slot."""
    n = len(rows)
    lanes = _zeros("I", _LANES * n)
    for lane in range(4):
        lanes[lane::_LANES] = keys[lane::4]
    rows, slots = array("I", rows), array("I", slots)
    if _LITTLE:
        rows.byteswap()
        slots.byteswap()
    lanes[4::_LANES], lanes[5::_LANES] = rows, slots
    return lanes


def _retyped(values: array[int], typecode: str) -> array[int]:
    """The bytes of ``values`` as an array of ``typecode``."""
    out = array(typecode)
    out.frombytes(memoryview(values).cast("B"))
    return out


#: Rows that `_sort_rows` makes strings of at once; more are split as bytes first.
_CHUNK: Final = 1 << 16


def _unpack(view: memoryview | bytes) -> list[bytes]:
    """One string per `_lanes` row of ``view``."""
    size = 4 * _LANES
    n = len(view) // size
    full = n - n % _RECORDS_AT_ONCE
    records: list[bytes] = []
    for at in range(0, full * size, _RECORDS_AT_ONCE * size):
        records.extend(_UNPACK.unpack_from(view, at))
    records.extend(struct.unpack_from(f"{size}s" * (n - full), view, full * size))
    return records


def _sort_rows(view: memoryview, depth: int, parts: bytearray) -> None:
    """Append the `_lanes` rows of ``view`` to ``parts``, sorted (the first ``depth``
    bytes of every row are the same).

    Up to `_CHUNK` rows are sorted as strings (`_sort_records`).  More are
    first split by their byte at ``depth`` into 256 buffers, a chunk of
    strings at a time: every pass over the strings then stays within a few
    MB (the CPU's caches), where a million strings take 64 MB of heap.
    """
    size = 4 * _LANES
    if len(view) <= _CHUNK * size or depth >= 16:
        _sort_records(_unpack(view), view, depth, parts)
        return
    pieces: list[list[bytes]] = [[] for _ in range(256)]
    for start in range(0, len(view), _CHUNK * size):
        chunk = view[start : start + _CHUNK * size]
        records = _unpack(chunk)
        buckets: list[list[bytes]] = [[] for _ in range(256)]
        deque(map(list.append, map(buckets.__getitem__, chunk[depth::size]), records), 0)
        del records
        deque(map(list.append, pieces, map(b"".join, buckets)), 0)
        del buckets
    for bucket in pieces:
        joined = b"".join(bucket)
        bucket.clear()
        if joined:
            _sort_rows(memoryview(joined), depth + 1, parts)


#: Rows that are sorted as they are; more are first split by their next byte.
_PARTITION_OVER: Final = 2048


def _sort_records(
    records: list[bytes], joined: memoryview | bytes, depth: int, parts: bytearray
) -> None:
    """Append ``records`` (`_lanes` rows; ``joined``: them joined) to ``parts``, sorted.

    More than `_PARTITION_OVER` are first split into 256 lists by their
    byte at ``depth`` (C-level appends), and so on while a list is that
    long: a million random ids make lists of about 15 after two bytes,
    sorted in a few comparisons each while their strings are in the CPU's
    caches, instead of one sort of strings all over the heap (under half
    the time).  Ids that share leading bytes are split further; one id
    repeated is sorted as it is once its 16 bytes are used.  Empties
    ``records``.
    """
    if len(records) <= _PARTITION_OVER or depth >= 16:
        records.sort()
        parts += b"".join(records)
        records.clear()
        return
    buckets: list[list[bytes]] = [[] for _ in range(256)]
    deque(map(list.append, map(buckets.__getitem__, joined[depth :: 4 * _LANES]), records), 0)
    records.clear()
    del joined
    if max(map(len, buckets)) <= _PARTITION_OVER:
        deque(map(list.sort, buckets), 0)
        parts += b"".join(chain.from_iterable(buckets))
        return
    for bucket in buckets:
        _sort_records(bucket, b"".join(bucket), depth + 1, parts)


def _from_records(joined: bytes | bytearray) -> _Sorted:
    """The buffers from `_lanes` rows, joined (in their order)."""
    lanes = array("I", joined)
    n = len(lanes) // _LANES

    def column(first: int, count: int, typecode: str) -> array[int]:
        part = _zeros("I", count * n)
        for k in range(count):
            part[k::count] = lanes[first + k :: _LANES]
        out = _retyped(part, typecode)
        if _LITTLE:
            out.byteswap()
        return out

    return _Sorted(column(0, 2, "Q"), column(2, 2, "Q"), column(5, 1, "I"))


def _same_as_previous(values: array[int]) -> list[int]:
    """The indexes ``i`` where ``values[i] == values[i - 1]`` (8-byte values).

    Without a Python int per value: the values and the same shifted by one
    become two big ints, whose XOR has eight zero bytes exactly where two
    neighbours are equal; ``bytes.find`` finds those (and a zero run that
    straddles two values, skipped).
    """
    size = values.itemsize
    raw = values.tobytes()
    if len(raw) <= size:
        return []
    diff = (int.from_bytes(raw[size:], "little") ^ int.from_bytes(raw[:-size], "little")).to_bytes(
        len(raw) - size, "little"
    )
    del raw
    zero = bytes(size)
    same: list[int] = []
    at = diff.find(zero)
    while at >= 0:
        if at % size == 0:
            same.append(at // size + 1)
        at = diff.find(zero, at + 1)
    return same


def _unique(keys: list[int]) -> list[int]:
    """Sorted ``keys`` with only the first (lowest slot) of each id."""
    unique: list[int] = []
    last = -1
    for k in keys:
        key = k >> 32
        if key != last:
            unique.append(k)
            last = key
    return unique


def _insert(old: _Sorted, new: list[int]) -> _Sorted:
    """``old`` with the sorted ``new`` keys inserted: a few slice copies per new id."""
    hi, lo, rec = array("Q"), array("Q"), array("I")
    start = 0
    for k in new:
        high = k >> 96
        at = bisect_left(old.hi, high, start)
        if at > start:
            hi += old.hi[start:at]
            lo += old.lo[start:at]
            rec += old.rec[start:at]
        hi.append(high)
        lo.append((k >> 32) & _M64)
        rec.append(k & _M32)
        start = at
    hi += old.hi[start:]
    lo += old.lo[start:]
    rec += old.rec[start:]
    return _Sorted(hi, lo, rec)
