"""The ledger: a durable record of cancellations, so none is ever lost.

A revoke broadcast reaches only the workers that are online at that moment.
The ledger keeps ``task id -> reason`` for a configurable time (a week by
default), and workers consult it when they start (so a task cancelled while
no worker was running is discarded on receipt) and, at a low rate, for the
tasks they are running (the safety net for a missed broadcast, and the only
path into a busy ``solo`` worker).

Where it lives, in order of preference:

1. ``app.conf.cancellable_ledger_url`` when set (``redis://...`` or
   ``file:///path``; the string ``"none"`` disables it);
2. the app's result backend, when it is Redis or the filesystem backend;
3. the app's broker, when it is Redis;
4. nowhere: cancellation still works for online workers, and a warning
   (``ledger.not_durable``) says so once per process.

The Redis layout, under ``cancellable:<app name>:``: one string key per task
(``…:task:<id>``, JSON reason, with a TTL) and one sorted set ``…:index``
(member: task id, score: expiry time) used to list live entries at worker
start.  Every operation is a single round trip.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from .._exceptions import CancelReason
from .._log import logger
from ..events import LEDGER_NOT_DURABLE

__all__ = [
    "DEFAULT_LEDGER_TTL",
    "FileLedger",
    "Ledger",
    "LedgerError",
    "NullLedger",
    "RedisLedger",
    "ledger_for",
]

#: How long a cancellation is remembered, in seconds (one week).
DEFAULT_LEDGER_TTL = 7 * 24 * 3600


class LedgerError(Exception):
    """The ledger could not be read or written (the store is down)."""


class Ledger(Protocol):
    """**Protocol:** where cancellations are recorded durably.

    .. versionadded:: 0.1.0
    """

    durable: bool

    def record(self, task_ids: Iterable[str], reason: CancelReason) -> None:
        """Remember that ``task_ids`` were cancelled for ``reason``."""

    def lookup(self, task_ids: Iterable[str]) -> dict[str, CancelReason]:
        """The recorded reasons of those of ``task_ids`` that were cancelled."""

    def all_ids(self) -> list[str]:
        """Every task id with a live (not expired) entry."""

    def since(self, cursor: float) -> tuple[list[str], float]:
        """Live ids recorded after ``cursor``, and the cursor to pass next time.

        Start with ``0.0`` to get every live id.  Workers call this at start
        and then every poll interval, so each learns of every cancellation
        within one interval, whether or not its broadcast arrived.
        """


class NullLedger:
    """No durable store: records nothing, finds nothing."""

    durable = False

    def record(self, task_ids: Iterable[str], reason: CancelReason) -> None:
        """Do nothing."""

    def lookup(self, task_ids: Iterable[str]) -> dict[str, CancelReason]:
        """Find nothing."""
        return {}

    def all_ids(self) -> list[str]:
        """Nothing is recorded."""
        return []

    def since(self, cursor: float) -> tuple[list[str], float]:
        """Nothing is recorded."""
        return [], cursor


def _encode(task_id: str, reason: CancelReason) -> str:
    return json.dumps({"id": task_id, "reason": reason.to_dict()})


def _decode(raw: str | bytes) -> CancelReason:
    data = json.loads(raw)
    return CancelReason.from_dict(data["reason"])


class RedisLedger:
    """Cancellations in Redis (see the module docstring for the layout)."""

    durable = True

    def __init__(self, client: Any, prefix: str, ttl: float) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl = max(1, int(ttl))

    def _key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    def record(self, task_ids: Iterable[str], reason: CancelReason) -> None:
        """Write one entry per id with the TTL, and index it; one round trip."""
        expires = time.time() + self._ttl
        try:
            pipe = self._client.pipeline(transaction=False)
            for task_id in task_ids:
                # NX: the first reason recorded for a task wins, as in a scope.
                pipe.set(self._key(task_id), _encode(task_id, reason), ex=self._ttl, nx=True)
                pipe.zadd(self._prefix + "index", {task_id: expires})
            pipe.zremrangebyscore(self._prefix + "index", "-inf", time.time())
            pipe.execute()
        except Exception as exc:
            raise LedgerError(f"could not write the cancellation ledger: {exc}") from exc

    def lookup(self, task_ids: Iterable[str]) -> dict[str, CancelReason]:
        """One MGET for all ids."""
        ids = list(task_ids)
        if not ids:
            return {}
        try:
            values = self._client.mget([self._key(task_id) for task_id in ids])
        except Exception as exc:
            raise LedgerError(f"could not read the cancellation ledger: {exc}") from exc
        return {
            task_id: _decode(raw)
            for task_id, raw in zip(ids, values, strict=True)
            if raw is not None
        }

    def all_ids(self) -> list[str]:
        """Ids whose entries have not expired, from the index."""
        return self.since(0.0)[0]

    def since(self, cursor: float) -> tuple[list[str], float]:
        """Ids indexed after ``cursor``; one ZRANGEBYSCORE.

        The index score is the entry's expiry time, which grows with the time
        of recording (the TTL is one setting per app), so it doubles as the
        cursor.  Entries that have expired are never returned.
        """
        low = max(cursor, time.time())
        try:
            rows = self._client.zrangebyscore(
                self._prefix + "index", f"({low}", "+inf", withscores=True
            )
        except Exception as exc:
            raise LedgerError(f"could not read the cancellation ledger: {exc}") from exc
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m, _score in rows]
        return ids, max([cursor, *(float(score) for _m, score in rows)])


class FileLedger:
    """Cancellations as small JSON files in a directory (one per task).

    For the filesystem broker and result backend (the no-server setup).
    Writes are atomic (write to a temporary name, then rename), so readers in
    other processes never see half a file.
    """

    durable = True

    def __init__(self, directory: str | os.PathLike[str], ttl: float) -> None:
        self._dir = Path(directory)
        self._ttl = ttl
        self._dir.mkdir(parents=True, exist_ok=True)

    def _path(self, task_id: str) -> Path:
        # Task ids are usually UUIDs; quote anything else so it is a safe name.
        return self._dir / (urllib.parse.quote(task_id, safe="") + ".json")

    def record(self, task_ids: Iterable[str], reason: CancelReason) -> None:
        """Write one file per id, unless one exists (the first reason wins)."""
        try:
            for task_id in task_ids:
                path = self._path(task_id)
                if path.exists():
                    continue
                tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(_encode(task_id, reason), encoding="utf-8")
                os.replace(tmp, path)
        except OSError as exc:
            raise LedgerError(f"could not write the cancellation ledger: {exc}") from exc

    def lookup(self, task_ids: Iterable[str]) -> dict[str, CancelReason]:
        """Read the files of the given ids that exist and have not expired."""
        found: dict[str, CancelReason] = {}
        now = time.time()
        for task_id in task_ids:
            path = self._path(task_id)
            try:
                if now - path.stat().st_mtime > self._ttl:
                    continue
                found[task_id] = _decode(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError) as exc:
                raise LedgerError(f"could not read the cancellation ledger: {exc}") from exc
        return found

    def all_ids(self) -> list[str]:
        """Every live entry; expired files are removed on the way."""
        return self.since(0.0)[0]

    def since(self, cursor: float) -> tuple[list[str], float]:
        """Live entries written after ``cursor`` (a modification time)."""
        now = time.time()
        ids = []
        newest = cursor
        try:
            for path in self._dir.glob("*.json"):
                try:
                    mtime = path.stat().st_mtime
                    if now - mtime > self._ttl:
                        path.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
                if mtime > cursor:
                    ids.append(urllib.parse.unquote(path.name[: -len(".json")]))
                    newest = max(newest, mtime)
        except OSError as exc:
            raise LedgerError(f"could not read the cancellation ledger: {exc}") from exc
        return ids, newest


_cache: dict[tuple[int, str], Ledger] = {}
_cache_lock = threading.Lock()
_warned = False


def _setting(app: Any, name: str, default: Any) -> Any:
    value = app.conf.get(name)
    return default if value is None else value


def ledger_for(app: Any) -> Ledger:
    """The ledger for ``app``, made once per process and app configuration."""
    url = _setting(app, "cancellable_ledger_url", "")
    ttl = float(_setting(app, "cancellable_ledger_ttl", DEFAULT_LEDGER_TTL))
    key = (id(app), f"{url}|{ttl}|{os.getpid()}")
    with _cache_lock:
        ledger = _cache.get(key)
        if ledger is None:
            ledger = _cache[key] = _make_ledger(app, str(url), ttl)
    return ledger


def _make_ledger(app: Any, url: str, ttl: float) -> Ledger:
    global _warned
    prefix = f"cancellable:{app.main or 'default'}:"
    if url.lower() == "none":
        return NullLedger()
    if url:
        return _ledger_from_url(url, prefix, ttl)
    backend = app.backend
    backend_name = type(backend).__name__
    if backend_name in ("RedisBackend", "SentinelBackend") and hasattr(backend, "client"):
        return RedisLedger(backend.client, prefix, ttl)
    if backend_name == "FilesystemBackend":
        base = backend.path.decode() if isinstance(backend.path, bytes) else str(backend.path)
        return FileLedger(Path(base) / ".cancellable-ledger" / (app.main or "default"), ttl)
    broker = app.conf.broker_url or ""
    if isinstance(broker, str) and broker.startswith(("redis://", "rediss://")):
        return _ledger_from_url(broker.split(";")[0], prefix, ttl)
    if not _warned:
        _warned = True
        logger.warning(
            LEDGER_NOT_DURABLE,
            backend=backend_name,
            hint=(
                "cancellations reach online workers but are not recorded durably; set "
                "app.conf.cancellable_ledger_url to a redis:// URL or use a Redis result backend"
            ),
        )
    return NullLedger()


def _ledger_from_url(url: str, prefix: str, ttl: float) -> Ledger:
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        return RedisLedger(redis.Redis.from_url(url), prefix, ttl)
    if url.startswith("file://"):
        return FileLedger(urllib.parse.urlparse(url).path, ttl)
    raise ValueError(
        f"cancellable_ledger_url must be a redis://, rediss://, unix:// or file:// URL "
        f"or 'none', got {url!r}"
    )


def reset() -> None:
    """Forget cached ledgers (tests, and after a fork)."""
    global _warned
    with _cache_lock:
        _cache.clear()
    _warned = False
