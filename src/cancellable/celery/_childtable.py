"""What each prefork child runs, in memory the main process can read.

The last step of the cancellation ladder kills a pool child.  Killing the
child that ``request.worker_pid`` names is what Celery's
``revoke(terminate=True)`` does, and it is racy: by the time the signal
lands, the child may have finished the task and started the next one.  We
make it race-free instead (see `cancellable.celery._ladder`): the main
process *stops* the child (``SIGSTOP``), reads here which task it runs, and
kills it only if that is still the cancelled task.  A stopped process cannot
change what it publishes, so the answer cannot go stale between the read
and the kill.

Layout: one row per pool *index* (billiard gives each child an index from 0
to concurrency - 1, and a replacement child takes the index of the child it
replaces), so a child only ever writes its own row and rows never need
allocating.  A row is ``[u32 pid][u8 busy][40-byte task key]``
(`cancellable.celery._mailbox.KEY_SIZE`, the same key as the mailbox).

Invariants (the child is the only writer of its row):

* The child writes its pid into its row when it starts (``worker_process_init``).
* It publishes the task's key *before* the task's body can start, and
  blanks it *before* it can take another task (the task boundary,
  `cancellable.celery._task`).  A stopped child whose row names task X is
  therefore inside X's boundary, and nothing else.
* The child sets its row's busy byte before it writes the key and clears
  it after, so a child stopped in the middle of writing is seen as busy
  (`ChildTable.busy`), and the main process asks again later rather than
  read a blend (a task id cut short can equal another, shorter id).  Keys
  go from blank to a key and back to blank, never from one key straight to
  another.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Final

from ._mailbox import KEY_SIZE, key_of

__all__ = ["ChildTable"]

_PID: Final = struct.Struct("<I")
#: Offset of the busy byte, then of the key, in a row.
_BUSY: Final = _PID.size
_KEY: Final = _BUSY + 1
ROW_SIZE: Final = _KEY + KEY_SIZE
#: Rows in the table: pool indexes at or above this cannot be terminated
#: race-free (the ladder then stops at the interrupt step, and says so).
ROWS: Final = 1024
_BLANK: Final = bytes(KEY_SIZE)


class ChildTable:
    """`ROWS` rows in anonymous shared memory, created before the pool forks."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, ROWS * ROW_SIZE)
        #: The process that created the map: only its forks share it.
        self.owner = os.getpid()
        #: This process's row (a child, after `claim`), or None.
        self.row: int | None = None

    # -- the child (one writer per row) -----------------------------------

    def claim(self, index: int) -> bool:
        """Take row ``index`` for this process (a child starting); False if out of range."""
        if not 0 <= index < ROWS:
            self.row = None
            return False
        self.row = index
        at = index * ROW_SIZE
        self._map[at + _BUSY] = 0
        self._map[at + _KEY : at + ROW_SIZE] = _BLANK
        _PID.pack_into(self._map, at, os.getpid())
        return True

    def publish(self, task_id: str) -> None:
        """Say that this child runs ``task_id`` from now on (before its body starts)."""
        self._write(key_of(task_id))

    def clear(self) -> None:
        """Say that this child runs no task (before it can take another one)."""
        self._write(_BLANK)

    def _write(self, key: bytes) -> None:
        if self.row is not None:
            at = self.row * ROW_SIZE
            self._map[at + _BUSY] = 1
            self._map[at + _KEY : at + ROW_SIZE] = key
            self._map[at + _BUSY] = 0

    # -- the main process (reader) -----------------------------------------

    def runs(self, pid: int, task_id: str) -> bool:
        """Whether the child ``pid`` says it runs ``task_id``.

        Only meaningful while that child is stopped: then the answer holds
        until it is continued.
        """
        at = self._row_of(pid)
        return at is not None and self._map[at + _KEY : at + ROW_SIZE] == key_of(task_id)

    def busy(self, pid: int) -> bool:
        """Whether the child ``pid`` was stopped while writing its row (read it again later)."""
        at = self._row_of(pid)
        return at is not None and self._map[at + _BUSY] != 0

    def knows(self, pid: int) -> bool:
        """Whether the child ``pid`` has a row (it can be terminated race-free)."""
        return self._row_of(pid) is not None

    def _row_of(self, pid: int) -> int | None:
        # The offset of the row of child ``pid``, or None.
        for row in range(ROWS):
            at = row * ROW_SIZE
            (row_pid,) = _PID.unpack_from(self._map, at)
            if row_pid == pid:
                return at
        return None
