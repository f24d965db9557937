"""The shared-memory mailbox between a prefork worker's main process and its children."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from cancellable import CancelReason
from cancellable.celery import _mailbox
from cancellable.celery._mailbox import Mailbox


def slot_offset(box: Mailbox, slot: int) -> int:
    """Where ``slot``'s payload area starts in the map (after the key, ack and step tables)."""
    return box.slots * _mailbox.KEY_SIZE + 2 * box.slots + slot * _mailbox.SLOT_SIZE


class TestAllocation:
    """Slots belong to held tasks and are never overwritten."""

    def test_full_mailbox_refuses_and_never_overwrites(self) -> None:
        """300 cancellations on 64 slots: 64 get a slot, the rest get None, and
        every one of the 64 is still found with its own reason."""
        box = Mailbox(64)
        ids = [f"task-{n}-{uuid.uuid4()}" for n in range(300)]

        slots = [box.allocate(t, CancelReason(message=t), float(n)) for n, t in enumerate(ids)]
        found = box.find(set(ids))

        assert 64 == box.slots
        assert sorted(range(64)) == sorted(s for s in slots if s is not None)
        assert [None] * 236 == slots[64:]
        assert set(ids[:64]) == set(found)
        assert all(found[t].reason.message == t for t in ids[:64])
        assert 0 == box.free

    def test_release_frees_a_slot(self) -> None:
        """A released slot is blank (its task is no longer found) and is reused."""
        box = Mailbox(64)
        held = [f"held-{n}" for n in range(64)]
        slots = [box.allocate(t, CancelReason(), 1.0) for t in held]

        box.release(slots[10])  # type: ignore[arg-type]
        again = box.allocate("newcomer", CancelReason(message="new"), 2.0)

        assert slots[10] == again
        assert {} == box.find({"held-10"})
        assert "new" == box.find({"newcomer"})["newcomer"].reason.message
        assert set(held) - {"held-10"} == set(box.find(set(held)))

    def test_size_is_clamped(self) -> None:
        """Fewer than MIN_SLOTS slots are rounded up, more than MAX_SLOTS down."""
        assert (_mailbox.MIN_SLOTS, _mailbox.MAX_SLOTS) == (
            Mailbox(1).slots,
            Mailbox(1 << 30).slots,
        )


class TestFind:
    """Readers find their task's slot and nothing else."""

    def test_find_returns_the_reason_and_time(self) -> None:
        """A slot is found by its task id, with the reason and delivery time."""
        box = Mailbox(64)
        reason = CancelReason(source="revoked", message="m", requested_by="me")
        slot = box.allocate("abc", reason, 123.5)

        found = box.find({"abc", "other"})

        assert ["abc"] == list(found)
        assert (slot, reason, 123.5) == (
            found["abc"].slot,
            found["abc"].reason,
            found["abc"].delivered_at,
        )
        assert {} == box.find(set())

    def test_prefixes_do_not_match(self) -> None:
        """An id that is a prefix of a held id, or extends it, is not matched."""
        box = Mailbox(64)
        box.allocate("abc-longer", CancelReason(), 1.0)

        assert {} == box.find({"abc", "abc-longer-still"})

    def test_long_ids_hash_without_collision(self) -> None:
        """Ids too long for a key (39, 40, 41 and 500 characters sharing a prefix) are
        hashed; each is found with its own reason and none matches another."""
        base = "L" * 39
        ids = [base, base + "x", base + "xy", base + "y" * 461, base + "y" * 460 + "z"]
        box = Mailbox(64)
        for task_id in ids:
            box.allocate(task_id, CancelReason(message=str(len(task_id))), 1.0)

        found = box.find(set(ids))

        assert {t: str(len(t)) for t in ids} == {t: f.reason.message for t, f in found.items()}
        assert {} == box.find({base + "y" * 460})

    def test_a_new_slot_is_cooperative_until_escalated(self) -> None:
        """The step byte starts COOPERATIVE, goes to INTERRUPT, and a reused slot starts over."""
        box = Mailbox(64)
        slot = box.allocate("a", CancelReason(), 1.0)
        assert slot is not None
        first = box.step(slot)
        box.escalate(slot)
        escalated = box.step(slot)
        box.release(slot)
        again = box.allocate("b", CancelReason(), 1.0)
        assert again is not None

        assert (_mailbox.COOPERATIVE, _mailbox.INTERRUPT) == (first, escalated)
        assert _mailbox.COOPERATIVE == box.step(again)

    def test_a_slot_being_rewritten_is_skipped(self) -> None:
        """A key whose slot holds garbage (caught mid-rewrite) is not a match."""
        box = Mailbox(64)
        slot = box.allocate("torn", CancelReason(), 1.0)
        at = slot_offset(box, slot)  # type: ignore[arg-type]

        box._map[at + 4 : at + 8] = b"\xff\xfe{{"

        assert {} == box.find({"torn"})

    def test_a_slot_naming_another_task_is_skipped(self) -> None:
        """A key whose slot already holds another task's payload is not a match."""
        box = Mailbox(64)
        slot = box.allocate("mine", CancelReason(), 1.0)
        at = slot_offset(box, slot)  # type: ignore[arg-type]
        other = json.dumps(
            {"id": "theirs", "reason": CancelReason().to_dict(), "delivered_at": 1.0}
        ).encode()

        box._map[at : at + 4] = len(other).to_bytes(4, "little")
        box._map[at + 4 : at + 4 + len(other)] = other

        assert {} == box.find({"mine"})

    def test_huge_message_is_trimmed_not_lost(self) -> None:
        """A message too large for a slot is shortened; the id still matches."""
        box = Mailbox(64)
        box.allocate("big", CancelReason(message="é" * CancelReason.MAX_MESSAGE_LENGTH), 1.0)

        found = box.find({"big"})["big"]

        assert "é" * 500 == found.reason.message


class TestAcknowledge:
    """Children acknowledge slots; the main process sees it."""

    def test_round_trip(self) -> None:
        """A new slot is unacknowledged, acknowledge() sets it, a reused slot is clear."""
        box = Mailbox(64)
        slot = box.allocate("a", CancelReason(), 1.0)
        assert slot is not None
        before = box.acknowledged(slot)

        box.acknowledge(slot)
        after = box.acknowledged(slot)
        box.release(slot)
        reused = box.allocate("b", CancelReason(), 1.0)

        assert (False, True) == (before, after)
        assert slot == reused
        assert not box.acknowledged(slot)

    def test_a_forked_child_sees_the_parents_slot(self) -> None:
        """A slot written after the fork is found by the child, and the child's
        acknowledgement is seen by the parent: the map is shared, not copied."""
        box = Mailbox(64)
        go_read, go_write = os.pipe()
        report_read, report_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; coverage does not follow it
            code = 1
            try:
                os.close(go_write)
                os.close(report_read)
                os.read(go_read, 1)
                found = box.find({"forked-task"})
                entry = found.get("forked-task")
                if entry is not None:
                    box.acknowledge(entry.slot)
                    report = {"slot": entry.slot, "message": entry.reason.message}
                else:
                    report = {"slot": None, "message": None}
                os.write(report_write, json.dumps(report).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(go_read)
        os.close(report_write)
        try:
            slot = box.allocate("forked-task", CancelReason(message="from parent"), 1.0)
            os.write(go_write, b"g")
            report = json.loads(os.read(report_read, 4096))
        finally:
            os.close(go_write)
            os.close(report_read)
            _, status = os.waitpid(pid, 0)

        assert 0 == os.waitstatus_to_exitcode(status)
        assert {"slot": slot, "message": "from parent"} == report
        assert box.acknowledged(slot)  # type: ignore[arg-type]


@pytest.mark.parametrize("slots", [64, 200])
def test_every_slot_is_usable(slots: int) -> None:
    """Each of the mailbox's slots can be written and found, the last one included."""
    box = Mailbox(slots)
    ids = [f"s-{n}" for n in range(slots)]
    for task_id in ids:
        box.allocate(task_id, CancelReason(message=task_id), 0.0)

    found = box.find(set(ids))

    assert {t: t for t in ids} == {t: f.reason.message for t, f in found.items()}
