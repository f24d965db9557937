"""A worker's local index of live cancellations: the ledger, cached in memory.

Every worker process keeps one `TargetIndex` (in its
`~cancellable.celery._runtime.TaskRuntime`; the worker's main process
shares it with its `~cancellable.celery._runtime.WorkerRuntime`).  It is filled from two
sources, and either alone is enough:

* revoke broadcasts, the moment they arrive (`add`);
* the ledger, read in full when the worker starts and then incrementally
  every poll interval (`sync`), so broadcasts that were missed (the worker
  was offline, restarting, or a busy solo worker) still arrive.

The worker consults it, without any network round trip, whenever it is about
to hand a task to its pool and when a task starts (`match`).  Unlike
Celery's revoked set (50,000 ids, 3 hours, by default) it holds every live
cancellation for the ledger's TTL, however many there are.

Cost: one dict entry per target (the reason objects are shared by the
targets of one ledger entry); see docs/reliability.md for measured figures.
Reads take no lock (a dict lookup is atomic in CPython); writers hold
``lock``.  A target keeps the first reason it was given.

Fork safety: the runtime's fork handler takes ``lock`` before every fork
(`cancellable.celery._runtime`), so no child is forked while a writer
holds it; `purge` holds it to copy one table, then for at most
`PURGE_BATCH` deletions at a time, so a fork (and the consumer) never
waits long for a purge of a large index.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from typing import Any, Final

from .._exceptions import CancelReason
from . import _workflow
from ._idtable import TaskIdTable, trim_heap, uuid_lines
from ._ledger import Entry, Ledger, Target, TargetKind, TaskLines

__all__ = ["TargetIndex", "request_targets"]

#: (reason, when it was recorded); one such pair is shared by many targets.
_Record = tuple[CancelReason, float]

#: The most targets `TargetIndex.purge` drops in one hold of the lock.
PURGE_BATCH: Final = 1000

#: Task ids added at once from this many go straight into the compact table.
BATCH: Final = 256


class TargetIndex:
    """Live cancellation targets, by kind."""

    def __init__(self) -> None:
        #: Held by writers; taken around every fork (`cancellable.celery._runtime`).
        self.lock: Final = threading.Lock()
        #: Task ids: compact and exact (`cancellable.celery._idtable`).
        #: The reasons of the task ids, by slot (one per cancellation).
        self._records = ReasonRecords()
        self._tasks: TaskIdTable[_Record] = TaskIdTable(records=self._records)
        self._groups: dict[str, _Record] = {}
        self._roots: dict[str, _Record] = {}
        self.cursor: str | None = None

    def _table(self, kind: TargetKind) -> dict[str, _Record]:
        # Group and root targets (few, and matched for every task).
        return self._groups if kind == "group" else self._roots

    def __len__(self) -> int:
        return len(self._tasks) + len(self._groups) + len(self._roots)

    def add(
        self, targets: Iterable[Target], reason: CancelReason, recorded_at: float | None = None
    ) -> list[Target]:
        """Index ``targets``; return those that were not indexed before."""
        record = (reason, time.time() if recorded_at is None else recorded_at)
        with self.lock:
            return self._add_locked([(targets, record)])

    def add_entries(self, entries: Iterable[Entry]) -> list[Target]:
        """Index ledger entries in order; return the targets that are new here.

        A batch of task ids goes into the compact table in one merge.
        """
        batch = [(entry.targets, (entry.reason, entry.recorded_at)) for entry in entries]
        with self.lock:
            return self._add_locked(batch)

    def _add_locked(self, batch: Sequence[tuple[Iterable[Target], _Record]]) -> list[Target]:
        added: list[Target] = []
        tasks = self._tasks
        pending: list[tuple[str, int]] = []
        for targets, record in batch:
            slot = -1
            for kind, target_id in targets:
                if kind == "task":
                    if slot < 0:
                        slot = tasks.new_record(record)
                    pending.append((target_id, slot))
                else:
                    table = self._table(kind)
                    if target_id not in table:
                        table[target_id] = record
                        added.append((kind, target_id))
        if len(pending) >= BATCH:
            added.extend(("task", task_id) for task_id in tasks.add_many(pending))
        else:
            added.extend(("task", task_id) for task_id, slot in pending if tasks.add(task_id, slot))
        return added

    def load(self, ledger: Ledger) -> None:
        """Read the whole ledger (after ``cursor``) into the index: a worker's first read.

        A ledger that reads in pages (`RedisLedger.read_pages
        <cancellable.celery._ledger.RedisLedger.read_pages>`) is indexed a
        page at a time and its task ids are sorted into the compact table
        once, at the end, so loading a million ids never holds them all as
        Python objects; an entry of canonical task ids (`TaskLines
        <cancellable.celery._ledger.TaskLines>`) is converted in one piece,
        without an object per id (`uuid_lines
        <cancellable.celery._idtable.uuid_lines>`).  Raises
        `~cancellable.celery._ledger.LedgerError` (the pages read are kept,
        and the cursor names the last of them).
        """
        pages = getattr(ledger, "read_pages", None)
        if pages is None:
            entries, cursor = ledger.read(self.cursor)
            self.add_entries(entries)
            self.cursor = cursor
            return
        tasks = self._tasks
        try:
            for entries, cursor in pages(self.cursor):
                # A bulk entry's ids as numbers, converted outside the lock.
                keys = [uuid_lines(e.text) if isinstance(e, TaskLines) else None for e in entries]
                with self.lock:
                    for item, numbers in zip(entries, keys, strict=True):
                        record = (item.reason, item.recorded_at)
                        if numbers is not None:
                            tasks.stage_keys(numbers, tasks.new_record(record))
                            continue
                        entry = item.entry() if isinstance(item, TaskLines) else item
                        if entry is None:
                            continue
                        ids = [tid for kind, tid in entry.targets if kind == "task"]
                        if ids:
                            slot = tasks.new_record(record)
                            tasks.stage([(tid, slot) for tid in ids])
                        if len(ids) < len(entry.targets):
                            wide = [t for t in entry.targets if t[0] != "task"]
                            self._add_locked([(wide, record)])
                    self.cursor = cursor  # staged ids are committed below, whatever happens
                del entries, keys
        finally:
            with self.lock:
                tasks.commit()
            trim_heap()

    def sync(self, ledger: Ledger) -> list[Target]:
        """Read what the ledger gained since the last sync; return the new targets.

        Raises `~cancellable.celery._ledger.LedgerError` if the ledger is
        down (the cursor is kept, so nothing is skipped).
        """
        entries, cursor = ledger.read(self.cursor)
        added = self.add_entries(entries)
        self.cursor = cursor
        return added

    def match(
        self, task_id: str | None, group_id: str | None = None, root_id: str | None = None
    ) -> CancelReason | None:
        """The reason a task with these ids is cancelled, or None.

        A task is cancelled when its own id, its group's id or its
        workflow's root id is a live target.
        """
        record = self._tasks.get(task_id) if task_id else None
        if record is None and group_id:
            record = self._groups.get(group_id)
        if record is None and root_id:
            record = self._roots.get(root_id)
        return None if record is None else record[0]

    def match_request(self, request: Any) -> CancelReason | None:
        """`match` for a Celery worker ``Request`` or task ``Context``, workflows included.

        Besides its own id, group and root id, a request is cancelled when a
        ``root`` target names its own id or the id of any task it would send
        later (the rest of its chain, its links, its chord's body): a root
        target stands for "the workflow this id belongs to", so
        ``cancel(last_link_id, workflow=True)`` reaches the running first
        link.  That walk costs nothing unless root targets are live and the
        request carries a canvas.
        """
        task_id, group_id, root_id = request_targets(request)
        reason = self.match(task_id, group_id, root_id)
        if reason is None and self._roots:
            reason = self.match_workflow(request)
        return reason

    def match_workflow(self, request: Any) -> CancelReason | None:
        """The reason a ``root`` target names the request's id or a task it would send."""
        roots = self._roots
        if not roots:
            return None
        task_id = getattr(request, "id", None)
        record = roots.get(task_id) if isinstance(task_id, str) else None
        if record is None:
            for later_id in _workflow.downstream_ids(request):
                record = roots.get(later_id)
                if record is not None:
                    break
        return None if record is None else record[0]

    def has(self, kind: TargetKind, target_id: str) -> bool:
        """Is ``(kind, target_id)`` a live target here?"""
        if kind == "task":
            return target_id in self._tasks
        return target_id in self._table(kind)

    def purge(self, ttl: float, now: float | None = None) -> int:
        """Drop targets recorded more than ``ttl`` seconds ago; return how many."""
        horizon = (time.time() if now is None else now) - ttl
        with self.lock:
            expired = self._records.expired(horizon)
        dropped = self._tasks.purge(expired, self.lock)
        for table in (self._groups, self._roots):
            # A snapshot (one copy under the lock), then deletions in small
            # batches under the lock: a record replaced meanwhile is kept.
            with self.lock:
                snapshot = table.copy()
            old = [(key, record) for key, record in snapshot.items() if record[1] < horizon]
            del snapshot
            for start in range(0, len(old), PURGE_BATCH):
                with self.lock:
                    for key, record in old[start : start + PURGE_BATCH]:
                        if table.get(key) is record:
                            del table[key]
                            dropped += 1
        return dropped

    def forked(self) -> TargetIndex:
        """This index for a forked child: the same targets, a lock of its own.

        A fork copies the tables (copy-on-write), so the child's index costs
        nothing until one side writes; the parent's lock is not carried over
        (and was not held at the fork: the fork handler takes it).
        """
        child = TargetIndex()
        child._tasks = self._tasks.forked()
        child._records = self._records
        child._groups, child._roots = self._groups, self._roots
        child.cursor = self.cursor
        return child


class ReasonRecords:
    """The ``(reason, recorded at)`` of each cancellation, by slot, a few bytes each.

    Cancellations one at a time (a million a week is 1.6 a second) would
    cost a reason object each, about 340 bytes.  Here a reason's text
    (source, message, requested by) is kept once however many cancellations
    share it, and each slot holds three numbers in flat arrays: that text's
    number, the reason's ``requested_at`` and when it was recorded (20 bytes).
    The reason is rebuilt on a hit.  Texts are never dropped: a worker that
    sees a distinct message with every cancellation keeps each message.
    """

    #: The text number of a dropped slot.
    DROPPED: Final = 0xFFFFFFFF

    def __init__(self) -> None:
        self._texts: list[CancelReason] = []
        self._numbers: dict[tuple[str, str, str | None], int] = {}
        self._text = array("I")
        self._requested = array("d")
        self._recorded = array("d")

    def append(self, record: _Record) -> None:
        """Keep ``record`` in the next slot."""
        reason, recorded_at = record
        text = (reason.source, reason.message, reason.requested_by)
        number = self._numbers.get(text)
        if number is None:
            number = self._numbers[text] = len(self._texts)
            self._texts.append(reason)
        self._requested.append(reason.requested_at)
        self._recorded.append(recorded_at)
        self._text.append(number)  # last: the slot exists once all three do

    def __getitem__(self, slot: int) -> _Record | None:
        number = self._text[slot]
        if number == self.DROPPED:
            return None
        reason = self._texts[number]
        requested = self._requested[slot]
        if reason.requested_at != requested:
            reason = dataclasses.replace(reason, requested_at=requested)
        return reason, self._recorded[slot]

    def __setitem__(self, slot: int, value: None) -> None:
        self._text[slot] = self.DROPPED

    def __len__(self) -> int:
        return len(self._text)

    def expired(self, horizon: float) -> set[int]:
        """The live slots recorded before ``horizon``."""
        text, dropped = self._text, self.DROPPED
        return {
            slot for slot, at in enumerate(self._recorded) if at < horizon and text[slot] != dropped
        }


def request_targets(request: Any) -> tuple[str | None, str | None, str | None]:
    """``(task id, group id, root id)`` of a worker ``Request`` or a task ``Context``."""
    task_id = getattr(request, "id", None)
    group_id = getattr(request, "group", None)
    root_id = getattr(request, "root_id", None)
    return (
        task_id if isinstance(task_id, str) else None,
        group_id if isinstance(group_id, str) else None,
        root_id if isinstance(root_id, str) else None,
    )
