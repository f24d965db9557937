"""The shared-memory mailbox between a prefork worker's main process and its children."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import uuid

import pytest

from cancellable import CancelReason
from cancellable.celery import _mailbox, _wire
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
        box.escalate(slot, "a")
        escalated = box.step(slot)
        box.release(slot)
        again = box.allocate("b", CancelReason(), 1.0)
        assert again is not None

        assert (_mailbox.COOPERATIVE, _mailbox.INTERRUPT) == (first, escalated)
        assert _mailbox.COOPERATIVE == box.step(again)

    def test_a_late_escalation_never_reaches_the_next_task_of_a_slot(self) -> None:
        """An escalation for a task whose slot was freed and given to another task
        writes nothing: the new task stays COOPERATIVE."""
        box = Mailbox(64)
        slot = box.allocate("gone", CancelReason(), 1.0)
        assert slot is not None
        box.release(slot)
        again = box.allocate("next", CancelReason(), 1.0)

        sent = box.escalate(slot, "gone")

        assert (slot, False) == (again, sent)
        assert _mailbox.COOPERATIVE == box.step(slot)

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
        other = _mailbox.encode_payload("theirs", CancelReason(), 1.0)

        box._map[at : at + 4] = len(other).to_bytes(4, "little")
        box._map[at + 4 : at + 4 + len(other)] = other

        assert {} == box.find({"mine"})
        assert {} == box.find({"theirs"})

    def test_a_length_past_the_slot_is_skipped(self) -> None:
        """A length word larger than a slot (caught mid-rewrite) is not read past the slot."""
        box = Mailbox(64)
        slot = box.allocate("torn", CancelReason(), 1.0)
        at = slot_offset(box, slot)  # type: ignore[arg-type]

        box._map[at : at + 4] = (_mailbox.SLOT_SIZE + 10).to_bytes(4, "little")

        assert {} == box.find({"torn"})


EMOJI = "\N{GRINNING FACE}"


class TestSizes:
    """A slot's write is bounded in bytes (issue 18, point 3)."""

    def test_the_largest_reason_and_a_long_id_fit_whole(self) -> None:
        """4,096 emoji (4 bytes each in UTF-8, 12 as JSON escapes), an emoji requester
        of 256 and a 9,000-character id: found whole, and the neighbouring slots keep
        their own tasks and reasons."""
        box = Mailbox(64)
        before = box.allocate("before", CancelReason(message="b"), 1.0)
        big_id = "L" * 9000
        big = CancelReason(
            source="revoked",
            message=EMOJI * CancelReason.MAX_MESSAGE_LENGTH,
            requested_by=EMOJI * 256,
        )
        slot = box.allocate(big_id, big, 2.0)
        after = box.allocate("after", CancelReason(message="a"), 3.0)

        found = box.find({big_id, "before", "after"})

        assert (0, 1, 2) == (before, slot, after)
        assert big == found[big_id].reason
        assert "b" == found["before"].reason.message
        assert "a" == found["after"].reason.message
        assert len(_mailbox.encode_payload(big_id, big, 2.0)) <= _mailbox.MAX_PAYLOAD

    @pytest.mark.parametrize("char", ["\x00", '"', "\\", "\ud800", EMOJI])
    def test_a_message_too_large_is_cut_at_a_character(self, char: str) -> None:
        """Messages of 4,096 characters of one kind, with a requester of 256 control
        characters.  Those JSON escapes in 6 bytes (control characters) overflow even a
        20 KiB slot: the message is cut at a character boundary to the longest prefix
        that fits, ends with the trimmed mark, and the next slot is untouched.  The
        others (2, 3 or 4 bytes each) fit whole."""
        box = Mailbox(64)
        message = "x" + char * (CancelReason.MAX_MESSAGE_LENGTH - 1)
        reason = CancelReason(message=message, requested_by="\x01" * 256)
        slot = box.allocate("cut", reason, 1.0)
        box.allocate("next", CancelReason(message="next"), 1.0)
        payload = _mailbox.encode_payload("cut", reason, 1.0)

        found = box.find({"cut", "next"})
        got = found["cut"].reason.message

        assert len(payload) <= _mailbox.MAX_PAYLOAD
        assert "next" == found["next"].reason.message
        assert reason.requested_by == found["cut"].reason.requested_by
        assert slot == found["cut"].slot
        if char != "\x00":
            assert message == got
            return
        assert got.endswith(_wire.TRIMMED)
        kept = got[: -len(_wire.TRIMMED)]
        assert message.startswith(kept)
        assert 2000 < len(kept) < len(message)
        # Nothing more would have fitted: one more character overflows the slot.
        longer = dataclasses.replace(reason, message=message[: len(kept) + 1] + _wire.TRIMMED)
        assert len(_mailbox._encode(_mailbox._digest("cut"), longer, 1.0)) > _mailbox.MAX_PAYLOAD

    def test_every_slot_holds_a_largest_reason(self) -> None:
        """All 64 slots written with a reason of 4,000 emoji, the last slot included:
        each is found with its own reason (nothing spills into a neighbour or past the
        map)."""
        box = Mailbox(64)
        ids = [f"{n}-" + "i" * 60 for n in range(64)]
        reasons = {t: CancelReason(message=t + EMOJI * 4000, requested_by=EMOJI * 256) for t in ids}
        for task_id in ids:
            box.allocate(task_id, reasons[task_id], 0.0)

        found = box.find(set(ids))

        assert reasons == {t: f.reason for t, f in found.items()}


class TestAtomicAllocation:
    """A task has one slot at most, and a slot is never lost (issue 18, point 8)."""

    def test_a_task_keeps_its_slot(self) -> None:
        """Allocating twice for one task returns the same slot and takes one."""
        box = Mailbox(64)
        first = box.allocate("t", CancelReason(message="first"), 1.0)
        again = box.allocate("t", CancelReason(message="second"), 2.0)

        assert first == again
        assert box.slots - 1 == box.free
        assert "first" == box.find({"t"})["t"].reason.message

    def test_releasing_twice_frees_once(self) -> None:
        """A second release of a slot does nothing: two later tasks get two slots."""
        box = Mailbox(64)
        slot = box.allocate("t", CancelReason(), 1.0)
        assert slot is not None
        box.release(slot)
        box.release(slot)
        one = box.allocate("one", CancelReason(), 1.0)
        two = box.allocate("two", CancelReason(), 1.0)

        assert one != two
        assert box.slots - 2 == box.free
        assert {"one", "two"} == set(box.find({"one", "two"}))

    def test_a_failed_write_keeps_the_slot_free(self) -> None:
        """A write that raises (the map is closed) gives the slot back: nothing is lost."""
        box = Mailbox(64)
        box._map.close()

        with pytest.raises(ValueError, match="closed"):
            box.allocate("t", CancelReason(), 1.0)

        assert (box.slots, {}) == (box.free, box.in_use())

    def test_threads_allocating_and_releasing_never_share_or_leak(self) -> None:
        """8 threads allocate at once, 2,000 times in all (the interpreter switching
        threads every microsecond): each allocates and releases slots for 5 tasks of
        its own, and allocates for 4 tasks all threads share.  A shared task gets one
        slot, whoever asks; a task is always found in the slot it was given; a snapshot
        of the key table never shows a task twice; and once every task is released,
        every slot is free, each once."""
        box = Mailbox(64)
        shared = [f"shared-{n}" for n in range(4)]
        errors: list[str] = []
        given: dict[str, set[int]] = {task_id: set() for task_id in shared}
        start = threading.Barrier(8)
        size = _mailbox.KEY_SIZE

        def work(seed: int) -> None:
            own = [f"own-{seed}-{n}" for n in range(5)]
            start.wait()
            for n in range(250):
                task_id = own[n % len(own)]
                slot = box.allocate(task_id, CancelReason(message=task_id), float(n))
                found = box.find({task_id}).get(task_id)
                if slot is None or found is None or found.slot != slot:
                    errors.append(f"{task_id}: given {slot}, found {found}")
                if n % 2:
                    box.release(slot)  # type: ignore[arg-type]
                key = shared[n % len(shared)]
                given[key].add(box.allocate(key, CancelReason(), 0.0))  # type: ignore[arg-type]
                table = bytes(box._map[: box.slots * size])
                keys = [table[at : at + size] for at in range(0, len(table), size)]
                published = [k for k in keys if any(k)]
                if len(published) != len(set(published)):
                    errors.append("a task published twice")

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            sys.setswitchinterval(interval)

        in_use = box.in_use()
        assert [] == errors
        assert all(1 == len(slots) for slots in given.values()), given
        assert box.slots == box.free + len(in_use)
        assert len(in_use) == len(set(in_use.values()))
        for slot in in_use.values():
            box.release(slot)
        assert sorted(range(box.slots)) == sorted(box._free)


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
