"""``@cancellable``: one cancel scope per call of the decorated callable.

Built on `wrapt.decorator` so the wrapper keeps the wrapped callable's
signature (`inspect.signature`, and Celery's argument checking, see the
original) and binds correctly on functions, methods, classmethods and
staticmethods.  The wrapper costs a few hundred nanoseconds per *call*; it is
never on a checkpoint's path.
"""

from __future__ import annotations

import copy
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, Final, ParamSpec, Protocol, TypeVar, overload

import wrapt

from . import _async, _config
from ._config import DEFAULT, _Default
from ._scope import CancelScope, on_cancel, propagate_own_cancellation

__all__ = ["CallOptions", "TaskRunner", "cancellable", "register_task_runner", "run_in_scope"]

P = ParamSpec("P")
R = TypeVar("R")


class CallOptions:
    """The options given to ``@cancellable(...)``, validated once."""

    __slots__ = ("grace", "hook_timeout", "is_async", "on_cancel", "timeout")

    def __init__(
        self,
        timeout: float | None,
        on_cancel: Callable[[], object] | None,
        hook_timeout: float | _Default | None,
        grace: float | _Default | None = DEFAULT,
    ) -> None:
        self.timeout = _config.validate_seconds(timeout, "timeout")
        #: Seconds a cancelled call may take to stop cooperatively before an
        #: integration escalates (`DEFAULT`: the integration's setting;
        #: None: never escalate).  The core itself never escalates.
        self.grace: float | _Default | None = (
            grace if grace is DEFAULT else _config.validate_grace(grace)
        )
        if on_cancel is not None and not callable(on_cancel):
            raise TypeError(f"on_cancel must be a callable or None, got {type(on_cancel).__name__}")
        self.on_cancel = on_cancel
        if hook_timeout is not DEFAULT:
            _config.validate_seconds(hook_timeout, "hook_timeout")
        self.hook_timeout = hook_timeout
        #: Whether the decorated callable is a coroutine function (set by
        #: the decorator once it knows what it decorates).
        self.is_async = False

    def new_scope(self) -> CancelScope:
        """A fresh, not yet entered scope for one call."""
        deadline = float("inf") if self.timeout is None else time.monotonic() + self.timeout
        scope = CancelScope(deadline=deadline, hook_timeout=self.hook_timeout)
        # A decorated call that was cancelled must not return None as if it
        # had finished: the scope lets its own Cancelled propagate.
        propagate_own_cancellation(scope)
        return scope


class TaskRunner(Protocol):
    """Runs one decorated call on behalf of an integration (see `register_task_runner`)."""

    def __call__(
        self,
        wrapped: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: CallOptions,
    ) -> Any: ...


#: Claim functions registered by integrations, asked in order at each call.
#: A tuple, replaced whole under the lock, so the wrapper reads it without one.
_claims: tuple[Callable[[], TaskRunner | None], ...] = ()
_claims_lock = threading.Lock()


def register_task_runner(claim: Callable[[], TaskRunner | None]) -> None:
    """Let an integration take over decorated calls that belong to its unit of work.

    At every call of a ``@cancellable`` function the wrapper asks each
    registered ``claim()``, in registration order: the first that returns a
    runner (instead of None) runs the call, typically binding the scope to a
    task.  Registering the same function twice has no effect.  This is how
    `cancellable.celery` plugs in; the core never imports an integration.
    """
    global _claims
    with _claims_lock:
        if claim not in _claims:
            _claims = (*_claims, claim)


def run_in_scope(
    wrapped: Callable[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: CallOptions,
    scope: CancelScope | None = None,
) -> R:
    """Call ``wrapped`` inside ``scope`` (or a new one), with the call's hook."""
    if scope is None:
        scope = options.new_scope()
    if options.is_async:
        # A coroutine function run to completion (a Celery task body).
        return _async.run_async_in_scope(wrapped, args, kwargs, options, scope)  # type: ignore[arg-type]
    with scope:
        if options.on_cancel is not None:
            on_cancel(options.on_cancel)
        result = wrapped(*args, **kwargs)
    # A scope made by CallOptions never swallows its Cancelled
    # (propagate_own_cancellation), so reaching this line means the call returned, perhaps after
    # catching a Cancelled: say so.
    _async.warn_if_swallowed(scope, wrapped, delivered=False)
    return result


@overload
def cancellable(wrapped: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def cancellable(
    wrapped: None = None,
    /,
    *,
    timeout: float | None = None,
    on_cancel: Callable[[], object] | None = None,
    hook_timeout: float | _Default | None = DEFAULT,
    grace: float | _Default | None = DEFAULT,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def cancellable(
    wrapped: Callable[..., Any] | None = None,
    /,
    *,
    timeout: float | None = None,
    on_cancel: Callable[[], object] | None = None,
    hook_timeout: float | _Default | None = DEFAULT,
    grace: float | _Default | None = DEFAULT,
) -> Any:
    """Run each call of the decorated callable in its own `CancelScope`.

    Use it bare (``@cancellable``) or with options
    (``@cancellable(timeout=60)``).  Inside the call, `checkpoint` raises
    `Cancelled` once the call's scope is cancelled, cleanup hooks registered
    with `on_cancel` run, and the `Cancelled` then propagates to the caller:
    a cancelled call never returns as if it had finished.

    Under Celery (``@app.task`` directly above ``@cancellable``), the scope is
    bound to the task: revoking the task cancels it, and the task ends as
    REVOKED with the reason.  See :doc:`/celery`.

    On an ``async def``, the decorated function stays a coroutine function;
    each call's scope is bound to the asyncio task that awaits it, and
    cancelling it cancels that task at its current ``await``.  As a Celery
    task body, the coroutine runs to completion in a fresh `asyncio.run`.
    See :doc:`/async`.

    The decorator keeps the signature (`inspect.signature` is unchanged) and
    works on functions, methods, classmethods and staticmethods (put it
    *above* ``@classmethod``/``@staticmethod``, or below, both work).  Calls
    are independent, also across threads.

    Args:
        timeout: Seconds after which the call is cancelled with source
            ``"deadline"`` (None: no limit).
        on_cancel: A hook, called with no arguments, registered at the start
            of every call.
        hook_timeout: Seconds each cleanup hook of the call may run (`DEFAULT`:
            the process-wide `configure` setting; None: no limit).
        grace: Under Celery, seconds a cancelled task may take to stop at a
            checkpoint before it is interrupted, then terminated (see
            :doc:`/grace`).  `DEFAULT`: the app's
            ``cancellable_grace``; None: cooperative only.  Outside Celery
            it has no effect.

    Raises:
        TypeError: An option has the wrong type; or the decorated object is
            a generator or async generator function, or a Celery task
            (``@cancellable`` written above ``@app.task``/``@shared_task``).
        ValueError: ``timeout``, ``hook_timeout`` or ``grace`` is negative,
            NaN or infinite.

    .. versionadded:: 0.1.0
    """
    options = CallOptions(timeout, on_cancel, hook_timeout, grace)
    if wrapped is None:

        def decorate(func: Callable[..., Any]) -> Any:
            return _decorate(func, options)

        return decorate
    return _decorate(wrapped, options)


def _is_celery_task(func: object) -> bool:
    # Duck-typed, so the core never imports Celery: a task object is an
    # instance of a subclass of celery.app.task.Task; `@app.task` before the
    # app is finalized and `@shared_task` return a celery.local.Proxy.
    # type() does not go through the proxy, so nothing is evaluated
    # (evaluating it may finalize an app at import time).
    for klass in type(func).__mro__:
        module = getattr(klass, "__module__", "")
        if (klass.__name__, module) in (("Task", "celery.app.task"), ("Proxy", "celery.local")):
            return True
    return False


_WRONG_ORDER: Final = (
    "@cancellable was applied to a Celery task (it is written above @app.task or "
    "@shared_task), so Celery would run the undecorated function and nothing could "
    "cancel it. Put @cancellable directly below the task decorator:\n\n"
    "    @app.task(bind=True)          # or @shared_task(bind=True)\n"
    "    @cancellable(timeout=600)\n"
    "    def my_task(self, ...): ..."
)


def _refuse(func: object) -> None:
    """Raise TypeError for what ``@cancellable`` cannot protect (see :doc:`/async`)."""
    if _is_celery_task(func):
        raise TypeError(_WRONG_ORDER)
    target = getattr(func, "__func__", func)  # classmethod, staticmethod
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        what = "an async generator" if inspect.isasyncgenfunction(target) else "a generator"
        raise TypeError(
            f"@cancellable cannot decorate {what} function ({target!r:.80}): a call only "
            "creates the generator, so the scope would close before the first item is "
            "produced and protect nothing. Open a scope inside the generator instead "
            "(`with CancelScope(): ...` around the loop), or decorate the function that "
            "consumes it."
        )


def _decorate(func: object, options: CallOptions) -> Any:
    if not (callable(func) or isinstance(func, (classmethod, staticmethod))):
        raise TypeError(f"@cancellable can only decorate callables, got {type(func).__name__}")
    _refuse(func)
    if inspect.iscoroutinefunction(getattr(func, "__func__", func)):
        options = copy.copy(options)
        options.is_async = True

    @wrapt.decorator
    def wrapper(
        wrapped: Callable[..., Any],
        instance: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        for claim in _claims:
            runner = claim()
            if runner is not None:
                return runner(wrapped, args, kwargs, options)
        if options.is_async:
            # Awaited by the caller: the scope is bound to its asyncio task.
            return _async.call_async(wrapped, args, kwargs, options)
        return run_in_scope(wrapped, args, kwargs, options)

    decorated: Any = wrapper(func)
    # Integrations read the options of a decorated callable here (the
    # Celery worker's main process looks up a task's grace); wrapt keeps
    # `_self_` attributes on the wrapper itself.
    decorated._self_cancellable_options = options
    return decorated
