"""The shared-memory mailbox between a prefork worker's main process and its children.

A prefork child has no broker connection, so the main process tells it about
a cancellation through memory both can see: an anonymous shared ``mmap``
that the main process creates at ``worker_init``, before the pool forks, so
every child maps the same pages.

Layout: a key table (`KEY_SIZE` bytes per slot: the task id, NUL-padded,
or a digest of a longer id), an acknowledgement table (one byte per slot), a
step table (one byte per slot: `COOPERATIVE` or `INTERRUPT`, the ladder step
the main process asks for), then the slots themselves (``[u32 length][JSON
as UTF-8: the id's digest, reason, delivered_at]``).

Sizes, in bytes: a slot is `SLOT_SIZE` (20 KiB), so its payload can be
`MAX_PAYLOAD` bytes.  The payload carries a 32-character digest of the task
id, never the id itself, so an id of any length fits; and every reason that
`~cancellable.CancelReason` accepts (a message of up to 4,096 characters and
a requester of up to 256, each up to 4 bytes in UTF-8) fits whole (17.6 KB at
most).  Only a message made mostly of characters JSON escapes (control
characters take 6 bytes each) can be too long; then the message is cut at a
character boundary and ends with `~cancellable.celery._wire.TRIMMED` (the full reason is in the
ledger and in the worker's ``cancel.delivered`` log line).

Invariants:

* **One writer**, the main process (its threads serialise on ``lock``), and
  any number of readers, the children.  Allocation is atomic: a task has
  at most one slot, however many threads allocate for it at once, and a
  slot is taken only when its write succeeds (an error frees it again).
  Releasing a free slot does nothing.
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
  written `COOPERATIVE` before its key is published, and an escalation
  names its task, so one that comes late never reaches the slot's next task.
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
from ._wire import TRIMMED

__all__ = [
    "COOPERATIVE",
    "INTERRUPT",
    "MAX_PAYLOAD",
    "MAX_SLOTS",
    "MIN_SLOTS",
    "SLOT_SIZE",
    "Mailbox",
    "key_of",
]

#: Bytes per key: a 36-character UUID and its NUL; longer ids are hashed.
KEY_SIZE: Final = 40
#: Bytes per slot (see the module docstring for what fits).
SLOT_SIZE: Final = 20 * 1024
MIN_SLOTS: Final = 64
MAX_SLOTS: Final = 4096
_SLOT_HEAD: Final = struct.Struct("<I")
#: The most bytes a slot's payload can have.
MAX_PAYLOAD: Final = SLOT_SIZE - _SLOT_HEAD.size
#: Ladder steps a slot can ask for (its byte in the step table).
COOPERATIVE: Final = 0
INTERRUPT: Final = 1


def key_of(task_id: str) -> bytes:
    """The fixed-size key of a task id (shared with `cancellable.celery._childtable`)."""
    raw = task_id.encode("utf-8", "surrogatepass")
    if len(raw) >= KEY_SIZE:
        raw = b"#" + hashlib.blake2b(raw, digest_size=16).hexdigest().encode()
    return raw.ljust(KEY_SIZE, b"\0")


def _digest(task_id: str) -> str:
    # What a payload says its task is: 32 characters, whatever the id's length.
    return hashlib.blake2b(task_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _encode(digest: str, reason: CancelReason, delivered_at: float) -> bytes:
    entry = {"key": digest, "reason": reason.to_dict(), "delivered_at": delivered_at}
    text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def encode_payload(task_id: str, reason: CancelReason, delivered_at: float) -> bytes:
    """A slot's payload for ``task_id``: at most `MAX_PAYLOAD` bytes.

    A message too long for the slot is cut at a character boundary (the
    longest prefix that fits) and ends with `~cancellable.celery._wire.TRIMMED`.
    """
    digest = _digest(task_id)
    payload = _encode(digest, reason, delivered_at)
    if len(payload) <= MAX_PAYLOAD:
        return payload
    message = reason.message
    if len(_encode(digest, _cut(reason, message, 0), delivered_at)) > MAX_PAYLOAD:
        # Not even an empty message fits: only the requester can be that long.
        reason = dataclasses.replace(reason, requested_by=None)
    low, high = 0, len(message)  # the longest prefix that fits is in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if len(_encode(digest, _cut(reason, message, middle), delivered_at)) <= MAX_PAYLOAD:
            low = middle
        else:
            high = middle
    payload = _encode(digest, _cut(reason, message, low), delivered_at)
    if len(payload) > MAX_PAYLOAD:  # pragma: no cover - the bounds above rule it out
        raise ValueError(f"a cancellation reason cannot fit a {SLOT_SIZE}-byte mailbox slot")
    return payload


def _cut(reason: CancelReason, message: str, length: int) -> CancelReason:
    return dataclasses.replace(reason, message=message[:length] + TRIMMED)


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
        #: The slot of each task that has one, and the task of each slot in use.
        self._slot_of: dict[str, int] = {}
        self._task_of: dict[int, str] = {}
        #: Serialises the writers; taken around every fork (`cancellable.celery._runtime`).
        self.lock = threading.Lock()
        #: The process that created the map: only its forks share it.
        self.owner = os.getpid()

    # -- the writer (main process) --------------------------------------------

    def allocate(self, task_id: str, reason: CancelReason, delivered_at: float) -> int | None:
        """Write a slot for ``task_id``; return its number, or None if all are taken.

        A task that has a slot already keeps it (it is returned, not
        rewritten).  If the write fails, the slot is free again and the
        error propagates.
        """
        payload = encode_payload(task_id, reason, delivered_at)
        key = key_of(task_id)
        with self.lock:
            held = self._slot_of.get(task_id)
            if held is not None:
                return held
            if not self._free:
                return None
            slot = self._free.pop()
            key_at = slot * KEY_SIZE
            try:
                slot_at = self._slots_at + slot * SLOT_SIZE
                self._map[key_at : key_at + KEY_SIZE] = bytes(KEY_SIZE)
                _SLOT_HEAD.pack_into(self._map, slot_at, len(payload))
                start = slot_at + _SLOT_HEAD.size
                self._map[start : start + len(payload)] = payload
                self._map[self._acks_at + slot] = 0
                self._map[self._steps_at + slot] = COOPERATIVE
                self._map[key_at : key_at + KEY_SIZE] = key
            except BaseException:
                # The key is published last, so it is still blank: free the slot.
                self._free.append(slot)
                raise
            self._slot_of[task_id] = slot
            self._task_of[slot] = task_id
        return slot

    def release(self, slot: int) -> None:
        """Blank ``slot`` and make it free again (its task has left the worker).

        Releasing a slot that is not in use does nothing.
        """
        with self.lock:
            task_id = self._task_of.get(slot)
            if task_id is None:
                return
            key_at = slot * KEY_SIZE
            self._map[key_at : key_at + KEY_SIZE] = bytes(KEY_SIZE)
            # Only once the key is blank (if that raised, the task keeps it).
            del self._task_of[slot]
            del self._slot_of[task_id]
            self._free.append(slot)

    def acknowledged(self, slot: int) -> bool:
        """Whether a child has acted on ``slot``."""
        return bool(self._map[self._acks_at + slot])

    def escalate(self, slot: int, task_id: str) -> bool:
        """Ask the child to interrupt ``task_id`` in ``slot`` (its grace is over).

        False, and nothing written, if the slot is no longer that task's (it
        left, and the slot may be another task's now).
        """
        with self.lock:
            if self._task_of.get(slot) != task_id:
                return False
            self._map[self._steps_at + slot] = INTERRUPT
        return True

    @property
    def free(self) -> int:
        """Slots not in use."""
        return len(self._free)

    def in_use(self) -> dict[str, int]:
        """The slot of each task that has one (a copy)."""
        with self.lock:
            return dict(self._slot_of)

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
        if length > MAX_PAYLOAD:
            return None  # being rewritten right now: the writer keeps delivering
        start = slot_at + _SLOT_HEAD.size
        raw = self._map[start : start + length]
        try:
            data = json.loads(raw.decode("utf-8", "surrogatepass"))
            if data["key"] == _digest(task_id):
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
