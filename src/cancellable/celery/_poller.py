"""The poller: one thread per running worker, the worker's clock and its safety net.

Started by the worker's bootstep when the worker starts consuming and
stopped by it however the worker ends (`cancellable.celery._activation`).
Every `TICK` seconds it advances the forwards to prefork children
(`~cancellable.celery._delivery.Delivery.tick`) and the cancellation ladder
(`~cancellable.celery._ladder.Ladder.tick`); every
``cancellable_poll_interval`` seconds it reads what the ledger gained since
its last read (one round trip) and delivers it to the tasks here.  That
catches missed broadcasts, and it is the only way into a busy ``solo``
worker, whose consumer reads nothing (broadcasts included) while a task
runs.

Fork safety: the poller does its work under the worker's ``tick_lock``,
which the runtime's fork handler takes before every fork
(`cancellable.celery._runtime`), so a child is never forked while the
poller holds one of our locks or a logger's.  Network I/O (the ledger
read) happens outside it.
"""

from __future__ import annotations

import threading
import time
from typing import Final

from .._log import logger
from ..events import LEDGER_POLL_FAILED, LEDGER_UNAVAILABLE
from . import _ledger
from ._ledger import Target
from ._revokes import deliver_targets
from ._runtime import WorkerRuntime, runtime

__all__ = ["Poller"]

#: Seconds between the poller's forwarding ticks.
TICK: Final = 0.1

#: Seconds between purges of expired index entries.
PURGE_EVERY: Final = 600.0

#: While the ledger stays unreachable, seconds between its warnings (the first
#: failure is logged at once; the next ones carry how many failed since).
WARN_EVERY: Final = 60.0


class Poller:
    """One worker's poller thread (see the module docstring)."""

    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.app = rt.app
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cancellable-poller", daemon=True)
        self.interval = rt.settings.poll_interval
        self.ttl = rt.settings.ledger_ttl
        #: Failed ledger reads since the last warning, and when it was logged.
        self.failures = 0
        self.warned_at: float | None = None

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (up to 5 s)."""
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(5.0)

    def _run(self) -> None:
        rt = self.rt
        now = time.monotonic()
        next_sync = now + self.interval
        next_purge = now + PURGE_EVERY
        while not self.stopped.wait(TICK):
            try:
                with rt.tick_lock:
                    rt.delivery.tick()
                    rt.ladder.tick()
                now = time.monotonic()
                if now >= next_sync:
                    next_sync = now + self.interval
                    self.sync()
                if now >= next_purge:
                    next_purge = now + PURGE_EVERY
                    rt.index.purge(self.ttl)
            except Exception as exc:  # noqa: BLE001 - the net must not die
                with rt.tick_lock:
                    logger.warning(LEDGER_POLL_FAILED, error=repr(exc), exc_info=exc)

    def sync(self) -> None:
        """Read the ledger's news into the index and deliver it (network outside the lock)."""
        rt = self.rt
        with rt.tick_lock:
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
