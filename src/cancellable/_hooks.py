"""Running cleanup hooks: in order, isolated from each other, within a time budget.

Hooks run on the thread that owns the scope, because cleanup usually touches
thread-bound resources (a database connection, a transaction, a temp file a
thread opened).  To bound a hook's time without moving it to another thread,
the timer thread injects `HookTimeoutError` into the hook's thread when the
budget runs out (``PyThreadState_SetAsyncExc``, the same mechanism CPython
uses for `KeyboardInterrupt`).  The exception is delivered at the next
bytecode the hook executes: a hook blocked inside one long C call (a socket
read with no timeout) is interrupted only when that call returns.

The race between "hook finished" and "budget expired" is closed with a small
lock: the timer injects only while the hook is still marked running, and the
runner marks it finished under the same lock, inside the ``try`` that catches
the injected exception, so an injection can never escape the runner.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import _timer
from ._exceptions import HookTimeoutError
from ._log import logger
from .events import CLEANUP_FAILED, CLEANUP_TIMED_OUT

if TYPE_CHECKING:
    from ._scope import HookHandle

__all__ = ["run_hooks"]

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int


class _Budget:
    __slots__ = ("fired", "lock", "running", "thread_id")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = True
        self.fired = False
        self.thread_id = threading.get_ident()

    def expire(self) -> None:
        # Runs on the timer thread.
        with self.lock:
            if not self.running:
                return
            self.fired = True
            _set_async_exc(self.thread_id, HookTimeoutError)


def _call_with_budget(hook: HookHandle, budget: float | None) -> None:
    if budget is None:
        hook.fn(*hook.args, **hook.kwargs)
        return
    state = _Budget()
    handle = _timer.schedule(time.monotonic() + budget, state.expire)
    try:
        try:
            hook.fn(*hook.args, **hook.kwargs)
        finally:
            with state.lock:
                state.running = False
            handle.cancel()
    except HookTimeoutError:
        if state.fired:
            raise HookTimeoutError(
                f"cleanup hook {hook.fn!r} ran longer than its budget of {budget}s"
            ) from None
        raise


def run_hooks(hooks: Sequence[HookHandle], budget: float | None) -> tuple[BaseException, ...]:
    """Run ``hooks`` in the given order; return the errors they raised.

    `KeyboardInterrupt` and `SystemExit` from a hook are re-raised, but only
    after every other hook has run.
    """
    errors: list[BaseException] = []
    fatal: BaseException | None = None
    for hook in hooks:
        try:
            _call_with_budget(hook, budget)
        except (KeyboardInterrupt, SystemExit) as exc:
            fatal = fatal or exc
        except HookTimeoutError as exc:
            errors.append(exc)
            logger.warning(CLEANUP_TIMED_OUT, hook=repr(hook.fn), budget_s=budget)
        except BaseException as exc:  # noqa: BLE001 - isolate hooks from each other
            errors.append(exc)
            logger.warning(CLEANUP_FAILED, hook=repr(hook.fn), error=repr(exc), exc_info=exc)
    if fatal is not None:
        raise fatal
    return tuple(errors)
