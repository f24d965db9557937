"""The ledger: the durable record of cancellations, and the source of truth.

A revoke broadcast reaches only the workers that are online at that moment,
and a worker's memory is lost when it restarts.  The ledger keeps every
cancellation for a configurable time (a week by default).  Workers read all
of it when they start and then, every poll interval, what it gained since
their last read, into a local index (`cancellable.celery._index`) that they
consult when a task arrives and when it starts.

Entries and targets
    An entry is one cancellation: a reason and the *targets* it names.  A
    target is ``(kind, id)``: ``("task", <task id>)`` today; ``"group"`` and
    ``"root"`` targets (a group id, a workflow's root id) cancel every task
    whose message carries that group or root id.  A large batch of task ids
    is split into entries of `CHUNK` targets that share the reason.

Ordering by the store, never by a clock
    Workers read incrementally with a *cursor* that the store assigns: the
    id of a Redis stream entry (``XADD``, which the server numbers in
    increasing order at the moment it executes the command), or a byte
    offset in an append-only file written under an exclusive lock.  No
    writer's clock, and no writer that commits late, can hide an entry from
    a reader: an entry that commits after a read gets a higher cursor than
    everything that read returned.

Expiry
    Entries older than the TTL are dropped on read and trimmed from the
    store from time to time.  Redis entries are aged by the server's clock
    (the time in the stream id).  File entries are aged by the time their
    writer stamped on them: the file ledger serves the processes of one
    machine, which share a clock.  (Expiry is the only thing a clock decides;
    ordering never depends on one.)

Where it lives, in order of preference:

1. ``app.conf.cancellable_ledger_url`` when set (``redis://...``,
   ``rediss://...``, ``sentinel://...``, ``file:///path`` or a database URL;
   the string ``"none"`` disables it);
2. the app's result backend, when it is Redis, the filesystem backend or
   Celery's database backend (``db+...``: `SqlLedger`, tables described in
   `cancellable.celery._ledger_sql`);
3. the app's broker, when it is Redis (``rediss://`` and ``sentinel://`` too);
4. nowhere: cancellation still works for online workers, and a warning
   (``ledger.not_durable``) says so once per process; `Ledgers.not_durable_once`
   gives `cancel`'s warning.

Redis spellings
    A Redis URL is read as kombu and Celery read it
    (`~cancellable.celery._celery_internals.redis_ledger_client`): TLS from
    ``rediss://`` query parameters and ``broker_use_ssl`` /
    ``redis_backend_use_ssl``, Sentinel from ``sentinel://`` URLs joined by
    ``;`` and ``master_name`` / ``sentinel_kwargs``, and
    ``global_keyprefix`` and socket timeouts from the transport options of
    the broker (when the ledger's Redis is the broker's, or the broker is
    Redis) or of the result backend (otherwise).  A Redis result backend's
    own client is copied (Celery parsed its URL), with its
    ``global_keyprefix``.

Redis layout: one stream, ``[global_keyprefix]cancellable:<app name>:ledger``, whose entries
have two fields, ``reason`` (JSON) and ``targets`` (``kind:id`` lines).
A reader keeps the targets of an entry whose reason it cannot read (another
version wrote it) and degrades the reason (`cancellable.celery._wire`).
Needs Redis 6.2 or newer (``XTRIM MINID``, exclusive ``XRANGE`` starts).

Bounded calls
    Every Redis ledger has a client of its own, made by
    `~cancellable.celery._celery_internals.bounded_redis_client` with the
    connection parameters of the configured URL or of Celery's Redis result
    backend, whose client is never used as-is (its socket timeout is
    120 s): it waits at most `TIMEOUT` seconds to connect and `TIMEOUT`
    seconds for each reply, and never retries by itself, whatever the
    redis-py version.  A hung server (stopped, paused, partitioned after the
    connection was made) therefore costs a caller `TIMEOUT` and a
    `LedgerError`, never a hang.

Plain revokes are written once
    A plain revoke (``AsyncResult.revoke`` and the like) reaches every
    worker, and each one, and the caller, would record it.  They record it
    with `record_once` under a key derived from its targets (`revoke_key`):
    the first writer's ``SET NX`` wins, in the same server-side script as its
    ``XADD``, and the others write nothing.  The key lives as long as the
    entry (the ledger's TTL), so a second plain revoke of the same ids
    within it is not written again: it would add nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol, TypeVar, get_args, overload

from .._exceptions import CancelReason
from .._log import logger
from ..events import LEDGER_NOT_DURABLE
from . import _celery_internals as celery_internals
from ._ledger_sql import SqlStore, StoreError, django_database
from ._settings import DEFAULT_LEDGER_TTL, settings_for, sql_url
from ._wire import reason_from_wire

__all__ = [
    "CHUNK",
    "DEFAULT_LEDGER_TTL",
    "MAX_ID_BYTES",
    "TIMEOUT",
    "Entry",
    "FileLedger",
    "Ledger",
    "LedgerCalls",
    "LedgerError",
    "Ledgers",
    "NullLedger",
    "RedisLedger",
    "SqlLedger",
    "Target",
    "TargetKind",
    "TaskLines",
    "check_targets",
    "record_once",
    "revoke_key",
]

#: What a cancellation can name.
TargetKind = Literal["task", "group", "root"]
_KINDS: Final = frozenset(get_args(TargetKind))

#: ``(kind, id)``.
Target = tuple[TargetKind, str]

#: Targets per entry: a batch of 100,000 ids is 100 entries of 1,000.
CHUNK: Final = 1000

#: The longest id (task, group or root), in UTF-8 bytes, that `cancel()`
#: accepts.  Celery's own ids are 36-byte UUIDs; RabbitMQ carries at most
#: 255 bytes of a task id (``correlation_id``), Celery's database backend
#: 155 characters.  A worker handles longer ids from a plain revoke safely.
MAX_ID_BYTES: Final = 1024

#: Entries read per round trip.
_PAGE: Final = 500

#: Entries per page of `RedisLedger.read_pages` (a worker's first read).
LOAD_PAGE: Final = 20

#: Seconds a Redis ledger call waits to connect, and for each reply (see the
#: module docstring, "Bounded calls").
TIMEOUT: Final = 2.0

#: Record the targets, once per key (see the module docstring): KEYS are the
#: stream and the key; ARGV the key's TTL (ms), the reason, the grace ("" for
#: none) and one ``targets`` field per entry.  Returns the last entry's id,
#: or false when the key was there already.
_RECORD_ONCE: Final = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return false end
local last = false
for i = 4, #ARGV do
  if ARGV[3] == '' then
    last = redis.call('XADD', KEYS[1], '*', 'reason', ARGV[2], 'targets', ARGV[i])
  else
    last = redis.call('XADD', KEYS[1], '*', 'reason', ARGV[2], 'targets', ARGV[i],
                      'grace', ARGV[3])
  end
end
return last
"""


class LedgerError(Exception):
    """The ledger could not be read or written (the store is down)."""


_T = TypeVar("_T")


class _Helper:
    """A daemon thread of `LedgerCalls`: runs one call, then waits for the next while idle."""

    def __init__(self, owner: LedgerCalls, job: Callable[[], None]) -> None:
        self.owner = owner
        self.job: Callable[[], None] | None = job
        self.ready = threading.Event()
        self.thread = threading.Thread(
            target=self._loop, name="cancellable-ledger-call", daemon=True
        )

    def give(self, job: Callable[[], None]) -> None:
        """Hand this idle helper its next call."""
        self.job = job
        self.ready.set()

    def _loop(self) -> None:
        job = self.job
        while job is not None:
            self.job = None
            job()
            job = self.owner._next(self)


class LedgerCalls:
    """A client's calls to a store, each waited for at most a given time, whatever the store.

    A store's own bounds do not cover every failure: psycopg has no
    client-side read timeout, so a PostgreSQL server whose process is frozen
    on a live host (its kernel still acknowledges TCP) would hold a caller
    for ever.  `run` makes the call on a helper thread (a daemon: it never
    holds up the interpreter's exit) and waits for it at most ``wait``
    seconds; then it raises `LedgerError` and leaves the call running.  An
    abandoned call may still complete later (when the server answers
    again): a write then records a cancellation that was already broadcast,
    which is harmless (cancelling twice is cancelling once).  At most
    `MAX_ABANDONED` calls are left running at a time; while that many are,
    `run` fails at once rather than start another.  `start` runs a call in
    the background (`cancel()`'s read of the tasks' states).

    A helper whose call has returned waits up to `IDLE_EXIT` seconds for the
    next one (at most `KEEP_IDLE` wait at a time), so a call usually costs a
    hand-off to a waiting thread, not a new thread's start (0.03 ms against
    0.2 ms on an idle machine, each a wait for a core on a loaded one).  A
    call that never returns keeps its helper; the next call gets another.

    Made once per process with its `~cancellable.celery._runtime.Runtime`,
    and anew in a forked child (the threads are not copied; an object
    inherited across a fork anyway starts no call on its parent's helpers).
    """

    #: Calls left running after their callers stopped waiting, at most.
    MAX_ABANDONED: Final = 4
    #: Idle helpers kept waiting for a call, at most.
    KEEP_IDLE: Final = 4
    #: Seconds an idle helper waits for a call before its thread ends.
    IDLE_EXIT: Final = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = 0
        self._idle: list[_Helper] = []
        self._pid = os.getpid()

    def start(self, call: Callable[[], object]) -> threading.Event:
        """Run ``call()`` on a helper thread; the event is set once it has returned or raised.

        What it raises is dropped: ``call`` reports its own outcome.
        """
        done = threading.Event()

        def job() -> None:
            try:
                call()
            except BaseException:  # noqa: BLE001 - the call reports its own outcome
                pass
            finally:
                done.set()

        self._submit(job)
        return done

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # inherited across a fork: no helper here
                self._idle.clear()
                self._pid = os.getpid()
            helper = self._idle.pop() if self._idle else None
        if helper is not None:
            helper.give(job)
            return
        helper = _Helper(self, job)
        helper.thread.start()

    def _next(self, helper: _Helper) -> Callable[[], None] | None:
        """``helper``'s next call, once one is given; None: its thread ends."""
        with self._lock:
            if len(self._idle) >= self.KEEP_IDLE or self._pid != os.getpid():
                return None
            helper.ready.clear()
            self._idle.append(helper)
        if not helper.ready.wait(self.IDLE_EXIT):
            with self._lock:
                if helper in self._idle:
                    self._idle.remove(helper)
                    return None
            helper.ready.wait()  # taken just now: its call is on the way
        return helper.job

    def run(self, call: Callable[[], _T], wait: float) -> _T:
        """``call()``'s result, or `LedgerError` if it did not return within ``wait`` s.

        Raises what ``call`` raises.
        """
        with self._lock:
            if self._abandoned >= self.MAX_ABANDONED:
                raise LedgerError(
                    f"{self._abandoned} earlier ledger calls have not returned "
                    "(the store does not answer); not starting another"
                )
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()
        state = {"abandoned": False}

        def target() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome.append((False, exc))
            finally:
                with self._lock:
                    if state["abandoned"]:
                        self._abandoned -= 1
                    done.set()

        self._submit(target)
        if not done.wait(max(wait, 0.0)):
            with self._lock:
                if not done.is_set():
                    state["abandoned"] = True
                    self._abandoned += 1
            if state["abandoned"]:
                raise LedgerError(
                    f"the ledger did not answer within {wait:.1f} s (the write may still "
                    "complete later)"
                )
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One recorded cancellation, as read back from the ledger."""

    targets: tuple[Target, ...]
    reason: CancelReason
    #: When the store recorded it (seconds since the epoch, the store's clock).
    recorded_at: float
    #: The grace given to `~cancellable.celery.cancel` (None: not given).
    grace: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TaskLines:
    """A ledger entry's targets as written, ``kind:id`` lines, the first a task.

    `RedisLedger.read_pages` gives such an entry (a bulk cancel's: all task
    lines) undecoded, so that a worker's first read converts a page of ids
    with a few string operations instead of an object per id
    (`cancellable.celery._idtable.uuid_lines`); `entry` decodes it as
    `RedisLedger.read` does.
    """

    text: str
    reason: CancelReason
    recorded_at: float
    grace: float | None = None

    def entry(self) -> Entry | None:
        """The `Entry` this is, or None if no line names an id."""
        targets = _decode_targets(self.text)
        return Entry(targets, self.reason, self.recorded_at, self.grace) if targets else None


class Ledger(Protocol):
    """**Protocol:** where cancellations are recorded durably.

    .. versionadded:: 0.1.0
    """

    durable: bool

    def record(
        self, targets: Sequence[Target], reason: CancelReason, grace: float | None = None
    ) -> None:
        """Append one cancellation of ``targets``; raise `LedgerError` if the store is down.

        ``grace`` (seconds, or None) is kept with it for the cancellation
        ladder of workers that learn of it from the ledger.
        """

    def read(self, cursor: str | None) -> tuple[list[Entry], str | None]:
        """Live entries recorded after ``cursor`` (None: all), and the cursor to pass next.

        The cursor is opaque and assigned by the store.  An entry recorded
        after this call returns is always after the returned cursor.
        """


def _encode_targets(targets: Iterable[Target]) -> str:
    return "\n".join(f"{kind}:{target_id}" for kind, target_id in targets)


def _task_lines(raw: str) -> bool:
    # Every line of ``raw`` is a task target (a bulk cancel's entry).
    return raw.startswith("task:") and raw.count("\n") == raw.count("\ntask:")


def _decode_targets(raw: str) -> tuple[Target, ...]:
    if _task_lines(raw):
        # Every line is a task target (a bulk cancel): split without a loop.
        ids = raw[5:].split("\ntask:")
        if "" not in ids:
            return tuple(zip(repeat("task"), ids))
    targets: list[Target] = []
    for line in raw.split("\n"):
        kind, _, target_id = line.partition(":")
        if kind in _KINDS and target_id:
            targets.append((kind, target_id))  # type: ignore[arg-type]
    return tuple(targets)


def _wire_targets(items: object) -> tuple[Target, ...]:
    # A file entry's ``[kind, id]`` pairs; unknown kinds, and fields a later
    # version may add after the id, are ignored.
    targets: list[Target] = []
    for item in items if isinstance(items, list) else ():
        if isinstance(item, list) and len(item) >= 2:
            kind, target_id = item[0], item[1]
            if kind in _KINDS and isinstance(target_id, str) and target_id:
                targets.append((kind, target_id))
    return tuple(targets)


def _chunks(targets: Sequence[Target]) -> Iterator[Sequence[Target]]:
    for start in range(0, len(targets), CHUNK):
        yield targets[start : start + CHUNK]


def check_targets(targets: Iterable[Target]) -> list[Target]:
    """Validate targets: a known kind and a non-empty one-line id of at most `MAX_ID_BYTES`."""
    checked: list[Target] = []
    for kind, target_id in targets:
        if kind not in _KINDS:
            raise ValueError(f"unknown target kind {kind!r}")
        if not isinstance(target_id, str) or not target_id or "\n" in target_id:
            raise ValueError(f"a target id must be a non-empty one-line str, got {target_id!r:.80}")
        size = len(target_id.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            raise ValueError(
                f"a {kind} id of {size} bytes is longer than the {MAX_ID_BYTES} bytes "
                f"cancel() accepts: {target_id!r:.80}"
            )
        checked.append((kind, target_id))
    return checked


def revoke_key(targets: Iterable[Target]) -> str:
    """The idempotency key of a plain revoke of ``targets`` (their order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(f"{k}:{i}" for k, i in targets)).encode())
    return digest.hexdigest()[:40]


def record_once(ledger: Ledger, targets: Sequence[Target], reason: CancelReason, key: str) -> None:
    """Record ``targets`` unless a record under ``key`` was made within the TTL.

    Every ledger of the library has a ``record_once`` of its own (Redis,
    file and SQL); a ledger of yours without one records every time.
    Raises `LedgerError`.
    """
    once = getattr(ledger, "record_once", None)
    if once is not None:
        once(targets, reason, key)
    else:
        ledger.record(targets, reason)


class NullLedger:
    """No durable store: records nothing, reads nothing."""

    durable = False

    def __init__(self, why: str | None = None) -> None:
        #: No store by choice (``cancellable_ledger_url = "none"``): nobody is warned.
        self.chosen = why is None
        if why is None:
            why = "cancellable_ledger_url is 'none'"
        #: Why there is no store (for the worker's start line and `cancel`'s warning).
        self.why = why
        self.where = f"not durable: online workers only ({why})"

    def record(
        self, targets: Sequence[Target], reason: CancelReason, grace: float | None = None
    ) -> None:
        """Do nothing."""

    def read(self, cursor: str | None) -> tuple[list[Entry], str | None]:
        """Nothing was recorded."""
        return [], cursor


class RedisLedger:
    """Cancellations in a Redis stream (see the module docstring)."""

    durable = True

    #: Trim expired entries at most this often per process (seconds).
    TRIM_EVERY: Final = 60.0

    def __init__(
        self,
        client: Any,
        prefix: str,
        ttl: float,
        server: str = "redis",
        setting: str = "the result backend",
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._key = prefix + "ledger"
        #: Where the entries are (no password), for log lines and messages.
        self.where = f"Redis stream {self._key!r} on {server}"
        #: The setting that chose this server (named in every error).
        self.setting = setting
        self._ttl_ms = max(1, int(ttl * 1000))
        self._last_trim = 0.0

    def _error(self, what: str, exc: BaseException) -> LedgerError:
        # One message naming the setting and the server; a TLS refusal says
        # which options decide it.
        hint = ""
        if isinstance(exc.__context__ or exc.__cause__, ssl.SSLError) or "SSL" in str(exc):
            hint = (
                " (TLS refused: check ssl_cert_reqs and ssl_ca_certs, ssl_certfile, "
                f"ssl_keyfile of {self.setting}, or broker_use_ssl / redis_backend_use_ssl)"
            )
        return LedgerError(
            f"could not {what} the cancellation ledger, {self.where} "
            f"(from {self.setting}): {exc}{hint}"
        )

    def record(
        self, targets: Sequence[Target], reason: CancelReason, grace: float | None = None
    ) -> None:
        """One ``XADD`` per `CHUNK` targets, all in one round trip."""
        if not targets:
            return
        fields_reason = json.dumps(reason.to_dict())
        extra = {} if grace is None else {"grace": repr(float(grace))}
        try:
            pipe = self._client.pipeline(transaction=False)
            for chunk in _chunks(targets):
                fields = {"reason": fields_reason, "targets": _encode_targets(chunk), **extra}
                pipe.xadd(self._key, fields)
            ids = pipe.execute()
        except Exception as exc:
            raise self._error("write", exc) from exc
        self._maybe_trim(ids[-1])

    def record_once(self, targets: Sequence[Target], reason: CancelReason, key: str) -> bool:
        """`record` unless ``key`` was recorded within the TTL; True if this call wrote.

        One server-side script (``SET NX PX`` of the key, then the ``XADD``
        of each `CHUNK`), so the key and the entries are written together or
        not at all.  A server that refuses the script gets a plain `record`.
        """
        if not targets:
            return False
        args = [
            self._ttl_ms,
            json.dumps(reason.to_dict()),
            "",
            *(_encode_targets(chunk) for chunk in _chunks(targets)),
        ]
        import redis

        try:
            once_key = self._prefix + "once:" + key
            last = self._client.eval(_RECORD_ONCE, 2, self._key, once_key, *args)
        except redis.ResponseError:
            # The server refuses the script (scripting disabled, a cluster's
            # keys in two slots): write it unconditionally rather than never.
            self.record(targets, reason)
            return True
        except Exception as exc:
            raise self._error("write", exc) from exc
        if not last:
            return False
        self._maybe_trim(last)
        return True

    def _maybe_trim(self, last_id: bytes | str) -> None:
        # Age entries by the server's clock: the time part of the id it just
        # assigned.  Best effort; a failed trim only leaves expired entries,
        # which readers skip.
        now = time.monotonic()
        if now - self._last_trim < self.TRIM_EVERY:
            return
        self._last_trim = now
        server_ms = _stream_ms(last_id)
        with contextlib.suppress(Exception):
            self._client.xtrim(self._key, minid=server_ms - self._ttl_ms, approximate=True)

    def read(self, cursor: str | None) -> tuple[list[Entry], str | None]:
        """Pages of ``XRANGE`` after ``cursor``; the first page also asks the server's time."""
        entries: list[Entry] = []
        start = "-" if cursor is None else f"({cursor}"
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.time()
            pipe.xrange(self._key, min=start, max="+", count=_PAGE)
            (seconds, micros), rows = pipe.execute()
            oldest_ms = int(seconds) * 1000 + int(micros) // 1000 - self._ttl_ms
            while True:
                for raw_id, fields in rows:
                    stream_id = _text(raw_id)
                    cursor = stream_id
                    entry = self._entry(stream_id, fields, oldest_ms)
                    if entry is not None:
                        entries.append(entry)
                if len(rows) < _PAGE:
                    break
                rows = self._client.xrange(self._key, min=f"({cursor}", max="+", count=_PAGE)
        except Exception as exc:
            raise self._error("read", exc) from exc
        return entries, cursor

    def read_pages(
        self, cursor: str | None, count: int = LOAD_PAGE
    ) -> Iterator[tuple[list[Entry | TaskLines], str | None]]:
        """`read` in pages of ``count`` stream entries: each page's entries and its cursor.

        A worker loading a large ledger indexes one page before it reads the
        next, so it never holds the whole ledger as Python objects.  An entry
        whose first target is a task comes as `TaskLines`, not decoded.
        """
        start = "-" if cursor is None else f"({cursor}"
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.time()
            pipe.xrange(self._key, min=start, max="+", count=count)
            (seconds, micros), rows = pipe.execute()
        except Exception as exc:
            raise self._error("read", exc) from exc
        oldest_ms = int(seconds) * 1000 + int(micros) // 1000 - self._ttl_ms
        while True:
            entries: list[Entry | TaskLines] = []
            for raw_id, fields in rows:
                cursor = _text(raw_id)
                entry = self._entry(cursor, fields, oldest_ms, lines=True)
                if entry is not None:
                    entries.append(entry)
            yield entries, cursor
            if len(rows) < count:
                return
            del entries, rows
            try:
                rows = self._client.xrange(self._key, min=f"({cursor}", max="+", count=count)
            except Exception as exc:
                raise self._error("read", exc) from exc

    @overload
    def _entry(
        self, stream_id: str, fields: dict[Any, Any], oldest_ms: int, lines: Literal[False] = ...
    ) -> Entry | None: ...

    @overload
    def _entry(
        self, stream_id: str, fields: dict[Any, Any], oldest_ms: int, lines: bool
    ) -> Entry | TaskLines | None: ...

    def _entry(
        self, stream_id: str, fields: dict[Any, Any], oldest_ms: int, lines: bool = False
    ) -> Entry | TaskLines | None:
        # ``lines``: an entry of task targets only may come as `TaskLines`.
        recorded_ms = _stream_ms(stream_id)
        if recorded_ms < oldest_ms:
            return None
        values = {_text(k): _text(v) for k, v in fields.items()}
        raw = values.get("targets", "")
        bulk = lines and raw.startswith("task:")
        targets = () if bulk else _decode_targets(raw)
        if not (bulk or targets):
            return None  # not ours, or damaged: skip it rather than stop reading
        # Another version's reason degrades; its targets are kept (`_wire`).
        reason = reason_from_wire(_json(values.get("reason")), recorded_ms / 1000.0)
        grace = _grace(values.get("grace"))
        if bulk:
            return TaskLines(raw, reason, recorded_ms / 1000.0, grace)
        return Entry(targets, reason, recorded_ms / 1000.0, grace)


def _grace(value: object) -> float | None:
    # A recorded grace; anything unreadable counts as none given.
    try:
        grace = None if value is None else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return grace if grace is not None and 0 <= grace < float("inf") else None


def _json(text: str | None) -> object:
    # A JSON value, or None for text that is not JSON.
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_ms(stream_id: bytes | str) -> int:
    return int(_text(stream_id).partition("-")[0])


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    @contextlib.contextmanager
    def _locked(handle: IO[bytes]) -> Iterator[None]:
        # An exclusive lock on the first byte of the lock file, between processes.
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        try:
            yield
        finally:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    @contextlib.contextmanager
    def _locked(handle: IO[bytes]) -> Iterator[None]:
        # An exclusive lock on the whole lock file, between processes.
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class FileLedger:
    """Cancellations in an append-only JSON-lines file, for the no-server setup.

    Writers append whole lines under an exclusive lock, so lines never
    interleave and the byte offset of a line is a cursor no later write can
    go below.

    Generations
        The first line of the file is a header naming its *generation* (a
        random token new with every file) and how many bytes of entries it
        was written with.  A reader's cursor is
        ``"g<generation>:<offset>"``; a cursor of another generation (the
        file was compacted since) reads the current file from its start, so
        an entry is never skipped, whatever inode the new file gets (a
        filesystem may give a new file the inode number of one it freed).
        Re-reading is harmless: the index ignores targets it already has.
    Compaction
        A writer rewrites the file without its expired lines only once it has
        grown to twice its size at its last compaction (and past
        `COMPACT_BYTES`), so the copying costs a bounded amount per byte
        written however many entries are live.  The new file is written and
        fsynced under a temporary name, renamed into place, and the directory
        is fsynced, so a crash leaves the old file or the new one.
    Older files
        A file without a header (written by an older version) is read with
        the older ``"<inode>:<offset>"`` cursor, and the next write here
        compacts it into a file with a header.  A cursor in a format that does
        not match the file reads it from its start.
    """

    durable = True

    #: Never compact a log smaller than this.
    COMPACT_BYTES: Final = 4 * 1024 * 1024

    def __init__(self, directory: str | os.PathLike[str], ttl: float) -> None:
        self._dir = Path(directory)
        self._ttl = ttl
        self._path = self._dir / "ledger.jsonl"
        #: Where the entries are, for log lines and messages.
        self.where = f"file {self._path}"
        self._lock_path = self._dir / "ledger.lock"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()

    def record(
        self, targets: Sequence[Target], reason: CancelReason, grace: float | None = None
    ) -> None:
        """Append one line per `CHUNK` targets (compacting the file when it is due)."""
        self._append(targets, reason, grace, None)

    def record_once(self, targets: Sequence[Target], reason: CancelReason, key: str) -> bool:
        """`record` unless a live line carries ``key``; True if this call wrote.

        The lines carry the key (``"once"``), and the check and the append
        are made under the file lock, so of several workers recording the
        same plain revoke the first one writes and the others see its line.
        The key lives as long as its line (the TTL; compaction keeps it).
        """
        return self._append(targets, reason, None, key)

    def _append(
        self,
        targets: Sequence[Target],
        reason: CancelReason,
        grace: float | None,
        key: str | None,
    ) -> bool:
        if not targets:
            return False
        now = time.time()
        extra: dict[str, Any] = {} if grace is None else {"grace": float(grace)}
        if key is not None:
            extra["once"] = key
        lines = b"".join(
            json.dumps(
                {
                    "at": now,
                    "reason": reason.to_dict(),
                    "targets": [list(t) for t in chunk],
                    **extra,
                }
            ).encode()
            + b"\n"
            for chunk in _chunks(targets)
        )
        try:
            with self._thread_lock, open(self._lock_path, "ab") as lock, _locked(lock):
                with open(self._path, "a+b") as log:
                    log.seek(0)
                    header = _FileHeader.parse(log.readline(_HEADER_MAX))
                    if key is not None and self._has_key(log, key, now):
                        return False
                    size = log.seek(0, os.SEEK_END)
                    created = size == 0
                    if created:
                        header = _FileHeader.new(0)
                        lines = header.line() + lines
                    else:
                        log.seek(size - 1)
                        if log.read(1) != b"\n":
                            # A writer died mid-line: end its line, keep ours whole.
                            lines = b"\n" + lines
                    log.write(lines)
                    log.flush()
                    os.fsync(log.fileno())
                    size = os.fstat(log.fileno()).st_size
                if created:
                    _fsync_directory(self._dir)
                if header is None or size > max(self.COMPACT_BYTES, 2 * header.live):
                    self._compact(now)
        except OSError as exc:
            raise LedgerError(f"could not write the cancellation ledger: {exc}") from exc
        return True

    def _has_key(self, log: IO[bytes], key: str, now: float) -> bool:
        # Caller holds the file lock.  A byte search, then a look at each line
        # that holds the key: is it a live entry written under it?
        log.seek(0)
        data = log.read()
        needle = key.encode()
        found = data.find(needle)
        while found != -1:
            start = data.rfind(b"\n", 0, found) + 1
            end = data.find(b"\n", found)
            if end == -1:
                break  # a line still being written (its writer died): not an entry
            line = data[start:end]
            try:
                entry = json.loads(line)
                live = entry.get("once") == key and now - float(entry["at"]) <= self._ttl
            except (AttributeError, KeyError, TypeError, ValueError):
                live = False
            if live:
                return True
            found = data.find(needle, end)
        return False

    def _compact(self, now: float) -> None:
        # Caller holds the file lock.  The header (no "at") is not live.
        body = b"".join(
            line
            for line in self._path.read_bytes().splitlines(keepends=True)
            if line.endswith(b"\n") and self._live(line, now)
        )
        header = _FileHeader.new(len(body))
        tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as new:
                new.write(header.line() + body)
                new.flush()
                os.fsync(new.fileno())
            os.replace(tmp, self._path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_directory(self._dir)

    def _live(self, line: bytes, now: float) -> bool:
        try:
            return bool(now - float(json.loads(line)["at"]) <= self._ttl)
        except (KeyError, TypeError, ValueError):
            return False

    def read(self, cursor: str | None) -> tuple[list[Entry], str | None]:
        """Complete lines after ``cursor`` (``"g<generation>:<offset>"``, see the class)."""
        try:
            with open(self._path, "rb") as log:
                first = log.readline(_HEADER_MAX)
                header = _FileHeader.parse(first)
                if header is None:
                    # An older version's file: its cursor names the inode.
                    name, start = str(os.fstat(log.fileno()).st_ino), 0
                else:
                    name, start = f"g{header.generation}", len(first)
                offset = start
                if cursor is not None:
                    seen_name, _, seen_offset = cursor.rpartition(":")
                    if seen_name == name and seen_offset.isdigit():
                        offset = int(seen_offset)
                if not start <= offset <= os.fstat(log.fileno()).st_size:
                    offset = start
                log.seek(offset)
                data = log.read()
        except FileNotFoundError:
            return [], cursor
        except (OSError, ValueError) as exc:
            raise LedgerError(f"could not read the cancellation ledger: {exc}") from exc
        # A line still being appended has no newline yet: leave it for next time.
        complete = data[: data.rfind(b"\n") + 1]
        now = time.time()
        entries = []
        for line in complete.splitlines():
            entry = self._entry(line, now)
            if entry is not None:
                entries.append(entry)
        return entries, f"{name}:{offset + len(complete)}"

    def _entry(self, line: bytes, now: float) -> Entry | None:
        try:
            data = json.loads(line)
            recorded_at = float(data["at"])
        except (AttributeError, KeyError, TypeError, ValueError):
            return None  # not ours, or damaged
        if not math.isfinite(recorded_at) or now - recorded_at > self._ttl:
            return None
        targets = _wire_targets(data.get("targets"))
        if not targets:
            return None
        # Another version's reason degrades; its targets are kept (`_wire`).
        reason = reason_from_wire(data.get("reason"), recorded_at)
        return Entry(targets, reason, recorded_at, _grace(data.get("grace")))


#: The longest header line a reader looks for.
_HEADER_MAX: Final = 256


@dataclasses.dataclass(frozen=True, slots=True)
class _FileHeader:
    """The first line of a `FileLedger` file.

    ``generation`` is a random token new with every file; ``live`` is how
    many bytes of entries it was written with (0 for a new file; what was live
    at its compaction).
    """

    generation: str
    live: int

    @classmethod
    def new(cls, live: int) -> _FileHeader:
        """A header for a new file holding ``live`` bytes of entries."""
        return cls(secrets.token_hex(8), live)

    @classmethod
    def parse(cls, line: bytes) -> _FileHeader | None:
        """The header ``line`` holds, or None (an entry, or a file of an older version)."""
        if not line.startswith(b'{"cancellable_ledger"') or not line.endswith(b"\n"):
            return None
        try:
            data = json.loads(line)
            generation, live = data["generation"], data["live"]
        except (KeyError, TypeError, ValueError):
            return None
        if not isinstance(generation, str) or not generation.isalnum():
            return None
        if not isinstance(live, int) or isinstance(live, bool) or live < 0:
            return None
        return cls(generation, live)

    def line(self) -> bytes:
        """The header as the file's first line (entries skip it: it has no ``at``)."""
        fields = {"cancellable_ledger": 2, "generation": self.generation, "live": self.live}
        return json.dumps(fields).encode() + b"\n"


def _fsync_directory(directory: Path) -> None:
    # Make a rename or a new file in ``directory`` durable (POSIX; Windows has no
    # directory handles to fsync, and NTFS journals the rename itself).
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledgers:
    """The ledgers one process uses, one per app and configuration.

    Made once per process (`cancellable.celery._runtime`), and anew in a
    forked child: connections do not cross a fork.
    """

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary[Any, Ledger] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        #: Whether "not durable" was logged in this process.
        self._warned = False
        #: The apps `not_durable_once` has answered for (once per process and app).
        self._not_durable_told: weakref.WeakSet[Any] = weakref.WeakSet()

    def not_durable_once(self, app: Any) -> str | None:
        """Why ``app``'s cancellations are not durable, the first time it is asked; else None.

        None too when its ledger is durable.  For `cancel`'s warning and the
        ``celery cancel`` command: once per process and app.
        """
        ledger = self.get(app)
        if getattr(ledger, "durable", True) or getattr(ledger, "chosen", False):
            return None
        with self._lock:
            if app in self._not_durable_told:
                return None
            self._not_durable_told.add(app)
        why = getattr(ledger, "why", "no durable store")
        return (
            f"cancellations of app {app.main or 'default'!r} are not durable: only workers "
            f"online now receive them ({why}); a task queued or started later still runs. "
            "Set cancellable_ledger_url (redis://, rediss://, sentinel://, a database URL or "
            "file://), or see docs/ledgers.md"
        )

    def forget(self, app: Any) -> None:
        """Drop ``app``'s ledger (its settings changed); the next `get` makes a new one."""
        with self._lock:
            self._cache.pop(app, None)

    def get(self, app: Any) -> Ledger:
        """The ledger for ``app``, made at the first call.

        Raises:
            SettingError: ``cancellable_ledger_url`` or ``cancellable_ledger_ttl``
                (or another ``cancellable_*`` setting of the app) is invalid.
        """
        with self._lock:
            ledger = self._cache.get(app)
            if ledger is None:
                settings = settings_for(app)
                url = settings.ledger_url or ""
                ledger = self._cache[app] = self._make(app, url, settings.ledger_ttl)
        return ledger

    def _make(self, app: Any, url: str, ttl: float) -> Ledger:
        ledger = _make_ledger(app, url, ttl)
        if isinstance(ledger, NullLedger) and url.lower() != "none" and not self._warned:
            self._warned = True
            logger.warning(
                LEDGER_NOT_DURABLE,
                backend=type(app.backend).__name__,
                why=ledger.why,
                hint=(
                    "cancellations reach online workers but are not recorded durably; set "
                    "app.conf.cancellable_ledger_url (redis://, rediss://, sentinel://, a "
                    "database URL or file://)"
                ),
            )
        return ledger


def _make_ledger(app: Any, url: str, ttl: float) -> Ledger:
    """The ledger ``app`` is configured for (a `NullLedger` when it has no store)."""
    prefix = f"cancellable:{app.main or 'default'}:"
    if url.lower() == "none":
        return NullLedger()
    if url:
        if sql_url(url) is not None:
            return _sql_ledger(app, url, ttl, {}, None, "cancellable_ledger_url")
        return _ledger_from_url(app, url, prefix, ttl)
    backend = app.backend
    client = celery_internals.redis_backend_client(backend)
    if client is not None:
        # Celery's own parsing (rediss://, redis_backend_use_ssl, sentinel://),
        # but never its client itself: its socket timeout is 120 s.
        options = app.conf.get("result_backend_transport_options") or {}
        keyprefix = str(options.get("global_keyprefix") or "")
        if keyprefix and keyprefix[-1] not in ":_-.":
            keyprefix += "_"  # as Celery's backend prefixes its own keys
        server = celery_internals.redis_server_of(client)
        bounded = celery_internals.bounded_redis_client(client, TIMEOUT)
        setting = "result_backend (Celery's Redis result backend)"
        return RedisLedger(bounded, keyprefix + prefix, ttl, server, setting)
    base = celery_internals.filesystem_backend_path(backend)
    if base is not None:
        return FileLedger(Path(base) / ".cancellable-ledger" / (app.main or "default"), ttl)
    database = celery_internals.database_backend_engine(backend)
    if database is not None and not _in_memory_sqlite(database[0]):
        db_url, options, callback = database
        return _sql_ledger(app, db_url, ttl, options, callback, "result_backend")
    django_db = celery_internals.django_result_database(backend)
    if django_db is not None:
        # django-celery-results: the Django database the results go to.
        db_url, options = django_database(django_db)
        setting = f"DATABASES[{django_db['alias']!r}] (the django-db result backend)"
        return _sql_ledger(app, db_url, ttl, options, None, setting)
    broker = app.conf.broker_url or ""
    if isinstance(broker, str) and _redis_scheme(broker):
        return _ledger_from_url(app, broker, prefix, ttl, setting="broker_url")
    return NullLedger(
        f"the result backend {type(backend).__name__} and the broker "
        f"{_scheme(broker) or 'amqp'}:// keep no ledger, and cancellable_ledger_url is not set"
    )


def _sql_ledger(
    app: Any, url: str, ttl: float, options: dict[str, Any], callback: Any, setting: str
) -> Ledger:
    store = SqlStore(
        url,
        app.main or "default",
        ttl,
        engine_options=options,
        engine_callback=callback,
        setting=setting,
    )
    return SqlLedger(store)


def _in_memory_sqlite(url: str) -> bool:
    # Each connection to sqlite:// has its own database: nothing to share.
    normalised = sql_url(url) or url
    return normalised.startswith("sqlite") and normalised.split("://", 1)[1] in ("", "/:memory:")


def _scheme(url: object) -> str:
    return url.partition("://")[0].lower() if isinstance(url, str) and "://" in url else ""


def _redis_scheme(url: str) -> bool:
    return _scheme(url) in ("redis", "rediss", "unix", "socket", "sentinel")


def _ledger_from_url(
    app: Any, url: str, prefix: str, ttl: float, setting: str = "cancellable_ledger_url"
) -> Ledger:
    """A Redis or file ledger at ``url``.

    A Redis URL is read as kombu reads a broker URL, with the TLS settings
    and transport options of the broker when the broker is Redis (Sentinel
    included), else of the Redis result backend (``redis_backend_use_ssl``,
    ``result_backend_transport_options``); see docs/ledgers.md.
    """
    if _redis_scheme(url):
        conf = app.conf
        broker = conf.broker_url
        if setting == "broker_url" or (isinstance(broker, str) and _redis_scheme(broker)):
            use_ssl = conf.broker_use_ssl
            options = conf.broker_transport_options
            celery_keyprefix = False
        else:
            use_ssl = conf.get("redis_backend_use_ssl")
            options = conf.get("result_backend_transport_options")
            celery_keyprefix = True
        made = celery_internals.redis_ledger_client(
            url,
            use_ssl=use_ssl,
            transport_options=options,
            timeout=TIMEOUT,
            setting=setting,
            celery_keyprefix=celery_keyprefix,
        )
        return RedisLedger(made.client, made.keyprefix + prefix, ttl, made.where, setting)
    if url.startswith("file://"):
        return FileLedger(urllib.parse.urlparse(url).path, ttl)
    raise ValueError(
        f"{setting} must be a redis://, rediss://, unix://, sentinel:// or file:// URL, "
        f"a database URL or 'none', got {url!r}"
    )


class SqlLedger:
    """Cancellations in SQL tables: a `~cancellable.celery._ledger_sql.SqlStore`.

    One row per `CHUNK` targets, with the reason as JSON and the targets as
    ``kind:id`` lines (as in a Redis entry).  The store numbers rows in
    commit order; its module docstring says how, and why a cursor never
    skips a committed row.
    """

    durable = True

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        #: Where the entries are (no password), for log lines and messages.
        self.where = store.where

    def record(
        self, targets: Sequence[Target], reason: CancelReason, grace: float | None = None
    ) -> None:
        """One transaction of one row per `CHUNK` targets."""
        if not targets:
            return
        chunks = [_encode_targets(chunk) for chunk in _chunks(targets)]
        try:
            self.store.append(chunks, json.dumps(reason.to_dict()), _grace(grace))
        except StoreError as exc:
            raise LedgerError(str(exc)) from exc

    def record_once(self, targets: Sequence[Target], reason: CancelReason, key: str) -> bool:
        """`record` unless ``key`` was recorded within the TTL; True if this call wrote.

        The key goes into ``cancellable_ledger_once`` in the same transaction
        as the rows (`~cancellable.celery._ledger_sql.SqlStore.append`).
        """
        if not targets:
            return False
        chunks = [_encode_targets(chunk) for chunk in _chunks(targets)]
        try:
            return self.store.append(chunks, json.dumps(reason.to_dict()), None, once=key)
        except StoreError as exc:
            raise LedgerError(str(exc)) from exc

    def read(self, cursor: str | None) -> tuple[list[Entry], str | None]:
        """The live rows after ``cursor``, as entries (damaged rows skipped)."""
        try:
            rows, cursor = self.store.read(cursor)
        except StoreError as exc:
            raise LedgerError(str(exc)) from exc
        entries = []
        for recorded_at, reason, targets, grace in rows:
            decoded = _decode_targets(targets)
            if not decoded:
                continue  # not ours, or damaged: skip it rather than stop reading
            # Another version's reason degrades; its targets are kept (`_wire`).
            entries.append(
                Entry(
                    decoded,
                    reason_from_wire(_json(reason), recorded_at),
                    recorded_at,
                    _grace(grace),
                )
            )
        return entries, cursor
