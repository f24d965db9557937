"""Activation: what the integration installs in a process, and when.

No worker flag is needed, and a process that never starts a worker and
never cancels is left as it was.  In order:

Importing `cancellable.celery` (`activate`; importing `cancellable` does it
as soon as the program imports Celery, see `cancellable._integrations`)
    registers the task runner with the core (the ``@cancellable`` task
    boundary, `cancellable.celery._task`, which does nothing outside a
    Celery task) and connects one receiver, to ``worker_init``.  Nothing of
    Celery is patched.
``worker_init`` (a ``WorkController`` is being built)
    adds this integration's bootstep (`WorkerStep`) to the app's worker
    blueprint and its directed queue's (`cancellable.celery._direct.DirectStep`)
    to the consumer's, and connects the receivers a worker needs before its pool
    forks: ``worker_process_init`` (a prefork child takes part in
    deliveries), ``task_failure`` (fail fast, `cancellable.celery._failfast`)
    and ``worker_shutdown``, and has the tracer log a cancelled task as
    "revoked" (``celery.app.trace.get_log_policy``, `cancellable.celery._ending`;
    it stays, and acts only on the library's own ending), and wraps the app's
    ``celery.chord_unlock`` task so that a cancelled chord's join ends
    quietly (`cancellable.celery._chords`; it stays).
The bootstep's construction (still while the worker is built, before the pool forks)
    reads the app's settings (a bad ``cancellable_*`` value raises
    `~cancellable.celery._settings.SettingError` here, so the worker does not
    start, and the message names the setting) and makes the worker's
    `~cancellable.celery._runtime.WorkerRuntime` (the mailbox and child table
    the children will share).
The bootstep's ``start`` (the worker starts; before its consumer does)
    reads the ledger into the index, patches Celery (`install_patches`: the
    ``revoke`` control command, ``Request.revoked``,
    ``Request._announce_revoked``, ``Request.on_failure``, the
    ``cancellable_members`` command,
    ``Consumer.on_connection_error_after_connected``, ``Control.revoke``)
    and starts the poller thread.
The bootstep's ``close`` (a shutdown begins, before the pool waits for its tasks)
    with ``cancellable_shutdown_grace`` set, cancels the running
    ``@cancellable`` tasks to send them back (`cancellable.celery._shutdown`).
``worker_shutdown``, or the bootstep's ``terminate`` or ``shutdown`` (however the worker ends)
    stop the poller, drop the worker runtime and remove the worker's
    patches (``Control.revoke`` stays patched).  A warm shutdown's
    ``stop`` leaves them in place while the pool drains, so that the
    cancellations of the tasks it waits for still escalate.
`~cancellable.celery.cancel` (the client)
    at its first call, patches ``Control.revoke`` so that plain revokes
    from the same process are recorded in the ledger too.

The full list of patches, with where and when, is in :doc:`/celery`.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Final

from celery import bootsteps, signals

from .. import _decorator
from .._log import logger
from ..events import LEDGER_IN_USE, LEDGER_UNAVAILABLE, PREFORK_UNAVAILABLE, WORKER_REPLACED
from . import _celery_internals as celery_internals
from . import _chords, _client, _direct, _ending, _failfast, _ledger, _revokes, _shutdown, _task
from ._poller import Poller
from ._runtime import WorkerRuntime, install_worker, remove_worker, runtime
from ._settings import settings_for

__all__ = ["PreforkDeliveryWarning", "WorkerStep", "activate", "install_patches", "remove_patches"]


class PreforkDeliveryWarning(RuntimeWarning):
    """Running tasks in this worker's prefork children cannot be reached.

    Queued tasks are still discarded, and tasks in other pools still stop
    at their next checkpoint.

    .. versionadded:: 0.1.0
    """


class _Once:
    """Which one-time installations this process has done (set under ``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.activated = False
        self.receivers = False
        self.patches = False
        #: Whether this process said that prefork children cannot be reached.
        self.warned_prefork = False


_once: Final = _Once()


def activate() -> None:
    """Importing `cancellable.celery`: the task runner, and one ``worker_init`` receiver."""
    with _once.lock:
        if _once.activated:
            return
        _once.activated = True
        _decorator.register_task_runner(_task.claim)
        signals.worker_init.connect(_on_worker_init, weak=False)


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None:
        return
    with _once.lock:
        if not _once.receivers:
            _once.receivers = True
            signals.worker_process_init.connect(_on_worker_process_init, weak=False)
            signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
            signals.worker_shutting_down.connect(_shutdown.shutdown_requested, weak=False)
            _failfast.install()
            # Before the pool forks: the tracer runs in the children.
            celery_internals.wrap_trace_log_policy(_ending.log_policy)
    # Before the tracers are built (prefork children: when they start).
    _chords.install(app)
    # The blueprint is built right after worker_init: the step is in it.
    app.steps["worker"].add(WorkerStep)
    # The worker's own queue for cancels of the tasks it runs (`_direct`).
    app.steps["consumer"].add(_direct.DirectStep)
    if celery_internals.worker_pool_kind(sender) == "prefork":
        # Said here, before Celery builds the pool (which fails outright on
        # a platform without the signals billiard needs).
        try:
            signum = settings_for(app).wakeup_signal
        except Exception:  # noqa: BLE001 - the worker's step raises it: the worker does not start
            return
        if signum is None:
            _warn_prefork("this platform has no SIGURG to wake pool children")
        elif celery_internals.worker_pool_start_method(sender) != "fork":
            _warn_prefork("the pool does not fork its children (spawn start method)")


def install_patches() -> None:
    """Patch Celery where a running worker needs it (idempotent; see :doc:`/celery`).

    Each patch acts only while a worker runs in this process, for that
    worker's app; otherwise it calls Celery's own code unchanged.  The
    worker's patches are removed again when it stops (`remove_patches`);
    ``Control.revoke`` stays patched.
    """
    with _once.lock:
        if _once.patches:
            return
        _once.patches = True
        celery_internals.wrap_revoke_command(_revokes.revoke_command)
        celery_internals.register_inspect_command(
            _revokes.members_command, _revokes.MEMBERS_COMMAND
        )
        celery_internals.wrap_request_revoked(_revokes.request_revoked)
        celery_internals.wrap_request_announce_revoked(_revokes.announce_revoked)
        celery_internals.wrap_consumer_connection_lost(_shutdown.connection_lost)
        celery_internals.wrap_request_on_failure(_ending.on_failure)
    _client.install_revoke_recorder()


def remove_patches() -> None:
    """Put Celery's worker back as it was (the last worker here stopped)."""
    with _once.lock:
        if not _once.patches:
            return
        _once.patches = False
        celery_internals.unwrap_revoke_command()
        celery_internals.unregister_inspect_command(_revokes.MEMBERS_COMMAND)
        celery_internals.unwrap_request_methods()
        celery_internals.unwrap_consumer_connection_lost()


class WorkerStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """The integration in a worker: its runtime, its patches and its poller (see above)."""

    label = "cancellable"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        app = parent.app
        kind = celery_internals.worker_pool_kind(parent)
        # Raises SettingError for a bad setting: the worker is not built.
        self.runtime = WorkerRuntime(app, None, parent, kind, _mailbox_slots(parent, app))
        old = runtime().worker
        if old is not None:
            # An earlier worker in this process that did not stop: one worker
            # runtime per process, so say loudly that it stops being served.
            logger.warning(
                WORKER_REPLACED,
                replaced=getattr(old.worker, "hostname", None),
                by=getattr(parent, "hostname", None),
                why="one worker per process: the earlier worker's tasks are no longer cancelled",
            )
            _stop(old)
        install_worker(self.runtime)

    def start(self, parent: Any) -> None:
        """The worker starts: read the ledger, patch Celery, start the poller."""
        rt = self.runtime
        if runtime().worker is not rt:
            return  # a later worker in this process replaced this one
        try:
            ledger = runtime().ledgers.get(rt.app)
            _log_where(rt.app, ledger)
            rt.index.load(ledger)
        except _ledger.LedgerError as exc:
            logger.warning(LEDGER_UNAVAILABLE, error=str(exc), during="worker start")
        install_patches()
        rt.poller = Poller(rt)
        rt.poller.start()
        rt.active = True

    def stop(self, parent: Any) -> None:
        """Warm shutdown: keep cancelling until the pool has drained.

        Celery stops the worker's steps in reverse order, this one before
        the pool, whose ``stop`` then waits for the running tasks.  A
        cancellation still being delivered or escalated (grace, interrupt,
        terminate) must go on meanwhile, or a cancelled task runs to its
        end and the warm shutdown waits for it.  So the poller stays until
        ``worker_shutdown``, which Celery sends once the pool has stopped
        (or until ``terminate``/``shutdown``).
        """

    def close(self, parent: Any) -> None:
        """The worker begins to stop: with ``cancellable_shutdown_grace``, send tasks back.

        Celery's ``Blueprint.stop`` closes every step before it stops any,
        and the pool's ``stop`` waits for the running tasks: the running ``@cancellable`` tasks are
        cancelled here and go back to the broker
        (`cancellable.celery._shutdown`).
        """
        _shutdown.begin_shutdown(self.runtime)

    def terminate(self, parent: Any) -> None:
        """Cold shutdown (also ``WorkController.terminate()``)."""
        _stop(self.runtime)

    def shutdown(self, parent: Any) -> None:
        """Final teardown."""
        _stop(self.runtime)


def _log_where(app: Any, ledger: _ledger.Ledger) -> None:
    """One line at worker start: where this app's cancellations are kept."""
    durable = bool(getattr(ledger, "durable", False))
    where = getattr(ledger, "where", None) or type(ledger).__name__
    log = logger.info if durable or getattr(ledger, "chosen", False) else logger.warning
    log(LEDGER_IN_USE, app=app.main or "default", durable=durable, where=where)


def _stop(rt: WorkerRuntime) -> None:
    rt.active = False
    poller, rt.poller = rt.poller, None
    if poller is not None:
        poller.stop()
    if remove_worker(rt) and runtime().worker is None:
        remove_patches()


def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    rt = runtime().worker
    if rt is not None and (sender is None or rt.worker is sender):
        _stop(rt)


def _on_worker_process_init(**kwargs: Any) -> None:
    here = runtime()
    if here.worker is not None or here.tasks.mailbox is None:
        return  # not a forked child of a worker this integration runs in
    if not here.tasks.child_started():
        # The child did not inherit the main process's mailbox: the pool
        # started it with the spawn (or forkserver) start method.
        _warn_prefork("the pool does not fork its children (spawn start method)")


def _mailbox_slots(worker: Any, app: Any) -> int:
    # The most tasks one worker can hold at once: its prefetch plus one
    # running task per child.  (Unlimited prefetch is capped by the mailbox.)
    concurrency = celery_internals.worker_concurrency(worker) or os.cpu_count() or 1
    multiplier = app.conf.get("worker_prefetch_multiplier")
    multiplier = 4 if not isinstance(multiplier, int) or multiplier < 0 else multiplier
    if multiplier == 0:
        return 1 << 30
    return concurrency * multiplier + concurrency + 16


def _warn_prefork(why: str) -> None:
    with _once.lock:
        if _once.warned_prefork:
            return
        _once.warned_prefork = True
    message = (
        f"cancellable cannot reach tasks running in prefork children: {why}. Queued tasks "
        "are still discarded; use the threads or solo pool to stop running tasks."
    )
    logger.warning(PREFORK_UNAVAILABLE, why=why)
    warnings.warn(message, PreforkDeliveryWarning, stacklevel=2)
