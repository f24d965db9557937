"""Waking a prefork child so it reads the mailbox: a signal, and its handler.

The main process sends the child a signal (``SIGURG`` by default) after
writing a mailbox slot for a task the child holds.  The handler does the
least a signal handler may: it asks the core to run the mailbox check at the
next checkpoint (`cancellable._scope.request_slow_path` takes no lock and
does no I/O), once, however many signals arrive before that checkpoint
(the core then also wakes any `cancellable.sleep` or `cancellable.wait` in
progress, and a task's waiting event loop, so that checkpoint happens now);
and, last, calls the interrupt check, which raises `Cancelled` right in the
handler if the task's grace is over (`cancellable.celery._interrupt`; the
child is then retired once it has reported its task).  In-process pools
(threads, solo, gevent, eventlet) install no handler: they are never
interrupted.

Why ``SIGURG``: its default action is to do nothing, so a child that has not
installed the handler yet (or a process that is not a pool child at all) is
never killed by it.  ``SIGUSR1`` is billiard's soft time limit, and billiard
replaces the handlers of ``SIGUSR2`` and the termination signals *after*
``worker_process_init`` in pools without an event loop.  ``SIGURG`` is
otherwise only sent for out-of-band socket data to a process that asked for
it with ``F_SETOWN``; an unexpected one costs one look at the mailbox.

Platforms without ``SIGURG`` (Windows) have no prefork pool in Celery; there
`Wakeup.available` is False and `Wakeup.wake` does nothing (the worker warns once).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Final

from .. import _scope

__all__ = ["DEFAULT_SIGNAL", "Wakeup"]

#: The wake-up signal unless the app names another (None: none on this platform).
DEFAULT_SIGNAL: Final[int | None] = getattr(signal, "SIGURG", None)


class Wakeup:
    """The wake-up signal of one process: sending it, and its handler here.

    The main process of a worker sends it (`wake`); a pool child, or a solo
    worker's own process, installs the handler (`install`).  Both sides use
    the same number: the child's `Wakeup` is made from its parent's after
    the fork (`cancellable.celery._runtime`).
    """

    def __init__(self, signum: int | None = DEFAULT_SIGNAL) -> None:
        #: The signal number (None: this platform has none).
        self.signum = signum
        self._callback: Callable[[], object] | None = None
        #: Called last in the handler; may raise (the interrupt step).
        self._interrupt: Callable[[object], None] | None = None
        #: Whether a mailbox check is already queued; the signal handler's
        #: one bit of state (a plain bool: set in the handler, cleared by
        #: the check).
        self._queued = False
        self._checked_pid = 0

    @property
    def available(self) -> bool:
        """Whether this process has a wake-up signal."""
        return self.signum is not None

    @property
    def check_queued(self) -> bool:
        """Whether a wake-up signal arrived here whose mailbox check has not run yet."""
        return self._queued

    def _run_callback(self) -> None:
        self._queued = False
        if self._callback is not None:
            self._callback()

    def on_signal(self, number: int, frame: object) -> None:
        """The signal handler: no locks, no I/O.

        Queues one check; more signals before it runs add nothing.
        """
        if not self._queued:
            self._queued = True
            # Also wakes `cancellable.sleep` and `wait` (a waker of the core).
            _scope.request_slow_path(self._run_callback)
        if self._interrupt is not None:
            self._interrupt(frame)

    def install(
        self, callback: Callable[[], object], interrupt: Callable[[object], None] | None = None
    ) -> None:
        """Install the handler in this process (a pool child, or a solo worker).

        ``callback`` checks the mailbox at the next checkpoint; ``interrupt``,
        called in the handler itself with the interrupted frame, raises
        `Cancelled` when asked to.
        """
        self._callback = callback
        self._interrupt = interrupt
        if self.signum is not None:
            signal.signal(self.signum, self.on_signal)

    def installed_here(self) -> bool:
        """Whether the handler is installed in this process."""
        return self.signum is not None and signal.getsignal(self.signum) == self.on_signal

    def ensure_installed(self) -> None:
        """Reinstall the handler if something replaced it (first task of a process).

        billiard may reset signal handlers after ``worker_process_init``, never
        later, so one check per process, on the main thread, is enough.
        """
        pid = os.getpid()
        if (
            self.signum is None
            or self._callback is None
            or pid == self._checked_pid
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        if signal.getsignal(self.signum) != self.on_signal:
            signal.signal(self.signum, self.on_signal)
        self._checked_pid = pid

    def wake(self, pid: int) -> bool:
        """Signal the process ``pid``; False if it is gone or there is no signal."""
        if self.signum is None:
            return False
        try:
            os.kill(pid, self.signum)
        except ProcessLookupError:
            return False
        return True
