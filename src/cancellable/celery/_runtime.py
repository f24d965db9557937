"""Where `cancellable.celery` keeps its state in a process: two runtime objects.

Everything the integration holds at run time lives in one of two objects,
and nowhere else (the modules keep only constants):

`WorkerRuntime`
    The main process of a worker, from ``worker_init`` until the worker
    stops: its app, the index of live cancellations, the deliveries to the
    tasks it holds (and the mailbox shared with prefork children), the
    cancellation ladder, the table the prefork children publish in, and the
    poller thread (started by the worker's bootstep, see
    `cancellable.celery._activation`).
`TaskRuntime`
    A process that runs ``@cancellable`` tasks: a prefork child, or the
    worker's own process for the threads, solo, gevent and eventlet pools
    (and any process that runs a task eagerly).  Its running tasks, its
    copy of the index, the mailbox it reads, its row in the child table, its
    wake-up signal and the interrupt window.

Both are reached through one accessor, `runtime`, which returns this
process's `Runtime`: ``runtime().worker`` (None outside a running worker's
main process), ``runtime().tasks``, ``runtime().ledgers`` (the ledger of
each app, for clients too) and ``runtime().broadcasts`` (the bounded broker
connections of `~cancellable.celery.cancel`).  The `Runtime` is replaced in two places only:
`install_worker` / `remove_worker` (a worker starts and stops in this
process) and, after a fork, in the child (`_after_fork_in_child`), which
keeps the shared memory (index copy, mailbox, child table, signal) and
nothing else: no threads, no locks, no connections.

Fork safety: before every fork the running worker's ``tick_lock`` is taken
(the poller does its work, and its logging, under it), then the locks a
child can meet in the objects it inherits (`WorkerRuntime.fork_locks`: the
index's and the mailbox's), so a child is never forked while another thread
holds one of our locks or a logger's.  Both the parent and the child release
them after the fork.  Nothing does network I/O while it holds one of these
locks (the ledger is read and written outside them), so billiard's fork never
waits on the network.  The fork handlers are registered the first time
`runtime` is called in the process.

Ledger writes of a worker (`PendingWrites`) are queued, never made by the
thread that asks: the consumer thread (revoke commands) and the ticks do no
network I/O; the poller's ledger thread writes them (`cancellable.celery._poller`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .. import _hooks
from .._exceptions import CancelReason
from .._log import logger
from ..events import CANCEL_NOT_ESCALATED
from ..events import LEDGER_POLL_FAILED as _DUTY_FAILED
from . import _celery_internals as celery_internals
from ._broker import Broadcasts
from ._childtable import ChildTable
from ._delivery import Delivery, check_mailbox, mailbox_reason
from ._index import TargetIndex
from ._interrupt import Interrupts
from ._ladder import Ladder
from ._ledger import LedgerCalls, Ledgers, Target
from ._mailbox import Mailbox
from ._registry import RunningTasks
from ._settings import Settings, settings_for
from ._wakeup import DEFAULT_SIGNAL, Wakeup


class Background(Protocol):
    """A worker's background thread (the poller, `cancellable.celery._poller`)."""

    def stop(self) -> None:
        """Stop the thread and wait for it."""


__all__ = [
    "Background",
    "FailureLog",
    "PendingWrite",
    "PendingWrites",
    "Runtime",
    "TaskRuntime",
    "Timings",
    "WorkerRuntime",
    "install_worker",
    "remove_worker",
    "runtime",
]


@dataclass(frozen=True)
class PendingWrite:
    """A ledger record a worker has still to make."""

    targets: Sequence[Target]
    reason: CancelReason
    #: The idempotency key of a plain revoke (None: record unconditionally).
    key: str | None = None


class PendingWrites:
    """The ledger records a worker has queued and not made yet (see the module docstring).

    `put` never blocks on anything but a short in-memory lock; the poller's
    ledger thread `take` s them, and `put_back` s those it could not write,
    in order, to try again.  Nothing is dropped while the worker lives.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[PendingWrite] = deque()
        #: Set when something was queued (the ledger thread waits on it).
        self.queued = threading.Event()

    def put(self, targets: Sequence[Target], reason: CancelReason, key: str | None = None) -> None:
        """Queue one record (nothing if ``targets`` is empty)."""
        if not targets:
            return
        with self._lock:
            self._items.append(PendingWrite(list(targets), reason, key))
        self.queued.set()

    def take(self) -> list[PendingWrite]:
        """Every queued record, oldest first (the queue is then empty)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self.queued.clear()
        return items

    def put_back(self, items: Sequence[PendingWrite]) -> None:
        """Return records that could not be written, ahead of any queued since."""
        with self._lock:
            self._items.extendleft(reversed(items))

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Timings:
    """The longest waits of a worker's threads so far (seconds), for diagnostics and the soak.

    Plain floats, each written by one thread only (reads of a float are atomic).
    """

    def __init__(self) -> None:
        #: The library's own work on the consumer thread for one revoke command.
        self.consumer = 0.0
        #: One tick of the ticker (forwards and ladder), and the longest time
        #: between the starts of two ticks (the ladder's longest stall).
        self.tick = 0.0
        self.tick_gap = 0.0
        #: One duty of the ledger thread (a read with its delivery, or a write).
        self.ledger_call = 0.0

    def as_dict(self) -> dict[str, float]:
        """The figures, rounded to the millisecond."""
        return {
            "consumer_s": round(self.consumer, 3),
            "tick_s": round(self.tick, 3),
            "tick_gap_s": round(self.tick_gap, 3),
            "ledger_call_s": round(self.ledger_call, 3),
        }


class FailureLog:
    """Logs a failure once per cause, then at most every `EVERY` seconds with a count.

    A cause is where it happened and the exception's type.  Callers log
    under the worker's ``tick_lock`` when they run on the poller's threads.
    """

    #: Seconds between two warnings of the same cause.
    EVERY: Final = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: cause -> (when last logged, failures since).
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def report(self, event: str, where: str, exc: BaseException, **fields: Any) -> bool:
        """Log ``exc`` under ``event`` unless its cause was logged lately; True if logged."""
        cause = (where, type(exc).__name__)
        now = time.monotonic()
        with self._lock:
            last, since = self._seen.get(cause, (None, 0))
            if last is not None and now - last < self.EVERY:
                self._seen[cause] = (last, since + 1)
                return False
            self._seen[cause] = (now, 0)
        logger.warning(event, where=where, error=repr(exc), repeats=since, exc_info=exc, **fields)
        return True

    def duty_failed(self, where: str, exc: BaseException) -> bool:
        """`report` a failed duty of the poller's threads (``ledger.poll_failed``)."""
        return self.report(_DUTY_FAILED, where, exc)


class TaskRuntime:
    """What a process that runs ``@cancellable`` tasks holds (see the module docstring).

    Args:
        index: The live cancellations this process knows (a prefork child:
            the copy it was forked with).
        mailbox: The mailbox shared with the worker's main process (None:
            not a prefork worker).
        table: The child table (prefork only).
        signum: The wake-up signal.
        kill_group: Whether a new prefork child leads its own process group.
    """

    def __init__(
        self,
        index: TargetIndex | None = None,
        mailbox: Mailbox | None = None,
        table: ChildTable | None = None,
        signum: int | None = DEFAULT_SIGNAL,
        kill_group: bool = False,
    ) -> None:
        self.index = TargetIndex() if index is None else index
        self.mailbox = mailbox
        self.table = table
        self.kill_group = kill_group
        self.running = RunningTasks()
        self.wakeup = Wakeup(signum)
        self.interrupts = Interrupts(self.running, mailbox)

    def check_mailbox(self) -> None:
        """Cancel the running tasks the mailbox names (after a wake-up signal)."""
        check_mailbox(self.mailbox, self.running)

    def reason_before_start(self, request: Any) -> CancelReason | None:
        """Why a task that is about to start is cancelled already, or None.

        In-process pools share the worker's live index; a prefork child has
        the copy it was forked with, and the mailbox for everything since.
        """
        reason = self.index.match_request(request)
        if reason is None:
            reason = mailbox_reason(self.mailbox, request.id)
        if reason is None and celery_internals.is_revoked_id(request.id):
            reason = CancelReason(source="revoked", message="revoked before it started")
        return reason

    def child_started(self) -> bool:
        """In a new prefork child (``worker_process_init``): take part in deliveries.

        Installs the wake-up handler, leads a process group of its own if so
        configured, and claims the child's row in the child table.  False if
        this child did not inherit its parent's mailbox (the pool started
        it with the spawn or forkserver start method): it cannot be reached.
        """
        box = self.mailbox
        if box is None or box.owner != os.getppid():
            return False
        self.wakeup.install(self.check_mailbox, self.interrupts.raise_if_asked)
        # A child an interrupt landed in may hold a lock for ever: it leaves
        # the pool once it has reported its task (see _interrupt).  So may a
        # child in which a cleanup hook's budget raised: only a child that
        # will be retired lets a budget raise at an arbitrary bytecode.
        interrupts = self.interrupts
        if celery_internals.retire_child_when(lambda: interrupts.landed):
            _hooks.allow_async_raise(interrupts.mark_landed)
        if self.kill_group and hasattr(os, "setpgid"):
            try:
                os.setpgid(0, 0)
            except OSError as exc:
                logger.warning(CANCEL_NOT_ESCALATED, why=f"cannot lead a process group: {exc}")
        table = self.table
        if table is not None and table.owner == os.getppid():
            index = celery_internals.process_index()
            if index is not None:
                table.claim(index)
        return True

    def forked(self) -> TaskRuntime:
        """This runtime for a forked child: the shared memory and settings, nothing else."""
        return TaskRuntime(
            self.index.forked(), self.mailbox, self.table, self.wakeup.signum, self.kill_group
        )


class WorkerRuntime:
    """What the main process of one worker holds (see the module docstring).

    Built at ``worker_init``, before the pool forks, so the children share
    its mailbox and child table.  Tests build their own.

    Args:
        app: The worker's app.
        settings: Its validated settings (default: `settings_for` the app,
            which raises `~cancellable.celery._settings.SettingError` for a
            bad one).
        worker: The ``WorkController`` (None in tests that have no worker).
        pool_kind: ``"prefork"``, ``"threads"``, ``"solo"``, ``"gevent"``,
            ``"eventlet"`` or ``""``.
        mailbox_slots: Slots in the mailbox: the most tasks the worker can hold.
    """

    def __init__(
        self,
        app: Any,
        settings: Settings | None = None,
        worker: Any = None,
        pool_kind: str = "",
        mailbox_slots: int = 0,
    ) -> None:
        self.app = app
        self.settings = settings_for(app) if settings is None else settings
        self.worker = worker
        self.pool_kind = pool_kind
        mailbox = Mailbox(mailbox_slots)
        table = ChildTable() if pool_kind == "prefork" else None
        signum = self.settings.wakeup_signal
        #: The tasks of this process (in-process pools run them here).
        self.tasks = TaskRuntime(
            TargetIndex(),
            mailbox,
            table,
            None if signum is None else int(signum),
            self.settings.kill_process_group,
        )
        self.index = self.tasks.index
        self.mailbox = mailbox
        self.table = table
        self.delivery = Delivery(self.tasks.running, mailbox, self.tasks.wakeup, app)
        self.ladder = Ladder(
            app,
            self.settings,
            worker,
            pool_kind,
            self.delivery,
            self.tasks.running,
            table,
        )
        #: Held by the poller while it works; taken before every fork.  Never
        #: held across network I/O.
        self.tick_lock = threading.Lock()
        #: Ledger records to make (the ledger thread writes them).
        self.writes = PendingWrites()
        #: Rate-limited logging of failures, one cause at a time.
        self.failures = FailureLog()
        #: The longest waits of its threads so far.
        self.timings = Timings()
        #: The poller thread, from the worker's bootstep ``start`` to its ``stop``.
        self.poller: Background | None = None
        #: Whether the worker is running (between its bootstep's start and stop):
        #: the patched Celery methods act only then.
        self.active = False
        #: Set (a plain assignment, safe in a signal handler) when Celery's
        #: warm-shutdown signal handler runs (``worker_shutting_down``); the
        #: ticker then begins the shutdown (`cancellable.celery._shutdown`).
        self.shutdown_requested = False
        #: Taken once by whoever begins the shutdown (the ticker or the
        #: bootstep's ``close``): the running tasks are cancelled once.
        self.shutdown_begun = threading.Lock()

    def fork_locks(self) -> tuple[threading.Lock, ...]:
        """The locks the fork handler takes, in this order, after ``tick_lock``."""
        return (self.index.lock, self.mailbox.lock)

    def serves(self, app: Any) -> bool:
        """Whether this running worker should act for ``app`` (None: any app)."""
        return self.active and (app is None or app is self.app)


class Runtime:
    """Everything `cancellable.celery` holds in one process (see the module docstring)."""

    def __init__(
        self,
        tasks: TaskRuntime | None = None,
        worker: WorkerRuntime | None = None,
        ledgers: Ledgers | None = None,
        broadcasts: Broadcasts | None = None,
        ledger_calls: LedgerCalls | None = None,
    ) -> None:
        #: The main-process runtime of the worker running here (None: none).
        self.worker: Final = worker
        #: The tasks of this process.
        self.tasks: Final = TaskRuntime() if tasks is None else tasks
        #: The ledger of each app.
        self.ledgers: Final = Ledgers() if ledgers is None else ledgers
        #: The bounded broker connections `cancel` uses, per app.
        self.broadcasts: Final = Broadcasts() if broadcasts is None else broadcasts
        #: A client's ledger writes (`cancel`, a patched ``Control.revoke``),
        #: each waited for at most a bound, whatever the store.
        self.ledger_calls: Final = LedgerCalls() if ledger_calls is None else ledger_calls


class _Holder:
    """The one module-level binding: this process's `Runtime`."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.lock = threading.Lock()
        self.fork_handlers = False
        #: The worker whose tick lock `_before_fork` took (the parent releases it).
        self.forking: WorkerRuntime | None = None


_holder: Final = _Holder()


def runtime() -> Runtime:
    """This process's runtime (made, and the fork handlers registered, at the first call)."""
    current = _holder.runtime
    if current is None:
        with _holder.lock:
            if _holder.runtime is None:
                _register_fork_handlers()
                _holder.runtime = Runtime()
            current = _holder.runtime
    return current


def install_worker(worker: WorkerRuntime) -> None:
    """Make ``worker`` this process's worker runtime (a worker is starting here)."""
    current = runtime()
    with _holder.lock:
        _holder.runtime = Runtime(
            worker.tasks, worker, current.ledgers, current.broadcasts, current.ledger_calls
        )


def remove_worker(worker: WorkerRuntime) -> bool:
    """Forget ``worker`` if it is this process's worker runtime (it stopped); True if it was."""
    current = runtime()
    with _holder.lock:
        if current.worker is not worker:
            return False
        _holder.runtime = Runtime(
            None, None, current.ledgers, current.broadcasts, current.ledger_calls
        )
    return True


def _register_fork_handlers() -> None:
    if not _holder.fork_handlers and hasattr(os, "register_at_fork"):
        _holder.fork_handlers = True
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )


def _forking_worker() -> WorkerRuntime | None:
    current = _holder.runtime
    return None if current is None else current.worker


def _before_fork() -> None:
    worker = _forking_worker()
    if worker is not None:
        worker.tick_lock.acquire()
        for lock in worker.fork_locks():
            lock.acquire()
        _holder.forking = worker


def _release_fork_locks() -> None:
    # In the parent, and in the child, where this thread holds them too.
    worker, _holder.forking = _holder.forking, None
    if worker is not None:
        for lock in reversed(worker.fork_locks()):
            lock.release()
        worker.tick_lock.release()


def _after_fork_in_parent() -> None:
    _release_fork_locks()


def _after_fork_in_child() -> None:
    # Threads do not survive a fork: the child has no poller, no worker
    # runtime, and none of the parent's locks or connections.  The objects
    # it inherits are left with their locks free (taken before the fork).
    _release_fork_locks()
    current = _holder.runtime
    _holder.lock = threading.Lock()
    if current is not None:
        _holder.runtime = Runtime(current.tasks.forked())
