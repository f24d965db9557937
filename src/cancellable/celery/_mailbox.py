"""The shared-memory mailbox between a prefork worker's main process and its children.

A prefork child has no broker connection, so the main process tells it about
a cancellation through memory both can see: an anonymous shared ``mmap``
that the main process creates at ``worker_init``, before the pool forks, so
every child maps the same pages.

Layout: a key table (`KEY_SIZE` bytes per slot: the task id, NUL-padded),
an acknowledgement table (one byte per slot), a step table (one byte per
slot: `COOPERATIVE` or `INTERRUPT`, the ladder step the main process asks
for), then the slots themselves (``[u32 length][JSON: id, reason,
delivered_at]``).

Invariants:

* **One writer**, the main process (its threads serialise on ``_lock``), and
  any number of readers, the children.
* **Slots belong to tasks the worker holds.**  The main process allocates a
  slot only for a cancelled task it has reserved or is running, and frees it
  only once the task has left the worker.  Slots are never reused while
  their task is held, so no cancellation, however many ids a revoke names,
  can overwrite another's slot.  The table is sized at worker start for the
  most tasks a worker can hold at once (prefetch plus concurrency).
* **Publish last.**  The writer blanks a slot's key, writes the slot, clears
  its acknowledgement byte, then writes the key.  A reader finds a key,
  reads the slot and checks the id inside it, so a slot caught mid-rewrite
  is skipped, never misread; the writer keeps delivering until the child
  acknowledges.
* **Steps only go up.**  A slot starts `COOPERATIVE` (cancel the scope at
  the next checkpoint); once its grace is over, the main process sets it to
  `INTERRUPT` (raise in the task's thread from the signal handler, see
  `cancellable.celery._interrupt`) and keeps signalling.  A new slot is
  written `COOPERATIVE` before its key is published.
* **Acknowledged by the reader.**  A child that has acted on a slot (it
  cancelled the running task's scope, or skipped a task at start) sets the
  slot's acknowledgement byte; the main process stops waking the child.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import struct
import threading
from typing import Final

from .._exceptions import CancelReason

__all__ = ["COOPERATIVE", "INTERRUPT", "MAX_SLOTS", "MIN_SLOTS", "Mailbox", "key_of"]

#: Bytes per key: a 36-character UUID and its NUL; longer ids are hashed.
KEY_SIZE: Final = 40
SLOT_SIZE: Final = 8192
MIN_SLOTS: Final = 64
MAX_SLOTS: Final = 4096
_SLOT_HEAD: Final = struct.Struct("<I")
#: Ladder steps a slot can ask for (its byte in the step table).
COOPERATIVE: Final = 0
INTERRUPT: Final = 1


def key_of(task_id: str) -> bytes:
    """The fixed-size key of a task id (shared with `cancellable.celery._childtable`)."""
    raw = task_id.encode()
    if len(raw) >= KEY_SIZE:
        raw = b"#" + hashlib.blake2b(raw, digest_size=16).hexdigest().encode()
    return raw.ljust(KEY_SIZE, b"\0")


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    """A mailbox slot a reader found for one of its tasks."""

    slot: int
    reason: CancelReason
    delivered_at: float


class Mailbox:
    """``slots`` fixed-size slots in anonymous shared memory (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        self.slots = max(MIN_SLOTS, min(MAX_SLOTS, slots))
        self._acks_at = self.slots * KEY_SIZE
        self._steps_at = self._acks_at + self.slots
        self._slots_at = self._steps_at + self.slots
        self._map = mmap.mmap(-1, self._slots_at + self.slots * SLOT_SIZE)
        self._free = list(range(self.slots - 1, -1, -1))
        self._lock = threading.Lock()
        #: The process that created the map: only its forks share it.
        self.owner = os.getpid()

    # -- the writer (main process) --------------------------------------------

    def allocate(self, task_id: str, reason: CancelReason, delivered_at: float) -> int | None:
        """Write a slot for ``task_id``; return its number, or None if all are taken."""

        def encode(reason: CancelReason) -> bytes:
            entry = {"id": task_id, "reason": reason.to_dict(), "delivered_at": delivered_at}
            return json.dumps(entry).encode()

        payload = encode(reason)
        if len(payload) > SLOT_SIZE - _SLOT_HEAD.size:
            # Only a long non-ASCII message can do this: keep the id, trim the text.
            payload = encode(dataclasses.replace(reason, message=reason.message[:500]))
        key = key_of(task_id)
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
            key_at = slot * KEY_SIZE
            slot_at = self._slots_at + slot * SLOT_SIZE
            self._map[key_at : key_at + KEY_SIZE] = bytes(KEY_SIZE)
            _SLOT_HEAD.pack_into(self._map, slot_at, len(payload))
            start = slot_at + _SLOT_HEAD.size
            self._map[start : start + len(payload)] = payload
            self._map[self._acks_at + slot] = 0
            self._map[self._steps_at + slot] = COOPERATIVE
            self._map[key_at : key_at + KEY_SIZE] = key
        return slot

    def release(self, slot: int) -> None:
        """Blank ``slot`` and make it free again (its task has left the worker)."""
        with self._lock:
            key_at = slot * KEY_SIZE
            self._map[key_at : key_at + KEY_SIZE] = bytes(KEY_SIZE)
            self._free.append(slot)

    def acknowledged(self, slot: int) -> bool:
        """Whether a child has acted on ``slot``."""
        return bool(self._map[self._acks_at + slot])

    def escalate(self, slot: int) -> None:
        """Ask the child to interrupt the slot's task (its grace is over)."""
        self._map[self._steps_at + slot] = INTERRUPT

    @property
    def free(self) -> int:
        """Slots not in use."""
        return len(self._free)

    # -- readers (pool children) ----------------------------------------------

    def find(self, task_ids: set[str]) -> dict[str, Found]:
        """Slots that name one of ``task_ids``."""
        found: dict[str, Found] = {}
        for task_id in task_ids:
            key = key_of(task_id)
            at = self._map.find(key, 0, self._acks_at)
            while at != -1:
                slot, misaligned = divmod(at, KEY_SIZE)
                if not misaligned:
                    entry = self._read(slot, task_id)
                    if entry is not None:
                        found[task_id] = entry
                        break
                at = self._map.find(key, at + 1, self._acks_at)
        return found

    def _read(self, slot: int, task_id: str) -> Found | None:
        slot_at = self._slots_at + slot * SLOT_SIZE
        (length,) = _SLOT_HEAD.unpack_from(self._map, slot_at)
        start = slot_at + _SLOT_HEAD.size
        raw = self._map[start : start + min(length, SLOT_SIZE - _SLOT_HEAD.size)]
        try:
            data = json.loads(raw)
            if data["id"] == task_id:
                reason = CancelReason.from_dict(data["reason"])
                return Found(slot, reason, float(data["delivered_at"]))
        except (ValueError, KeyError, TypeError):
            pass  # being rewritten right now: the writer keeps delivering
        return None

    def step(self, slot: int) -> int:
        """The ladder step the main process asks of ``slot``'s task."""
        return self._map[self._steps_at + slot]

    def acknowledge(self, slot: int) -> None:
        """Tell the main process this child has acted on ``slot``."""
        self._map[self._acks_at + slot] = 1
