"""Waking a prefork child so it reads the mailbox: a signal, and its handler.

The main process sends the child a signal (``SIGURG`` by default) after
writing a mailbox slot for a task the child holds.  The handler does the
least a signal handler may: it asks the core to run the mailbox check at the
next checkpoint (`cancellable._scope.request_slow_path` takes no lock and
does no I/O), once, however many signals arrive before that checkpoint
(the core then also wakes any `cancellable.sleep` or `cancellable.wait` in
progress, and a task's waiting event loop, so that checkpoint happens now);
and, last, calls the interrupt check, which raises `Cancelled` right in the
handler if the task's grace is over (`cancellable.celery._interrupt`).  The
solo pool installs the same handler in the worker's own process, whose main
thread runs the tasks.

Why ``SIGURG``: its default action is to do nothing, so a child that has not
installed the handler yet (or a process that is not a pool child at all) is
never killed by it.  ``SIGUSR1`` is billiard's soft time limit, and billiard
replaces the handlers of ``SIGUSR2`` and the termination signals *after*
``worker_process_init`` in pools without an event loop.  ``SIGURG`` is
otherwise only sent for out-of-band socket data to a process that asked for
it with ``F_SETOWN``; an unexpected one costs one look at the mailbox.

Platforms without ``SIGURG`` (Windows) have no prefork pool in Celery; there
`available` is False and `wake` does nothing (the worker warns once).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from .. import _scope

__all__ = ["available", "install", "installed_here", "set_signal", "signum", "wake"]

_signum: int | None = getattr(signal, "SIGURG", None)
_callback: Callable[[], object] | None = None
#: Called last in the handler; may raise (the interrupt step).
_interrupt: Callable[[object], None] | None = None
#: Whether a mailbox check is already queued; the signal handler's one bit
#: of state (a plain bool: set in the handler, cleared by the check).
_queued = False


def available() -> bool:
    """Whether this platform has a wake-up signal."""
    return _signum is not None


def signum() -> int | None:
    """The wake-up signal number (None: none on this platform)."""
    return _signum


def set_signal(number: int) -> None:
    """Use ``number`` instead of SIGURG (call before the pool starts)."""
    global _signum
    _signum = number


def _run_callback() -> None:
    global _queued
    _queued = False
    if _callback is not None:
        _callback()


def _on_signal(number: int, frame: object) -> None:
    # Signal handler: no locks, no I/O.  Queue one check; more signals
    # before it runs add nothing.
    global _queued
    if not _queued:
        _queued = True
        # Also wakes `cancellable.sleep` and `wait` (a waker of the core).
        _scope.request_slow_path(_run_callback)
    if _interrupt is not None:
        _interrupt(frame)


def install(
    callback: Callable[[], object], interrupt: Callable[[object], None] | None = None
) -> None:
    """Install the handler in this process (a pool child, or a solo worker).

    ``callback`` checks the mailbox at the next checkpoint; ``interrupt``,
    called in the handler itself with the interrupted frame, raises
    `Cancelled` when asked to.
    """
    global _callback, _interrupt
    _callback = callback
    _interrupt = interrupt
    if _signum is not None:
        signal.signal(_signum, _on_signal)


def installed_here() -> bool:
    """Whether the handler is installed in this process."""
    return _signum is not None and signal.getsignal(_signum) is _on_signal


_checked_pid = 0


def ensure_installed() -> None:
    """Reinstall the handler if something replaced it (first task of a process).

    billiard may reset signal handlers after ``worker_process_init``, never
    later, so one check per process, on the main thread, is enough.
    """
    global _checked_pid
    pid = os.getpid()
    if (
        _signum is None
        or _callback is None
        or pid == _checked_pid
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    if signal.getsignal(_signum) is not _on_signal:
        signal.signal(_signum, _on_signal)
    _checked_pid = pid


def wake(pid: int) -> bool:
    """Signal the child ``pid``; False if it is gone or there is no signal."""
    if _signum is None:
        return False
    try:
        os.kill(pid, _signum)
    except ProcessLookupError:
        return False
    return True
