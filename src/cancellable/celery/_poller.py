"""The poller: two threads per running worker, the worker's clock and its safety net.

Started by the worker's bootstep when the worker starts consuming and
stopped by it however the worker ends (`cancellable.celery._activation`).

The ticker (thread ``cancellable-ticker``)
    Every `TICK` seconds it advances the forwards to prefork children
    (`~cancellable.celery._delivery.Delivery.tick`) and the cancellation
    ladder (`~cancellable.celery._ladder.Ladder.tick`), begins a warm
    shutdown that Celery's signal handler asked for (in the solo pool the
    consumer's thread is running the task: `cancellable.celery._shutdown`),
    and every `PURGE_EVERY` seconds it drops expired index entries.  It does no
    network I/O at all, so a hung ledger server cannot delay a re-signal or
    a step of the ladder (a ``grace=1`` cancellation is interrupted after
    about a second, whatever the ledger's server does).
The ledger thread (thread ``cancellable-poller``)
    All of the worker's ledger I/O, one call at a time, each bounded by
    `cancellable.celery._ledger.TIMEOUT`: it writes the records other threads
    queued (`~cancellable.celery._runtime.PendingWrites`: plain revokes, a
    workflow's root id), retrying what fails every `RETRY_WRITES_AFTER`
    seconds while the worker lives, and every ``cancellable_poll_interval``
    seconds it reads what the ledger gained since its last read (one round
    trip) and delivers it to the tasks here.  That catches missed
    broadcasts, and it is the only way into a busy ``solo`` worker, whose
    consumer reads nothing (broadcasts included) while a task runs.

Each duty is guarded on its own: one that raises is logged (once per cause,
then at most every minute, `~cancellable.celery._runtime.FailureLog`) and
the others still run, that tick and every tick after.

Fork safety: both threads do their work (and their logging) under the
worker's ``tick_lock``, which the runtime's fork handler takes before every
fork (`cancellable.celery._runtime`), so a child is never forked while one
of them holds one of our locks or a logger's.  Network I/O happens outside
it, always.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

from .._log import logger
from ..events import LEDGER_UNAVAILABLE
from . import _ledger, _shutdown
from ._ledger import Target
from ._revokes import deliver_targets
from ._runtime import PendingWrite, WorkerRuntime, runtime

__all__ = ["Poller"]

#: Seconds between the ticker's forwarding ticks.
TICK: Final = 0.1

#: Seconds between purges of expired index entries.
PURGE_EVERY: Final = 600.0

#: While the ledger stays unreachable, seconds between its warnings (the first
#: failure is logged at once; the next ones carry how many failed since).
WARN_EVERY: Final = 60.0

#: Seconds between two attempts at queued ledger writes that failed.
RETRY_WRITES_AFTER: Final = 1.0

#: How long `Poller.stop` waits for each thread (the ledger thread may be in a
#: call bounded by `cancellable.celery._ledger.TIMEOUT`).
STOP_WAIT: Final = 5.0


class Poller:
    """One worker's poller: its ticker and its ledger thread (see the module docstring)."""

    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.app = rt.app
        self.stopped = threading.Event()
        #: The ledger thread.
        self.thread = threading.Thread(target=self._run, name="cancellable-poller", daemon=True)
        #: The ticker thread.
        self.ticker = threading.Thread(target=self._tick, name="cancellable-ticker", daemon=True)
        self.interval = rt.settings.poll_interval
        self.ttl = rt.settings.ledger_ttl
        #: Failed ledger reads since the last warning, and when it was logged.
        self.failures = 0
        self.warned_at: float | None = None
        #: Failed ledger writes since the last warning, and when it was logged.
        self.write_failures = 0
        self.write_warned_at: float | None = None

    def start(self) -> None:
        """Start both threads."""
        self.ticker.start()
        self.thread.start()

    def stop(self) -> None:
        """Stop both threads and wait for them (up to `STOP_WAIT` s each).

        Records still queued get one last attempt on the ledger thread;
        any it cannot write are logged (``ledger.unavailable``, with their ids).
        """
        self.stopped.set()
        self.rt.writes.queued.set()  # wake the ledger thread
        for thread in (self.ticker, self.thread):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(STOP_WAIT)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            # The process may end with the thread (a daemon) still in a call:
            # say so here, since its own last warning may never be logged.
            with self.rt.tick_lock:
                logger.warning(
                    LEDGER_UNAVAILABLE,
                    error="the worker stopped while its ledger thread was still in a call",
                    during="stop",
                    unwritten=len(self.rt.writes),
                )

    # ------------------------------------------------------------------
    # The ticker: no network I/O.

    def _tick(self) -> None:
        rt = self.rt
        timings = rt.timings
        next_purge = time.monotonic() + PURGE_EVERY
        last: float | None = None
        while not self.stopped.wait(TICK):
            began = time.monotonic()
            if last is not None:
                timings.tick_gap = max(timings.tick_gap, began - last)
            last = began
            with rt.tick_lock:
                if rt.shutdown_requested and not rt.shutdown_begun.locked():
                    self._duty("shutdown", lambda: _shutdown.begin_shutdown(rt), locked=True)
                self._duty("delivery tick", rt.delivery.tick, locked=True)
                self._duty("ladder tick", rt.ladder.tick, locked=True)
            now = time.monotonic()
            timings.tick = max(timings.tick, now - began)
            if now >= next_purge:
                next_purge = now + PURGE_EVERY
                # Under tick_lock too: a fork never copies the index's lock held.
                with rt.tick_lock:
                    self._duty("index purge", lambda: rt.index.purge(self.ttl), locked=True)

    def _duty(self, where: str, duty: Callable[[], object], locked: bool = False) -> None:
        # One duty failing must not skip the others (nor stop the thread).
        try:
            duty()
        except Exception as exc:  # noqa: BLE001 - logged once per cause
            self._failed(where, exc, locked)

    def _failed(self, where: str, exc: Exception, locked: bool = False) -> None:
        # Logged under tick_lock (a fork never copies a logger's lock held).
        if locked:
            self.rt.failures.duty_failed(where, exc)
        else:
            with self.rt.tick_lock:
                self.rt.failures.duty_failed(where, exc)

    # ------------------------------------------------------------------
    # The ledger thread: every network call of the worker, none under a lock.

    def _run(self) -> None:
        now = time.monotonic()
        next_sync = now + self.interval
        next_write = now
        writes = self.rt.writes
        while not self.stopped.is_set():
            writes.queued.clear()  # set again by any put from here on
            now = time.monotonic()
            if len(writes) and now >= next_write and not self._guarded("ledger write", self.flush):
                next_write = time.monotonic() + RETRY_WRITES_AFTER
            now = time.monotonic()
            # Once stopping, no read: the last flush must fit in `STOP_WAIT`
            # after a call already under way (each is bounded by the ledger's TIMEOUT).
            if now >= next_sync and not self.stopped.is_set():
                next_sync = now + self.interval
                self._guarded("ledger read", self.sync)
            wake_at = next_sync if not len(writes) else min(next_sync, next_write)
            writes.queued.wait(max(0.0, wake_at - time.monotonic()))
        self._guarded("ledger write", self._last_flush)

    def _guarded(self, where: str, duty: Callable[[], bool | None]) -> bool:
        began = time.monotonic()
        try:
            return duty() is not False
        except Exception as exc:  # noqa: BLE001 - logged once per cause
            self._failed(where, exc)
            return False
        finally:
            timings = self.rt.timings
            timings.ledger_call = max(timings.ledger_call, time.monotonic() - began)

    def flush(self) -> bool:
        """Write the queued ledger records, oldest first; False if one failed (kept for later)."""
        rt = self.rt
        items = rt.writes.take()
        if not items:
            return True
        ledger = runtime().ledgers.get(self.app)
        for done, item in enumerate(items):
            try:
                _write(ledger, item)
            except _ledger.LedgerError as exc:
                rt.writes.put_back(items[done:])
                self.write_failures += 1
                now = time.monotonic()
                if self.write_warned_at is None or now - self.write_warned_at >= WARN_EVERY:
                    with rt.tick_lock:
                        logger.warning(
                            LEDGER_UNAVAILABLE,
                            error=str(exc),
                            during="write",
                            failures=self.write_failures,
                            pending=len(rt.writes),
                            retry_in_s=RETRY_WRITES_AFTER,
                        )
                    self.write_failures = 0
                    self.write_warned_at = now
                return False
            except BaseException:
                rt.writes.put_back(items[done:])
                raise
        self.write_warned_at = None
        self.write_failures = 0
        return True

    def _last_flush(self) -> None:
        # The worker stops: one more attempt, then say what is not durable.
        if len(self.rt.writes) and not self.flush():
            lost = self.rt.writes.take()
            ids = [target_id for item in lost for _kind, target_id in item.targets]
            with self.rt.tick_lock:
                logger.warning(
                    LEDGER_UNAVAILABLE,
                    error="the worker stopped with ledger records unwritten",
                    during="stop",
                    task_ids=ids[:20],
                    unwritten=len(ids),
                )

    def sync(self) -> None:
        """Read the ledger's news into the index and deliver it (network outside the lock)."""
        rt = self.rt
        ledger = runtime().ledgers.get(self.app)
        try:
            entries, cursor = ledger.read(rt.index.cursor)
        except _ledger.LedgerError as exc:
            self.failures += 1
            now = time.monotonic()
            if self.warned_at is None or now - self.warned_at >= WARN_EVERY:
                with rt.tick_lock:
                    logger.warning(LEDGER_UNAVAILABLE, error=str(exc), failures=self.failures)
                self.failures = 0
                self.warned_at = now
            return
        self.warned_at = None
        self.failures = 0
        if self.stopped.is_set():
            return
        with rt.tick_lock:
            added = rt.index.add_entries(entries)
            rt.index.cursor = cursor
            if added:
                # The grace a cancel() gave travels in its entry: by task id
                # for task targets, and for each group or root target, to
                # every held task that target reaches.
                graces = {
                    target_id: entry.grace
                    for entry in entries
                    if entry.grace is not None
                    for kind, target_id in entry.targets
                    if kind == "task"
                }
                fresh = set(added)
                wide: dict[float, list[Target]] = {}
                for entry in entries:
                    if entry.grace is not None:
                        for target in entry.targets:
                            if target[0] != "task" and target in fresh:
                                wide.setdefault(entry.grace, []).append(target)
                for grace, targets in wide.items():
                    deliver_targets(rt, targets, grace)
                in_wide = {target for targets in wide.values() for target in targets}
                deliver_targets(rt, [t for t in added if t not in in_wide], graces=graces)


def _write(ledger: _ledger.Ledger, item: PendingWrite) -> None:
    if item.key is None:
        ledger.record(item.targets, item.reason)
    else:
        _ledger.record_once(ledger, item.targets, item.reason, item.key)
