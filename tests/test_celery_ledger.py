"""The cancellation ledger: `RedisLedger` and `FileLedger` against real stores.

Redis is the shared server's DB 12 (flushed per test); the file ledger lives
in pytest's ``tmp_path``.  Each contract test runs against both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from tests import redis_dbs

from cancellable import CancelReason
from cancellable.celery import _ledger, _wire
from cancellable.celery._index import TargetIndex

REDIS_URL = redis_dbs.url(redis_dbs.UNIT_DB)


def make_ledger(kind: str, rdb: redis.Redis, directory: Path, ttl: float) -> Any:
    """A fresh, empty durable ledger of ``kind`` ("redis" or "file")."""
    if kind == "redis":
        return _ledger.RedisLedger(rdb, f"cancellable:test-{uuid.uuid4().hex[:6]}:", ttl)
    return _ledger.FileLedger(directory / "ledger", ttl)


@pytest.fixture(name="kind", params=["redis", "file"])
def kind_fixture(request: pytest.FixtureRequest) -> str:
    """Which durable ledger the test runs against."""
    return str(request.param)


@pytest.fixture(name="ledger")
def ledger_fixture(kind: str, rdb: redis.Redis, tmp_path: Path) -> Any:
    """Each durable ledger, empty, with a one-week TTL."""
    return make_ledger(kind, rdb, tmp_path, _ledger.DEFAULT_LEDGER_TTL)


def targets_of(entries: list[_ledger.Entry]) -> list[tuple[str, str]]:
    """Every target of ``entries``, in order."""
    return [target for entry in entries for target in entry.targets]


class TestContract:
    """What every durable ledger promises."""

    def test_record_once_writes_a_plain_revoke_once(self, ledger: Any) -> None:
        """Three writers record the same plain revoke of 2,500 ids under its key (its
        ids in any order): the first writes its 3 entries, the others nothing; a
        revoke of other ids is written."""
        targets: list[_ledger.Target] = [("task", f"id-{n}") for n in range(2500)]
        reason = CancelReason(source="revoked")

        wrote = [
            ledger.record_once(targets, reason, _ledger.revoke_key(targets)),
            ledger.record_once(targets[::-1], reason, _ledger.revoke_key(targets[::-1])),
            ledger.record_once(targets, reason, _ledger.revoke_key(targets)),
            ledger.record_once([("task", "other")], reason, _ledger.revoke_key([("task", "x")])),
        ]
        entries, _ = ledger.read(None)

        assert [True, False, False, True] == wrote
        assert [1000, 1000, 500, 1] == [len(e.targets) for e in entries]
        assert [reason] * 4 == [e.reason for e in entries]

    def test_round_trip(self, ledger: Any) -> None:
        """Targets of every kind and the reason come back as recorded."""
        reason = CancelReason(source="revoked", message="stop", requested_by="alice")
        targets = [("task", "a"), ("task", "b/with:odd chars é"), ("group", "g"), ("root", "r")]

        ledger.record(targets, reason)
        entries, cursor = ledger.read(None)

        assert 1 == len(entries)
        assert tuple(targets) == entries[0].targets
        assert reason == entries[0].reason
        assert cursor is not None
        assert abs(time.time() - entries[0].recorded_at) < 5

    def test_grace_round_trips(self, ledger: Any) -> None:
        """A grace recorded with a cancellation comes back with it; none given reads None."""
        ledger.record([("task", "a")], CancelReason(), 2.5)
        ledger.record([("task", "b")], CancelReason())
        entries, _cursor = ledger.read(None)

        assert [2.5, None] == [entry.grace for entry in entries]

    def test_empty_record_writes_nothing(self, ledger: Any) -> None:
        """Recording no targets adds no entry."""
        ledger.record([], CancelReason())

        assert ([], None) == ledger.read(None)

    def test_first_reason_wins_in_the_index(self, ledger: Any) -> None:
        """Two entries for one target: the index keeps the first reason."""
        first = CancelReason(source="revoked", message="first")
        second = CancelReason(source="revoked", message="second")
        ledger.record([("task", "a")], first)
        ledger.record([("task", "a"), ("task", "b")], second)
        index = TargetIndex()

        added = index.sync(ledger)

        assert [("task", "a"), ("task", "b")] == added
        assert first == index.match("a")
        assert second == index.match("b")

    def test_read_returns_each_entry_once(self, ledger: Any) -> None:
        """A cursor yields only what was recorded after it, each entry once."""
        ledger.record([("task", "one")], CancelReason())
        first, cursor = ledger.read(None)
        ledger.record([("task", "two")], CancelReason())
        ledger.record([("task", "three")], CancelReason())
        second, cursor = ledger.read(cursor)
        third, same = ledger.read(cursor)

        assert [("task", "one")] == targets_of(first)
        assert [("task", "two"), ("task", "three")] == targets_of(second)
        assert [] == third
        assert cursor == same

    def test_a_writer_with_a_clock_far_behind_is_not_hidden(
        self, ledger: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An entry recorded after a read is returned by the next read, even when
        the writer's clock is an hour behind the reader's."""
        ledger.record([("task", "before")], CancelReason())
        _, cursor = ledger.read(None)
        behind = time.time() - 3600
        with monkeypatch.context() as patched:
            patched.setattr(time, "time", lambda: behind)
            ledger.record([("task", "late-clock")], CancelReason(message="late"))

        entries, _ = ledger.read(cursor)

        assert [("task", "late-clock")] == targets_of(entries)
        assert "late" == entries[0].reason.message

    def test_large_batches_are_chunked(self, ledger: Any) -> None:
        """2,500 targets make three entries (1,000 + 1,000 + 500) with one reason."""
        reason = CancelReason(source="revoked", message="bulk")
        targets = [("task", f"t-{n}") for n in range(2500)]

        ledger.record(targets, reason)
        entries, _ = ledger.read(None)

        assert [1000, 1000, 500] == [len(e.targets) for e in entries]
        assert targets == targets_of(entries)
        assert [reason] * 3 == [e.reason for e in entries]

    def test_many_entries_are_read_across_pages(self, ledger: Any) -> None:
        """More entries than one read page (500) all come back, in order."""
        for n in range(1203):
            ledger.record([("task", f"p-{n}")], CancelReason())

        entries, cursor = ledger.read(None)
        again, _ = ledger.read(cursor)

        assert [("task", f"p-{n}") for n in range(1203)] == targets_of(entries)
        assert [] == again


class TestRedisLedger:
    """Details of the Redis stream ledger."""

    def test_entries_expire_by_the_servers_clock(self, rdb: redis.Redis) -> None:
        """An entry is returned while younger than the TTL and skipped after it.

        Both ages come from the server (the time in the stream id against the
        server's TIME), so a skewed client clock cannot change them; this test
        can only check the effect with the real clocks, which agree here.
        """
        ledger = _ledger.RedisLedger(rdb, "cancellable:ttl:", 0.5)
        ledger.record([("task", "x")], CancelReason())
        fresh, _ = ledger.read(None)
        time.sleep(0.6)
        stale, cursor = ledger.read(None)

        assert [("task", "x")] == targets_of(fresh)
        assert [] == stale
        assert cursor is not None  # the expired entry was passed over, not re-read

    def test_expired_entries_are_trimmed(self, rdb: redis.Redis) -> None:
        """A writer trims entries older than the TTL from the stream (approximately)."""
        writer = _ledger.RedisLedger(rdb, "cancellable:trim:", 0.5)
        for n in range(250):
            writer.record([("task", f"old-{n}")], CancelReason())
        time.sleep(0.6)

        _ledger.RedisLedger(rdb, "cancellable:trim:", 0.5).record([("task", "new")], CancelReason())
        entries, _ = writer.read(None)

        assert 251 > rdb.xlen("cancellable:trim:ledger")
        assert [("task", "new")] == targets_of(entries)

    @pytest.mark.parametrize(
        "fields",
        [
            {"something": "else"},
            {"reason": "{}", "targets": ""},
            {"reason": "{}", "targets": "queue:x\ntask:"},
        ],
    )
    def test_an_entry_without_targets_is_skipped(
        self, rdb: redis.Redis, fields: dict[str, str]
    ) -> None:
        """An entry that names no target this version knows is skipped; reading goes on."""
        ledger = _ledger.RedisLedger(rdb, "cancellable:bad:", 60)
        ledger.record([("task", "before")], CancelReason())
        rdb.xadd("cancellable:bad:ledger", fields)
        ledger.record([("task", "after")], CancelReason())

        entries, _ = ledger.read(None)

        assert [("task", "before"), ("task", "after")] == targets_of(entries)

    @pytest.mark.parametrize(
        ("reason", "expected"),
        [
            ("{not json", CancelReason(source="revoked", requested_at=0)),
            ("[]", CancelReason(source="revoked", requested_at=0)),
            ('"text"', CancelReason(source="revoked", message="text", requested_at=0)),
            ('{"source": "nope", "v": 2}', CancelReason(source="revoked", requested_at=0)),
            (
                '{"source": "manual", "message": 5, "requested_by": "x", "requested_at": 7}',
                CancelReason(source="manual", requested_by="x", requested_at=7),
            ),
        ],
    )
    def test_a_reason_another_version_wrote_keeps_its_targets(
        self, rdb: redis.Redis, reason: str, expected: CancelReason
    ) -> None:
        """An entry whose reason this version cannot read (not JSON, not a mapping, an
        unknown source, wrong types, extra fields) keeps its targets, its grace and its
        fields beside them are ignored, and its reason degrades (issue 18, point 9)."""
        ledger = _ledger.RedisLedger(rdb, "cancellable:skew:", 60)
        rdb.xadd(
            "cancellable:skew:ledger",
            {"reason": reason, "targets": "task:x\ngroup:g", "grace": "2", "future": "yes"},
        )

        entries, _ = ledger.read(None)

        assert [("task", "x"), ("group", "g")] == targets_of(entries)
        assert 2.0 == entries[0].grace
        got = entries[0].reason
        if expected.requested_at == 0:
            # No readable time: the entry's own (the server's clock) stands in.
            assert abs(got.requested_at - entries[0].recorded_at) < 1e-6
            got = dataclasses.replace(got, requested_at=0)
        assert expected == got

    def test_unknown_target_kinds_are_dropped(self, rdb: redis.Redis) -> None:
        """Target lines of an unknown kind, or without an id, are ignored."""
        ledger = _ledger.RedisLedger(rdb, "cancellable:kinds:", 60)
        rdb.xadd(
            "cancellable:kinds:ledger",
            {
                "reason": json.dumps(CancelReason().to_dict()),
                "targets": "task:a\nqueue:q\ngroup:\nroot:r",
            },
        )

        entries, _ = ledger.read(None)

        assert [("task", "a"), ("root", "r")] == targets_of(entries)

    def test_record_once_writes_a_plain_revoke_once(self, rdb: redis.Redis) -> None:
        """Three writers record the same plain revoke of 2,500 ids under its key (in
        any order of ids): the first writes its 3 entries, the others nothing, and
        the key expires with the entries (the ledger's TTL, on the server)."""
        prefix = f"cancellable:once-{uuid.uuid4().hex[:8]}:"
        ledger = _ledger.RedisLedger(rdb, prefix, 60)
        targets: list[_ledger.Target] = [("task", f"id-{n}") for n in range(2500)]
        key = _ledger.revoke_key(targets)

        wrote = [
            ledger.record_once(targets, CancelReason(source="revoked"), key),
            ledger.record_once(targets[::-1], CancelReason(source="revoked"), key),
            ledger.record_once(
                list(reversed(targets)),
                CancelReason(source="revoked"),
                _ledger.revoke_key(targets[::-1]),
            ),
        ]
        entries, _ = ledger.read(None)

        assert [True, False, False] == wrote
        assert [1000, 1000, 500] == [len(e.targets) for e in entries]
        assert 58_000 < rdb.pttl(prefix + "once:" + key) <= 60_000

    def test_redis_down_raises_ledger_error(self) -> None:
        """Recording and reading on an unreachable Redis raise LedgerError."""
        client = redis.Redis(port=1, socket_connect_timeout=1)
        ledger = _ledger.RedisLedger(client, "p:", 60)

        with pytest.raises(_ledger.LedgerError, match="write"):
            ledger.record([("task", "x")], CancelReason())
        with pytest.raises(_ledger.LedgerError, match="read"):
            ledger.read(None)


class TestPagedLoad:
    """A worker's first read of a Redis ledger (`TargetIndex.load`, `RedisLedger.read_pages`)."""

    def test_a_paged_load_indexes_what_a_read_returns(self, rdb: redis.Redis) -> None:
        """Bulk entries of canonical ids (converted as text), one with a custom id among
        them, entries naming groups and roots, ids cancelled twice with two reasons, an
        id in upper case, damaged lines, and more entries than a page: the pages give
        back the entries `read` gives (task-only ones as `TaskLines`), and the loaded
        index answers like one filled from `read`, for every id and for near misses."""
        prefix = f"cancellable:load-{uuid.uuid4().hex[:6]}:"
        ledger = _ledger.RedisLedger(rdb, prefix, 60)
        fresh = [str(uuid.uuid4()) for _ in range(3500)]

        def task(ids: list[str]) -> list[_ledger.Target]:
            return [("task", i) for i in ids]

        ledger.record(task(fresh[:2500]), CancelReason(message="bulk"))
        ledger.record(task(["custom-1", *fresh[2500:3499]]), CancelReason(message="custom"))
        ledger.record([("task", fresh[3499]), ("group", "g1"), ("root", "r1")], CancelReason())
        ledger.record(task([*fresh[2000:2600], fresh[0].upper()]), CancelReason(message="again"))
        rdb.xadd(prefix + "ledger", {"reason": "{}", "targets": f"task:\ntask:{fresh[-1]}"})
        rdb.xadd(prefix + "ledger", {"reason": "{}", "targets": "task:"})
        for n in range(_ledger.LOAD_PAGE + 5):
            ledger.record(task([str(uuid.uuid4())]), CancelReason(message=f"single {n}"))
        entries, cursor = ledger.read(None)

        pages = list(ledger.read_pages(None))
        items = [item for page, _ in pages for item in page]
        decoded = [i.entry() if isinstance(i, _ledger.TaskLines) else i for i in items]
        assert entries == [e for e in decoded if e is not None]  # "task:" alone names none
        assert any(isinstance(i, _ledger.TaskLines) for i in items)
        assert cursor == pages[-1][1]

        loaded, expected = TargetIndex(), TargetIndex()
        loaded.load(ledger)
        expected.add_entries(entries)
        every = [t for e in entries for kind, t in e.targets if kind == "task"]
        near = [i[:-12] + uuid.uuid4().hex[:12] for i in every if len(i) == 36]
        probes = every + near + [i.upper() for i in every] + ["custom-2"]
        assert [expected.match(i) for i in probes] == [loaded.match(i) for i in probes]
        assert len(expected) == len(loaded)
        assert cursor == loaded.cursor
        assert expected.match("x", group_id="g1") == loaded.match("x", group_id="g1")
        assert "bulk" == loaded.match(fresh[2100]).message  # type: ignore[union-attr]


def entry_line(targets: list[tuple[str, str]], at: float | None = None) -> bytes:
    """One line of the file ledger's format, as a writer appends it."""
    entry = {
        "at": time.time() if at is None else at,
        "reason": CancelReason().to_dict(),
        "targets": [list(t) for t in targets],
    }
    return json.dumps(entry).encode() + b"\n"


class TestFileLedger:
    """Details of the append-only file ledger."""

    def test_entries_expire(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An entry older than the TTL is skipped on read."""
        ledger = _ledger.FileLedger(tmp_path, 10)
        with monkeypatch.context() as patched:
            patched.setattr(time, "time", lambda: 1_000_000.0)
            ledger.record([("task", "old")], CancelReason())
        ledger.record([("task", "new")], CancelReason())

        entries, _ = ledger.read(None)

        assert [("task", "new")] == targets_of(entries)

    def test_compaction_keeps_live_entries(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past COMPACT_BYTES a writer drops expired lines; a reader holding a cursor
        into the old file reads the new one from the start, then only what is new."""
        monkeypatch.setattr(_ledger.FileLedger, "COMPACT_BYTES", 4000)
        ledger = _ledger.FileLedger(tmp_path, 60)
        path = tmp_path / "ledger.jsonl"
        long_ago = time.time() - 3600
        with monkeypatch.context() as patched:
            patched.setattr(time, "time", lambda: long_ago)
            for n in range(10):
                ledger.record([("task", f"expired-{n}")], CancelReason())
        ledger.record([("task", "live-0")], CancelReason())
        seen, old_cursor = ledger.read(None)
        size_before = path.stat().st_size
        inode_before = path.stat().st_ino

        ledger.record([("task", "live-1")] + [("task", "x" * 40)] * 100, CancelReason())
        lines = path.read_bytes().splitlines()
        reread, cursor = ledger.read(old_cursor)
        nothing, _ = ledger.read(cursor)

        assert [("task", "live-0")] == targets_of(seen)
        assert size_before < _ledger.FileLedger.COMPACT_BYTES
        assert inode_before != path.stat().st_ino
        assert 3 == len(lines)
        assert lines[0].startswith(b'{"cancellable_ledger"')
        assert ["live-0", "live-1"] == [targets_of(reread)[0][1], reread[1].targets[0][1]]
        assert [] == nothing

    def test_a_torn_last_line_waits_until_complete(self, tmp_path: Path) -> None:
        """A line still being written (no newline yet) is not returned, and the
        cursor stays before it; once complete it is returned once."""
        ledger = _ledger.FileLedger(tmp_path, 60)
        ledger.record([("task", "first")], CancelReason())
        _, cursor = ledger.read(None)
        line = entry_line([("task", "torn")])
        with open(tmp_path / "ledger.jsonl", "ab") as log:
            log.write(line[:25])
        torn, torn_cursor = ledger.read(cursor)
        with open(tmp_path / "ledger.jsonl", "ab") as log:
            log.write(line[25:])
        whole, _ = ledger.read(torn_cursor)

        assert [] == torn
        assert cursor == torn_cursor
        assert [("task", "torn")] == targets_of(whole)

    @pytest.mark.parametrize(
        "damage",
        [
            b"{not json",
            b"\xff\xfe\x00 not utf-8",
            b"[1, 2]",
            b"null",
            b'{"at": "soon", "reason": {}, "targets": []}',
            b'{"at": 1e18, "reason": {}, "targets": 5}',
            b'{"at": 1e18, "reason": {}, "targets": [["task"]]}',
            b'{"at": 1e18, "reason": {}, "targets": [["queue", "x"], ["task", ""]]}',
            b'{"at": NaN, "reason": {}, "targets": [["task", "x"]]}',
        ],
    )
    def test_a_damaged_line_is_skipped(self, tmp_path: Path, damage: bytes) -> None:
        """A line that is not an entry (no time, no target this version knows) is
        skipped; the lines around it are read."""
        ledger = _ledger.FileLedger(tmp_path, 60)
        ledger.record([("task", "before")], CancelReason())
        with open(tmp_path / "ledger.jsonl", "ab") as log:
            log.write(damage + b"\n")
        ledger.record([("task", "after")], CancelReason())

        entries, _ = ledger.read(None)

        assert [("task", "before"), ("task", "after")] == targets_of(entries)

    @pytest.mark.parametrize(
        ("reason", "expected"),
        [
            ('"text"', CancelReason(source="revoked", message="text", requested_at=5)),
            ("[]", CancelReason(source="revoked", requested_at=5)),
            ('{"source": "later", "severity": 3}', CancelReason(source="revoked", requested_at=5)),
            (
                '{"source": "deadline", "message": "' + "m" * 5000 + '", "requested_by": 1}',
                CancelReason(
                    source="deadline",
                    message="m" * (4096 - len(_wire.TRIMMED)) + _wire.TRIMMED,
                    requested_at=5,
                ),
            ),
        ],
    )
    def test_a_reason_another_version_wrote_keeps_its_targets(
        self, tmp_path: Path, reason: str, expected: CancelReason
    ) -> None:
        """A line whose reason this version cannot read keeps its targets (a target with
        an extra field included, one of an unknown kind dropped), and its reason
        degrades: unknown source to "revoked", a message over the limit trimmed, the
        entry's time for a missing one (issue 18, point 9)."""
        ledger = _ledger.FileLedger(tmp_path, 1e12)
        line = (
            '{"at": 5, "v": 2, "reason": ' + reason + ', "grace": "x", '
            '"targets": [["task", "x", {"more": 1}], ["label", "l"], ["root", "r"]]}\n'
        )
        (tmp_path / "ledger.jsonl").write_text(line)

        entries, _ = ledger.read(None)

        assert [("task", "x"), ("root", "r")] == targets_of(entries)
        assert (expected, None) == (entries[0].reason, entries[0].grace)

    def test_reading_before_any_write(self, tmp_path: Path) -> None:
        """No file yet: nothing to read, and the cursor is kept."""
        ledger = _ledger.FileLedger(tmp_path / "new", 60)

        assert ([], None) == ledger.read(None)
        assert ([], "1:2") == ledger.read("1:2")

    def test_faults_raise_ledger_error(self, tmp_path: Path) -> None:
        """A log or lock that cannot be opened raises LedgerError (root included)."""
        reading = _ledger.FileLedger(tmp_path / "r", 60)
        (tmp_path / "r" / "ledger.jsonl").mkdir()
        writing = _ledger.FileLedger(tmp_path / "w", 60)
        (tmp_path / "w" / "ledger.lock").mkdir()

        with pytest.raises(_ledger.LedgerError, match="read"):
            reading.read(None)
        with pytest.raises(_ledger.LedgerError, match="write"):
            writing.record([("task", "x")], CancelReason())


def generation(path: Path) -> str:
    """The generation in the header of the file ledger at ``path`` (an older
    version's file, without a header: its inode)."""
    with open(path, "rb") as log:
        header = json.loads(log.readline())
        return str(header.get("generation", f"inode {os.fstat(log.fileno()).st_ino}"))


def pad(
    ledger: _ledger.FileLedger, path: Path, below: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Append expired entries (stamped in 1970) while the file stays under ``below`` bytes."""
    line = len(entry_line([("task", "pad")] * 20))
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: 1_000_000.0)
        while path.stat().st_size + line < below:
            ledger.record([("task", "pad")] * 20, CancelReason())


def compact_with(
    ledger: _ledger.FileLedger, path: Path, task_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record the live ``task_id`` so that the write compacts the file (padding first)."""
    before = generation(path)
    pad(ledger, path, _ledger.FileLedger.COMPACT_BYTES - 200, monkeypatch)
    ledger.record([("task", task_id)] + [("task", "y" * 40)] * 10, CancelReason())
    assert before != generation(path), "the write did not compact the file"


SCRIPT_WRITER = """
import sys, time
from cancellable import CancelReason
from cancellable.celery import _ledger
_ledger.FileLedger.COMPACT_BYTES = 6000
directory, me, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ledger = _ledger.FileLedger(directory, 3600)
real = time.time
for n in range(count):
    ledger.record([("task", f"{me}-{n}")], CancelReason())
    time.time = lambda: real() - 7200  # expired padding, so that compaction has work
    ledger.record([("task", "pad")] * 10, CancelReason())
    time.time = real
"""


class TestFileLedgerGenerations:
    """The file ledger's cursor names a generation, not an inode, and it compacts
    at a size ratio (issue 18, point 5)."""

    def test_a_new_file_on_the_readers_inode_is_read_from_its_start(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ext4 can give a compacted file the inode number of a file it freed, so
        two compactions later the log may sit on the inode a reader's cursor was
        taken on, with other bytes at its offset.  Made deterministic here (a hard
        link keeps the first inode, which then gets the compacted bytes and is
        renamed into place); every entry recorded since is read, in 30 trials."""
        monkeypatch.setattr(_ledger.FileLedger, "COMPACT_BYTES", 6000)
        lost = []
        for trial in range(30):
            directory = tmp_path / f"t{trial}"
            ledger = _ledger.FileLedger(directory, 60)
            path = directory / "ledger.jsonl"
            ledger.record([("task", "first")], CancelReason())
            pad(ledger, path, 5000, monkeypatch)
            _, cursor = ledger.read(None)
            os.link(path, directory / "kept")
            inode = path.stat().st_ino
            compact_with(ledger, path, f"new-{trial}-a", monkeypatch)
            compact_with(ledger, path, f"new-{trial}-b", monkeypatch)
            (directory / "kept").write_bytes(path.read_bytes())
            os.replace(directory / "kept", path)
            assert inode == path.stat().st_ino
            entries, _ = ledger.read(cursor)
            seen = {target_id for _, target_id in targets_of(entries)}
            lost += [x for x in (f"new-{trial}-a", f"new-{trial}-b") if x not in seen]

        assert [] == lost

    def test_compactions_on_a_real_filesystem_lose_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same scenario without help: a reader's cursor, two compactions, the
        reader again, 30 times on the test's filesystem (ext4 reused the inode in
        most trials and the inode cursor then lost entries in each); nothing is lost."""
        monkeypatch.setattr(_ledger.FileLedger, "COMPACT_BYTES", 6000)
        lost = []
        for trial in range(30):
            directory = tmp_path / f"t{trial}"
            ledger = _ledger.FileLedger(directory, 60)
            path = directory / "ledger.jsonl"
            ledger.record([("task", "first")], CancelReason())
            pad(ledger, path, 5000, monkeypatch)
            _, cursor = ledger.read(None)
            compact_with(ledger, path, f"new-{trial}-a", monkeypatch)
            compact_with(ledger, path, f"new-{trial}-b", monkeypatch)
            entries, _ = ledger.read(cursor)
            seen = {target_id for _, target_id in targets_of(entries)}
            lost += [x for x in (f"new-{trial}-a", f"new-{trial}-b") if x not in seen]

        assert [] == lost

    def test_live_entries_past_the_threshold_are_not_rewritten_on_every_write(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With more than COMPACT_BYTES live, 300 single-id writes compact the file
        at most twice (each compaction at least doubles the next threshold);
        before, every one of them rewrote the file."""
        monkeypatch.setattr(_ledger.FileLedger, "COMPACT_BYTES", 8000)
        ledger = _ledger.FileLedger(tmp_path, 3600)
        path = tmp_path / "ledger.jsonl"
        ledger.record([("task", f"live-{n}") for n in range(400)], CancelReason())
        assert path.stat().st_size > 8000
        generations = {generation(path)}

        for n in range(300):
            ledger.record([("task", f"one-{n}")], CancelReason())
            generations.add(generation(path))
        entries, _ = ledger.read(None)

        assert len(generations) <= 3
        assert 700 == len(targets_of(entries))

    def test_old_cursor_formats_start_over(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A cursor of the older ``<inode>:<offset>`` format, one of another
        generation, or one past the end reads the file from its start."""
        ledger = _ledger.FileLedger(tmp_path, 60)
        ledger.record([("task", "a")], CancelReason())
        ledger.record([("task", "b")], CancelReason())
        _, cursor = ledger.read(None)
        assert cursor is not None
        inode = (tmp_path / "ledger.jsonl").stat().st_ino
        name, _, offset = cursor.rpartition(":")

        for stale in (f"{inode}:{offset}", f"gdeadbeef:{offset}", f"{name}:{int(offset) + 1000}"):
            entries, again = ledger.read(stale)
            assert [("task", "a"), ("task", "b")] == targets_of(entries), stale
            assert cursor == again

    def test_a_file_of_an_older_version_is_read_then_upgraded(self, tmp_path: Path) -> None:
        """A file without a header (an older version wrote it) is read with the older
        inode cursor; the next write here rewrites it with a header, and a reader
        holding the older cursor reads the new file from its start."""
        path = tmp_path / "ledger.jsonl"
        path.write_bytes(entry_line([("task", "old-1")]) + entry_line([("task", "old-2")]))
        ledger = _ledger.FileLedger(tmp_path, 60)
        older = f"{path.stat().st_ino}:{path.stat().st_size}"

        entries, cursor = ledger.read(None)
        ledger.record([("task", "new")], CancelReason())
        after, _ = ledger.read(cursor)

        assert [("task", "old-1"), ("task", "old-2")] == targets_of(entries)
        assert older == cursor
        assert path.read_bytes().startswith(b'{"cancellable_ledger"')
        assert [("task", "old-1"), ("task", "old-2"), ("task", "new")] == targets_of(after)

    def test_a_line_a_dead_writer_left_unfinished_does_not_swallow_the_next(
        self, tmp_path: Path
    ) -> None:
        """A writer that died mid-line left no newline; the next entry starts on a
        line of its own and is read."""
        ledger = _ledger.FileLedger(tmp_path, 60)
        ledger.record([("task", "first")], CancelReason())
        with open(tmp_path / "ledger.jsonl", "ab") as log:
            log.write(entry_line([("task", "torn")])[:30])
        ledger.record([("task", "next")], CancelReason())

        entries, _ = ledger.read(None)

        assert [("task", "first"), ("task", "next")] == targets_of(entries)

    def test_writers_in_several_processes_and_a_reader_lose_nothing(self, tmp_path: Path) -> None:
        """Four processes write 150 live entries each (with expired padding, so the
        file is compacted many times) while this process reads incrementally:
        the reader gets all 600, and saw several generations."""
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", SCRIPT_WRITER, str(tmp_path), f"w{k}", "150"],
                stderr=subprocess.PIPE,
            )
            for k in range(4)
        ]
        ledger = _ledger.FileLedger(tmp_path, 3600)
        seen: set[str] = set()
        names: set[str] = set()
        cursor = None
        try:
            while any(writer.poll() is None for writer in writers):
                entries, cursor = ledger.read(cursor)
                seen.update(target_id for _, target_id in targets_of(entries))
                names.add((cursor or "").rpartition(":")[0])
                time.sleep(0.005)
        finally:
            for writer in writers:
                _, err = writer.communicate(timeout=120)
                assert 0 == writer.returncode, err.decode()
        entries, cursor = ledger.read(cursor)
        seen.update(target_id for _, target_id in targets_of(entries))

        expected = {f"w{k}-{n}" for k in range(4) for n in range(150)}
        assert set() == expected - seen
        assert len(names - {""}) >= 3


class TestTargets:
    """Validation of targets."""

    @pytest.mark.parametrize(
        "target",
        [("queue", "x"), ("task", ""), ("task", "a\nb"), ("task", 5)],
    )
    def test_bad_targets(self, target: Any) -> None:
        """Unknown kinds and ids that are empty, multi-line or not str are refused."""
        with pytest.raises(ValueError, match="target"):
            _ledger.check_targets([target])

    def test_an_id_past_the_byte_bound_is_refused(self) -> None:
        """Ids are bounded in UTF-8 bytes: 1,024 one-byte characters pass, 256 emoji
        (1,024 bytes) pass, 257 emoji (1,028 bytes) and 1,025 bytes are refused."""
        emoji = "\N{GRINNING FACE}"
        good = [("task", "a" * 1024), ("group", emoji * 256)]

        assert good == _ledger.check_targets(good)
        for target in [("task", "a" * 1025), ("root", emoji * 257)]:
            with pytest.raises(ValueError, match="longer than the 1024 bytes"):
                _ledger.check_targets([target])  # type: ignore[list-item]

    def test_good_targets(self) -> None:
        """Valid targets come back as a list, in order."""
        targets = [("task", "a"), ("group", "g"), ("root", "r")]

        assert targets == _ledger.check_targets(iter(targets))


def test_an_expired_plain_revoke_key_is_written_again(
    kind: str, rdb: redis.Redis, tmp_path: Path
) -> None:
    """A plain revoke's key lives as long as its entries: once they have expired
    (TTL 0.5 s here), the same revoke is written again."""
    ledger = make_ledger(kind, rdb, tmp_path, 0.5)
    targets: list[_ledger.Target] = [("task", "again")]
    key = _ledger.revoke_key(targets)

    first = ledger.record_once(targets, CancelReason(source="revoked"), key)
    time.sleep(0.7)
    second = ledger.record_once(targets, CancelReason(source="revoked"), key)
    entries, _ = ledger.read(None)

    assert (True, True) == (first, second)
    assert [targets[0]] == targets_of(entries)


class TestLedgerCalls:
    """A client's ledger call is waited for at most its bound, whatever the call does."""

    def test_a_call_that_does_not_return_is_given_up_on_and_may_finish_later(self) -> None:
        """A call that blocks is abandoned after its wait (LedgerError saying the write
        may still complete), keeps running, and finishes when it is let go; calls
        that return or raise in time hand back their result or their error."""
        calls = _ledger.LedgerCalls()
        release = threading.Event()
        finished = threading.Event()

        def blocked() -> None:
            release.wait(30)
            finished.set()

        began = time.monotonic()
        with pytest.raises(_ledger.LedgerError, match="may still complete later"):
            calls.run(blocked, 0.2)
        waited = time.monotonic() - began
        release.set()

        assert 0.2 <= waited < 2.0
        assert finished.wait(5)
        assert 7 == calls.run(lambda: 7, 5.0)
        with pytest.raises(_ledger.LedgerError, match="down"):
            calls.run(_raise_down, 5.0)

    def test_at_most_a_few_calls_are_left_running(self) -> None:
        """While `MAX_ABANDONED` abandoned calls still run, the next call fails at
        once without starting; once they end, calls run again."""
        calls = _ledger.LedgerCalls()
        release = threading.Event()
        for _ in range(calls.MAX_ABANDONED):
            with pytest.raises(_ledger.LedgerError):
                calls.run(lambda: release.wait(30), 0.05)
        started = threading.Event()

        began = time.monotonic()
        with pytest.raises(_ledger.LedgerError, match="have not returned"):
            calls.run(started.set, 5.0)
        refused_after = time.monotonic() - began
        release.set()

        assert refused_after < 0.5
        assert not started.is_set()
        deadline = time.monotonic() + 5
        while not _returns(calls) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _returns(calls)

    def test_a_helper_that_returned_runs_the_next_call_and_a_hung_one_is_not_waited_for(
        self,
    ) -> None:
        """Once a call has returned, the next call (``run`` or ``start``) runs on the
        same helper thread, handed over rather than a new thread started; while a call
        hangs, the next one gets another helper and returns at once."""
        calls = _ledger.LedgerCalls()
        first = calls.run(threading.get_ident, 5.0)
        deadline = time.monotonic() + 5
        while not calls._idle and time.monotonic() < deadline:  # parked after its call
            time.sleep(0.01)
        assert first == calls.run(threading.get_ident, 5.0)
        time.sleep(0.05)
        seen: list[int] = []
        assert calls.start(lambda: seen.append(threading.get_ident())).wait(5)
        assert [first] == seen

        release = threading.Event()
        hung = calls.start(lambda: release.wait(30))
        began = time.monotonic()
        other = calls.run(threading.get_ident, 5.0)
        assert time.monotonic() - began < 2.0
        assert not hung.is_set()
        release.set()
        assert hung.wait(5)
        assert other != 0

    def test_an_inherited_object_starts_no_call_on_its_parents_helpers(self) -> None:
        """In a forked child, `LedgerCalls` the parent made (with an idle helper,
        whose thread the child does not have) still runs a call: on a new helper."""
        calls = _ledger.LedgerCalls()
        calls.run(lambda: None, 5.0)
        deadline = time.monotonic() + 5
        while not calls._idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls._idle
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            try:
                os._exit(0 if 7 == calls.run(lambda: 7, 5.0) else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert 0 == os.waitstatus_to_exitcode(status)


def _raise_down() -> None:
    raise _ledger.LedgerError("the store is down")


def _returns(calls: _ledger.LedgerCalls) -> bool:
    try:
        return calls.run(lambda: True, 1.0)
    except _ledger.LedgerError:
        return False
