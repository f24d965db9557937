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
allocating.  A row is ``[u32 pid][40-byte task key]``
(`cancellable.celery._mailbox.KEY_SIZE`, the same key as the mailbox).

Invariants (the child is the only writer of its row):

* The child writes its pid into its row when it starts (``worker_process_init``).
* It publishes the task's key *before* the task's body can start, and
  blanks it *before* it can take another task (the task boundary,
  `cancellable.celery._task`).  A stopped child whose row names task X is
  therefore inside X's boundary, and nothing else.
* A torn read (a child stopped in the middle of writing its key) cannot
  name the cancelled task unless that task is the one the child runs: keys
  go from blank to a key and back to blank, never from one key straight to
  another, and a blend of a key and blanks never equals a different key.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Final

from ._mailbox import KEY_SIZE, key_of

__all__ = ["ChildTable"]

_PID: Final = struct.Struct("<I")
ROW_SIZE: Final = _PID.size + KEY_SIZE
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
        self._map[at + _PID.size : at + ROW_SIZE] = _BLANK
        _PID.pack_into(self._map, at, os.getpid())
        return True

    def publish(self, task_id: str) -> None:
        """Say that this child runs ``task_id`` from now on (before its body starts)."""
        if self.row is not None:
            at = self.row * ROW_SIZE + _PID.size
            self._map[at : at + KEY_SIZE] = key_of(task_id)

    def clear(self) -> None:
        """Say that this child runs no task (before it can take another one)."""
        if self.row is not None:
            at = self.row * ROW_SIZE + _PID.size
            self._map[at : at + KEY_SIZE] = _BLANK

    # -- the main process (reader) -----------------------------------------

    def runs(self, pid: int, task_id: str) -> bool:
        """Whether the child ``pid`` says it runs ``task_id``.

        Only meaningful while that child is stopped: then the answer holds
        until it is continued.
        """
        key = key_of(task_id)
        for row in range(ROWS):
            at = row * ROW_SIZE
            (row_pid,) = _PID.unpack_from(self._map, at)
            if row_pid == pid:
                return self._map[at + _PID.size : at + ROW_SIZE] == key
        return False

    def knows(self, pid: int) -> bool:
        """Whether the child ``pid`` has a row (it can be terminated race-free)."""
        for row in range(ROWS):
            (row_pid,) = _PID.unpack_from(self._map, row * ROW_SIZE)
            if row_pid == pid:
                return True
        return False
