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

import threading
import time
from collections.abc import Iterable
from typing import Any, Final

from .._exceptions import CancelReason
from . import _workflow
from ._ledger import Entry, Ledger, Target, TargetKind

__all__ = ["TargetIndex", "request_targets"]

#: (reason, when it was recorded); one such pair is shared by many targets.
_Record = tuple[CancelReason, float]

#: The most targets `TargetIndex.purge` drops in one hold of the lock.
PURGE_BATCH: Final = 1000


class TargetIndex:
    """Live cancellation targets, by kind."""

    def __init__(self) -> None:
        #: Held by writers; taken around every fork (`cancellable.celery._runtime`).
        self.lock: Final = threading.Lock()
        self._tasks: dict[str, _Record] = {}
        self._groups: dict[str, _Record] = {}
        self._roots: dict[str, _Record] = {}
        self.cursor: str | None = None

    def _table(self, kind: TargetKind) -> dict[str, _Record]:
        if kind == "task":
            return self._tasks
        if kind == "group":
            return self._groups
        return self._roots

    def __len__(self) -> int:
        return len(self._tasks) + len(self._groups) + len(self._roots)

    def add(
        self, targets: Iterable[Target], reason: CancelReason, recorded_at: float | None = None
    ) -> list[Target]:
        """Index ``targets``; return those that were not indexed before."""
        record = (reason, time.time() if recorded_at is None else recorded_at)
        added: list[Target] = []
        with self.lock:
            for kind, target_id in targets:
                table = self._table(kind)
                if target_id not in table:
                    table[target_id] = record
                    added.append((kind, target_id))
        return added

    def add_entries(self, entries: Iterable[Entry]) -> list[Target]:
        """Index ledger entries in order; return the targets that are new here."""
        added: list[Target] = []
        for entry in entries:
            added.extend(self.add(entry.targets, entry.reason, entry.recorded_at))
        return added

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
        return target_id in self._table(kind)

    def purge(self, ttl: float, now: float | None = None) -> int:
        """Drop targets recorded more than ``ttl`` seconds ago; return how many."""
        horizon = (time.time() if now is None else now) - ttl
        dropped = 0
        for table in (self._tasks, self._groups, self._roots):
            # A snapshot (one copy under the lock), then deletions in small
            # batches under the lock: a record replaced meanwhile is kept.
            with self.lock:
                snapshot = table.copy()  # 40-100 ms for a million targets
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
        child._tasks, child._groups, child._roots = self._tasks, self._groups, self._roots
        child.cursor = self.cursor
        return child


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
