"""Every reach into Celery, kombu, billiard and redis-py internals, in one place.

The integration relies on things these libraries do not promise: private
attributes, module-level worker state, a control command's handler replaced
in a registry, a class's methods wrapped.  Each such reach is one small
function or constant here, named for what it gets, with a docstring that
says what it relies on and for which versions that was checked.  Nothing
here adds behaviour: it names and isolates the reach.  Every entry has a
contract test in ``tests/test_celery_contract.py`` that runs against the
installed Celery and fails when Celery changes the thing we rely on; the
nox sessions run those tests on every Celery minor the package claims.

Checked against the sources of Celery 5.3.0, 5.3.6, 5.4.0, 5.5.0, 5.6.0,
5.6.3 and 5.7.0 (billiard 4.1 to 4.3, kombu 5.3 to 5.7, redis-py 4.5 to 8)
unless an entry says otherwise.

What is *public* (documented for users) needs no entry: signals
(``worker_init``, ``worker_process_init``, ``worker_shutdown``,
``task_failure``, ``task_revoked``), bootsteps (``app.steps["worker"]``),
``app.control.broadcast``/``inspect``, ``app.pool.acquire``,
``Connection.ensure_connection``, ``app.backend.store_result`` and
``get_task_meta``, ``celery.exceptions.Ignore``.  Two documented things are
here all the same because we use them in an undocumented way: wrapping
``Control.revoke`` (we rely on every revoke path ending in it) and
registering an inspect command on ``Panel``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal as signal_module
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar

from billiard.common import TERMSIGS_FULL as _BILLIARD_TERMSIGS_FULL
from celery._state import get_current_task
from celery.utils.functional import maybe_list as _maybe_list
from celery.worker import state as _worker_state
from kombu.messaging import Producer as _Producer

__all__ = [
    "BILLIARD_TERMSIGS",
    "ORIGINAL",
    "active_request_ids",
    "add_revoked_id",
    "announce_revoked",
    "bounded_redis_client",
    "chord_unlock_checking_ready",
    "close_thread_connections",
    "consumer_of",
    "current_task",
    "database_backend_engine",
    "discard_scheduled",
    "django_result_database",
    "drop_acknowledgement",
    "einfo_exception",
    "extra_revoked_fields",
    "filesystem_backend_path",
    "is_fallback_app",
    "is_revoked_id",
    "log_task_ended",
    "mark_process_terminated",
    "original_of",
    "ping_redis_once",
    "pool_maintainer",
    "pool_process",
    "process_index",
    "publish_control_once",
    "redelivers_unacked",
    "redis_backend_client",
    "redis_broker_client",
    "redis_command_once",
    "redis_ledger_client",
    "redis_server_of",
    "register_inspect_command",
    "request_already_revoked",
    "request_context",
    "request_embed",
    "request_worker_pid",
    "retire_child_when",
    "revoked_log_policy",
    "scheduled_requests",
    "send_task_event",
    "started_hostnames",
    "task_ids",
    "unregister_inspect_command",
    "unwrap_consumer_connection_lost",
    "unwrap_request_methods",
    "unwrap_revoke_command",
    "worker_concurrency",
    "worker_hub",
    "worker_pool_kind",
    "worker_pool_start_method",
    "worker_requests",
    "wrap_chord_unlock",
    "wrap_consumer_connection_lost",
    "wrap_control_revoke",
    "wrap_request_announce_revoked",
    "wrap_request_on_failure",
    "wrap_request_revoked",
    "wrap_revoke_command",
    "wrap_trace_log_policy",
]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The attribute under which a wrapper keeps what it wraps (idempotence).
ORIGINAL: Final = "_cancellable_original"


def original_of(function: _F) -> _F:
    """What ``function`` wraps if it is one of our wrappers, else ``function`` itself."""
    original: _F | None = getattr(function, ORIGINAL, None)
    return function if original is None else original


def _wrapper(original: Callable[..., Any], wrapper: _F) -> _F:
    setattr(wrapper, ORIGINAL, original)
    wrapper.__doc__ = original.__doc__
    return wrapper


# --------------------------------------------------------------------------
# celery.worker.state: the worker's module-level bookkeeping.


def worker_requests() -> Mapping[str, Any]:
    """The requests this worker holds, by task id: reserved and running.

    ``celery.worker.state.requests``: a module-level dict that
    ``task_reserved`` fills and ``task_ready`` empties (the consumer's main
    thread writes it; copy before iterating from another thread).  Values
    are ``celery.worker.request.Request`` objects.  Undocumented; same in
    5.3 to 5.7.
    """
    requests: Mapping[str, Any] = _worker_state.requests
    return requests


def active_request_ids() -> set[str]:
    """Ids of the requests this worker has handed to its pool (started).

    ``celery.worker.state.active_requests``: a module-level set of
    ``Request`` objects, added by ``task_accepted``.  Undocumented; same in
    5.3 to 5.7.
    """
    return {request.id for request in list(_worker_state.active_requests)}


def is_revoked_id(task_id: str) -> bool:
    """Is ``task_id`` in this worker's revoked set?

    ``celery.worker.state.revoked``: a module-level ``LimitedSet`` (bounded
    by ``CELERY_WORKER_REVOKES_MAX``, default 50,000, and expiring) that
    the revoke command fills and ``Request.revoked()`` reads.
    Undocumented; same in 5.3 to 5.7.
    """
    return task_id in _worker_state.revoked


def add_revoked_id(task_id: str) -> None:
    """Put ``task_id`` in this worker's revoked set (see `is_revoked_id`).

    ``Request.revoked()`` then discards the request (stores REVOKED,
    acknowledges, sends ``task_revoked``).
    """
    _worker_state.revoked.add(task_id)


# --------------------------------------------------------------------------
# The consumer's timer: tasks held for their ETA or countdown.


def consumer_of(state: Any) -> Any | None:
    """The worker's ``Consumer`` from a remote-control command's ``state``.

    ``state.consumer``: the pidbox node's state is an ``AttributeDict`` with
    ``app``, ``hostname`` and ``consumer`` (``celery.worker.pidbox``).
    Undocumented; same in 5.3 to 5.7.
    """
    return getattr(state, "consumer", None)


def scheduled_requests(consumer: Any) -> list[tuple[Any, Any]]:
    """``(timer entry, Request)`` for each task ``consumer`` holds for its ETA or countdown.

    The strategy (``celery.worker.strategy.default``) does not reserve a
    request that has an ETA: it puts it in ``consumer.timer`` with
    ``call_at(eta, apply_eta_task, (request,))`` (``_limit_post_eta``,
    ``(request, bucket, 1)``, when the task is rate limited), after
    ``consumer.qos.increment_eventually()``, and checks Celery's revoked set
    only when the entry fires.  ``timer.schedule.queue`` lists the entries
    (kombu's ``Timer``: ``scheduled(eta, priority, entry)`` tuples; Celery's
    threaded ``timer2.Timer`` keeps a kombu ``Timer`` as ``schedule``); it is
    what Celery's own ``inspect scheduled`` reads.  Entries already
    cancelled are left out.  Same in 5.3 to 5.7.
    """
    timer = getattr(consumer, "timer", None)
    queue = getattr(getattr(timer, "schedule", None), "queue", None)
    if not isinstance(queue, list):
        return []
    request_class = _request_class()
    found: list[tuple[Any, Any]] = []
    for waiting in queue:
        entry = getattr(waiting, "entry", None)
        args = getattr(entry, "args", None)
        if (
            isinstance(args, (list, tuple))
            and args
            and isinstance(args[0], request_class)
            and not getattr(entry, "canceled", False)
        ):
            found.append((entry, args[0]))
    return found


def discard_scheduled(consumer: Any, entry: Any, request: Any) -> bool:
    """End a request held for its ETA now, as Celery would at its ETA; False if not revoked.

    Asks ``request.revoked()``, which discards a revoked request the way
    Celery does when the ETA comes (stores REVOKED, acknowledges the
    message, sends ``task_revoked``); then cancels its timer entry
    (``timer.cancel(entry)``, which only flags the entry, safe from any
    thread) so it never fires, and gives back the prefetch slot the strategy
    took (``consumer.qos.decrement_eventually()``, what ``apply_eta_task``
    and ``_limit_post_eta`` do; the QoS object takes its own lock).  Same in
    5.3 to 5.7.
    """
    if not request.revoked():
        return False
    consumer.timer.cancel(entry)
    consumer.qos.decrement_eventually()
    return True


# --------------------------------------------------------------------------
# celery.worker.request.Request: the worker's view of one task message.


def _request_class() -> Any:
    from celery.worker.request import Request

    return Request


def request_worker_pid(request: Any) -> int | None:
    """The pid of the pool child running ``request`` (None: not started, or no child).

    ``Request.worker_pid``: a class attribute ``None``, set by
    ``on_accepted(pid, ...)`` when the pool reports the job accepted.  For
    the prefork pool it is the child's pid; the threads and solo pools
    report this process's pid.  Undocumented; same in 5.3 to 5.7.
    """
    pid = getattr(request, "worker_pid", None)
    return pid if isinstance(pid, int) and pid else None


def request_embed(request: Any) -> tuple[Any, Any, Any] | None:
    """``(callbacks, chain, chord)`` a worker ``Request`` carries; None for anything else.

    ``Request._payload``: a private property, the decoded body of a
    protocol-2 task message, ``(args, kwargs, embed)``, where ``embed`` is a
    dict with ``callbacks``, ``errbacks``, ``chain`` (the rest of a chain,
    last task first) and ``chord`` (signature dicts).  A task ``Context``
    (in the task's own process) has no ``_payload``: read its ``callbacks``,
    ``chain`` and ``chord`` attributes instead.  Same in 5.3 to 5.7.
    """
    if getattr(type(request), "_payload", None) is None:
        return None
    try:
        _args, _kwargs, embed = request._payload
    except (TypeError, ValueError):
        embed = None
    embed = embed if isinstance(embed, dict) else {}
    return embed.get("callbacks"), embed.get("chain"), embed.get("chord")


def request_context(request: Any) -> Any:
    """The task ``Context`` Celery hands the result backend for ``request``.

    ``Request._context``: a private cached property (one object per
    request).  ``backend.mark_as_revoked(..., request=context)`` reports to
    the task's chord only when ``context.chord`` is set, so clearing it
    around ``_announce_revoked`` keeps a discarded member out of its
    chord's count.  Same in 5.3 to 5.7.
    """
    return request._context


def request_already_revoked(request: Any) -> bool:
    """Has Celery already announced ``request`` as revoked?

    ``Request._already_revoked``: private; a class attribute ``False`` that
    ``_announce_revoked`` sets, and that makes ``revoked()`` return True and
    the pool's later report of a terminated job a no-op.  Same in 5.3 to 5.7.
    """
    return bool(getattr(request, "_already_revoked", False))


def announce_revoked(
    request: Any, reason: str, terminated: bool, signum: int | None, expired: bool
) -> None:
    """Have Celery end ``request`` as revoked, as its own discard or terminate does.

    ``Request._announce_revoked(reason, terminated, signum, expired)``:
    private.  It calls ``task_ready``, sends the ``task-revoked`` event,
    stores REVOKED with ``reason`` (``backend.mark_as_revoked``, which also
    reports to the task's chord), acknowledges the message, sets
    ``_already_revoked`` and sends the ``task_revoked`` signal.  Same
    signature and effects in 5.3 to 5.7.
    """
    request._announce_revoked(reason, terminated, signum, expired)


def wrap_request_revoked(make: Callable[[Callable[[Any], bool]], Callable[[Any], bool]]) -> bool:
    """Replace ``Request.revoked`` with ``make(original)``; False if already wrapped.

    Celery calls ``request.revoked()`` in ``Request.execute_using_pool``
    (also in the per-task subclass ``create_request_cls`` builds, which
    inherits the method), ``Request.execute`` and, on receipt, in the
    default strategy when the request expires or its id is in the revoked
    set.  A True result means "discarded": the original has announced it
    (REVOKED stored, acknowledged) when it returns True for a revoked id.
    Patching the base class reaches every request class Celery builds
    unless a task sets its own ``Request`` class that overrides
    ``revoked``.  Same in 5.3 to 5.7.
    """
    request_cls = _request_class()
    original = request_cls.revoked
    if getattr(original, ORIGINAL, None) is not None:
        return False
    request_cls.revoked = _wrapper(original, make(original))
    return True


def wrap_request_announce_revoked(make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace ``Request._announce_revoked`` with ``make(original)``; False if already wrapped.

    Every way Celery ends a request as revoked goes through it: the
    discard in ``revoked()`` (``reason="revoked"`` or ``"expired"``) and
    ``terminate()`` / the pool's Terminated report (``"terminated"``,
    ``terminated=True``).  Signature ``(self, reason, terminated, signum,
    expired)``; see `announce_revoked`.  Same in 5.3 to 5.7.
    """
    request_cls = _request_class()
    original = request_cls._announce_revoked
    if getattr(original, ORIGINAL, None) is not None:
        return False
    request_cls._announce_revoked = _wrapper(original, make(original))
    return True


def wrap_request_on_failure(make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace ``Request.on_failure`` with ``make(original)``; False if already wrapped.

    The worker's main process (or the process of an in-process pool) calls
    ``request.on_failure(exc_info, ...)`` when the tracer reports an
    exception state: the per-task ``Request`` subclass that
    ``create_request_cls`` builds reaches it from its ``on_success`` (for a
    ``(1, ExceptionInfo, runtime)`` result, which ``Ignore`` gives), and the
    pool's error callback calls it directly; the subclass does not override
    it.  For ``Ignore`` it only acknowledges the message: no event.
    Signature ``(self, exc_info, send_failed_event=True, return_ok=False)``;
    same in 5.3 to 5.7.
    """
    request_cls = _request_class()
    original = request_cls.on_failure
    if getattr(original, ORIGINAL, None) is not None:
        return False
    request_cls.on_failure = _wrapper(original, make(original))
    return True


def einfo_exception(exc_info: Any) -> BaseException | None:
    """The exception a pool reported in ``exc_info`` (billiard's ``ExceptionInfo``).

    ``exc_info.exception`` is billiard's ``ExceptionWithTraceback`` around
    the task's exception (``.exc``) when it crossed the pool's pipe, or the
    exception itself; what ``Request.on_failure`` unwraps.  billiard 4.1 to
    4.3.
    """
    from billiard.einfo import ExceptionWithTraceback

    exc = getattr(exc_info, "exception", None)
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    return exc if isinstance(exc, BaseException) else None


def send_task_event(
    request: Any, event_type: str, task_id: str | None = None, **fields: Any
) -> bool:
    """Send a task event for ``task_id`` (default: the request's own) as the worker does.

    ``Request.send_event`` sends only when the worker sends task events
    (``-E`` / ``worker_send_task_events``, or ``enable_events`` at run
    time: ``request._eventer.enabled``) and the task's ``send_events`` is
    true, through the worker's own ``EventDispatcher`` (``_eventer``,
    private), always with ``uuid=request.id``.  For another task id (a
    workflow member this request's ending stored REVOKED) we call the same
    dispatcher under the same conditions.  Returns whether an event was
    sent.  Same in 5.3 to 5.7.
    """
    eventer = getattr(request, "_eventer", None)
    if not (eventer and eventer.enabled and request.task.send_events):
        return False
    if task_id is None or task_id == request.id:
        request.send_event(event_type, **fields)
    else:
        eventer.send(event_type, uuid=task_id, **fields)
    return True


@contextlib.contextmanager
def extra_revoked_fields(request: Any, fields: Mapping[str, Any]) -> Iterator[None]:
    """Add ``fields`` to the ``task-revoked`` event Celery sends for ``request`` meanwhile.

    ``Request._announce_revoked`` sends its event with
    ``self.send_event('task-revoked', terminated=, signum=, expired=)``;
    ``Request`` has ``__dict__`` among its ``__slots__``, so an instance
    attribute ``send_event`` shadows the method for this one request until
    we remove it.  Celery's own fields win over ours.  Same in 5.3 to 5.7.
    """
    own = type(request).send_event

    def send_event(event_type: str, **given: Any) -> Any:
        if event_type == "task-revoked":
            given = {**fields, **given}
        return own(request, event_type, **given)

    request.send_event = send_event
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del request.send_event


# --------------------------------------------------------------------------
# celery.app.trace: the tracer's log line for a task that raised Ignore.


def wrap_trace_log_policy(make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace ``celery.app.trace.get_log_policy`` with ``make(original)``; False if so.

    The tracer logs a task's exceptional ending (``TraceInfo._log_error``)
    with the policy ``get_log_policy(task, einfo, exc)`` returns, looked up
    in the module's globals at each call; for ``Ignore`` it is
    ``log_policy_ignore`` (INFO, "Task name[id] ignored").  A policy is a
    ``log_policy_t(format, description, severity, traceback, mail)``
    namedtuple.  Undocumented; same in 5.3 to 5.7.
    """
    from celery.app import trace

    original = trace.get_log_policy
    if getattr(original, ORIGINAL, None) is not None:
        return False
    trace.get_log_policy = _wrapper(original, make(original))
    return True


def revoked_log_policy(description: str) -> Any:
    """The tracer's policy for an ``Ignore`` (INFO, no traceback) with another description.

    ``log_policy_t(LOG_IGNORED, description, logging.INFO, 0, 0)``: the line
    reads "Task name[id] <description>".  Same in 5.3 to 5.7.
    """
    from celery.app import trace

    return trace.log_policy_t(trace.LOG_IGNORED, description, logging.INFO, 0, 0)


def log_task_ended(task_name: str | None, task_id: str, description: str) -> None:
    """Log "Task name[id] <description>" at INFO, as the tracer logs a task's ending.

    The ``celery.app.trace`` logger and its ``LOG_IGNORED`` format
    (``"Task %(name)s[%(id)s] %(description)s"``), with the context also
    under ``extra={"data": ...}`` as the tracer passes it.  For endings the
    worker's main process decides (a discard, a terminate), where no
    tracer runs.  Same in 5.3 to 5.7.
    """
    from celery.app import trace

    context = {"id": task_id, "name": task_name, "description": description}
    trace.logger.info(trace.LOG_IGNORED.strip(), context, extra={"data": context})


# --------------------------------------------------------------------------
# celery.chord_unlock: the chord join of result backends without native chords.

#: The builtin task that joins a chord by polling its header.
CHORD_UNLOCK: Final = "celery.chord_unlock"


def wrap_chord_unlock(app: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace the ``run`` of ``app``'s ``celery.chord_unlock`` with ``make(original)``.

    A result backend without native chord support (Celery's
    ``DatabaseBackend``, ``db+...`` URLs; ``BaseBackend.apply_chord`` is
    ``fallback_chord_unlock``) has a chord's body sent by the builtin task
    ``celery.chord_unlock`` (``celery.app.builtins.add_unlock_chord_task``):
    sent with the chord (``countdown=1``), it polls the header with
    ``self.retry`` every ``result_chord_retry_interval`` until every header
    result is ready, then joins them with ``propagate=True`` and sends the
    body; a header result that failed or is REVOKED makes the join raise,
    and the task logs "Chord ... raised" at ERROR and stores FAILURE with a
    ``ChordError`` for the body (``backend.chord_error_from_stack``).

    The task is made per app (``shared=False``) and bound (``bind=True``):
    its class (one per task) has the function ``unlock_chord(self,
    group_id, callback, interval=None, max_retries=None, result=None,
    Result=..., GroupResult=..., result_from_tuple=..., **kwargs)`` as
    ``run``; its message's arguments are ``(group_id, callback)`` and the
    keyword ``result`` (the header's result tuples).  The tracer takes
    ``task.run`` when it builds the task's tracer (``build_tracer``: prefork
    children in their initializer, the other pools when the consumer
    starts), so this must be called before (``worker_init``).  Finalizes
    the app (``app.tasks``).  False if already wrapped, or the app has no
    such task.  Undocumented; same in 5.3 to 5.7.
    """
    try:
        task = app.tasks.get(CHORD_UNLOCK)
    except RuntimeError:  # an app that must not finalize yet (autofinalize=False)
        return False
    if task is None:
        return False
    task_cls = type(task)
    original = task_cls.run
    if getattr(original, ORIGINAL, None) is not None:
        return False
    task_cls.run = _wrapper(original, make(original))
    return True


def chord_unlock_checking_ready(
    app: Any, kwargs: Mapping[str, Any], after_ready: Callable[[bool], None]
) -> dict[str, Any]:
    """``celery.chord_unlock``'s keyword arguments, calling ``after_ready(ready)`` each poll.

    ``unlock_chord`` builds the header as ``GroupResult(group_id, [results],
    app=app)`` from its keyword argument ``GroupResult`` (default
    ``app.GroupResult``) and asks ``deps.ready()`` once per run, inside a
    ``try`` that turns an ``Exception`` into a retry, before it joins
    (see `wrap_chord_unlock`).  We pass a factory whose result calls
    ``after_ready`` with what ``ready()`` returned, right after it; an
    exception that is not an ``Exception`` (a ``BaseException``) raised by
    ``after_ready`` leaves ``unlock_chord`` without a retry, a join or a
    ``ChordError``.  Same in 5.3 to 5.7.
    """
    base = kwargs.get("GroupResult") or app.GroupResult

    def group_result(*args: Any, **options: Any) -> Any:
        deps = base(*args, **options)
        ready = deps.ready

        def checked() -> Any:
            value = ready()
            after_ready(bool(value))
            return value

        # A GroupResult has a __dict__: the attribute shadows the method.
        deps.ready = checked
        return deps

    return {**kwargs, "GroupResult": group_result}


# --------------------------------------------------------------------------
# Remote control: the worker's command registry and the client's revoke.

#: A remote-control handler: ``handler(state, **arguments)``.
ControlHandler = Callable[..., Any]


def wrap_revoke_command(make: Callable[[ControlHandler], ControlHandler]) -> bool:
    """Replace the worker's ``revoke`` command with ``make(original)``; False if already so.

    ``celery.worker.control.Panel.data``: the class-level dict the worker's
    pidbox dispatches remote-control commands from, by name.  The handler
    is called as ``handler(state, task_id, terminate=False, signal=None,
    **kwargs)``, where ``state`` has ``.app`` and ``.consumer`` and
    ``kwargs`` are the broadcast's other ``arguments``, passed through
    unchanged (so ``cancel()`` can send ``cancellable=...``).  The handler's
    return value is the reply.  Undocumented.  Celery 5.6.3 and later's
    handler also stores REVOKED in the backend for every id (5.3 to 5.6.2:
    only the revoked set and, with ``terminate``, the kill).
    """
    from celery.worker.control import Panel

    original = Panel.data.get("revoke")
    if original is None or getattr(original, ORIGINAL, None) is not None:
        return False
    Panel.data["revoke"] = _wrapper(original, make(original))
    return True


def register_inspect_command(handler: ControlHandler, name: str) -> bool:
    """Register a read-only remote-control command; False if ``name`` is taken.

    ``Panel.register(fun, name=..., type="inspect")``: what the documented
    ``@inspect_command(name=...)`` decorator does ("Writing your own remote
    control commands"); callers reach it with
    ``app.control.broadcast(name, reply=True, arguments=...)``.  Same in 5.3
    to 5.7.
    """
    from celery.worker.control import Panel

    if name in Panel.data:
        return False
    Panel.register(handler, name=name, type="inspect")
    return True


def unwrap_revoke_command() -> bool:
    """Put Celery's own ``revoke`` command back in ``Panel.data``; False if not wrapped."""
    from celery.worker.control import Panel

    original = getattr(Panel.data.get("revoke"), ORIGINAL, None)
    if original is None:
        return False
    Panel.data["revoke"] = original
    return True


def unregister_inspect_command(name: str) -> bool:
    """Remove a command `register_inspect_command` added; False if it is not there.

    ``Panel.data`` (the handler) and ``Panel.meta`` (its description, which
    ``celery inspect --help`` and Celery's own tests read) are class-level
    dicts.  Same in 5.3 to 5.7.
    """
    from celery.worker.control import Panel

    Panel.meta.pop(name, None)
    return Panel.data.pop(name, None) is not None


def unwrap_request_methods() -> bool:
    """Put ``Request.revoked``, ``_announce_revoked``, ``on_failure`` back; False if not wrapped."""
    request_cls = _request_class()
    unwrapped = False
    for attribute in ("revoked", "_announce_revoked", "on_failure"):
        original = getattr(getattr(request_cls, attribute), ORIGINAL, None)
        if original is not None:
            setattr(request_cls, attribute, original)
            unwrapped = True
    return unwrapped


def wrap_control_revoke(make: Callable[[ControlHandler], ControlHandler]) -> bool:
    """Replace ``celery.app.control.Control.revoke`` with ``make(original)``; False if so.

    ``Control.revoke(self, task_id, destination=None, terminate=False,
    signal="SIGTERM", **kwargs)`` is public, but wrapping it relies on the
    undocumented fact that ``AsyncResult.revoke()``, ``GroupResult.revoke()``
    and ``app.control.revoke()`` all end in it (the CLI's ``celery control
    revoke`` and Flower broadcast ``revoke`` themselves and do not).  Same
    in 5.3 to 5.7.
    """
    from celery.app.control import Control

    original = Control.revoke
    if getattr(original, ORIGINAL, None) is not None:
        return False
    Control.revoke = _wrapper(original, make(original))
    return True


def task_ids(value: Any) -> list[str]:
    """The task ids a revoke names: one id or a list of them, as strings.

    ``celery.utils.functional.maybe_list``, the helper Celery's revoke
    command and ``Control.revoke`` use on their ``task_id`` argument.
    Undocumented; same in 5.3 to 5.7.
    """
    return [str(task_id) for task_id in (_maybe_list(value) or []) if task_id]


# --------------------------------------------------------------------------
# The task side (in the process that runs the task).


def current_task() -> Any | None:
    """The task whose body runs in this thread, or None.

    ``celery._state.get_current_task()``: the top of Celery's task stack,
    which ``Task.__call__`` (and so ``celery.app.trace``) pushes around the
    body, with ``task.request`` the task's ``Context`` (``id``,
    ``called_directly``, ``is_eager``, ``group``, ``root_id``).  The public
    ``celery.current_task`` is a proxy to the same call, one lookup
    slower.  Private module; same in 5.3 to 5.7.
    """
    return get_current_task()


# --------------------------------------------------------------------------
# The worker object (the sender of worker_init) and its pool.


def worker_pool_kind(worker: Any) -> str:
    """``"prefork"``, ``"threads"``, ``"solo"``, ``"gevent"``, ``"eventlet"`` or ``""``.

    ``WorkController.pool_cls``: by ``worker_init`` it is the pool class
    (``celery.concurrency.<kind>.TaskPool``), earlier a name; we read the
    kind from its module.  Undocumented; same in 5.3 to 5.7.
    """
    pool = getattr(worker, "pool_cls", None)
    name = str(pool if isinstance(pool, str) else getattr(pool, "__module__", ""))
    for kind in ("prefork", "threads", "solo", "gevent", "eventlet"):
        if kind in name or (kind == "threads" and "thread" in name):
            return kind
    return ""


def worker_concurrency(worker: Any) -> int | None:
    """How many tasks the worker's pool runs at once (None: not known yet).

    ``WorkController.concurrency``: an int by ``worker_init`` (the
    ``--concurrency`` option, ``worker_concurrency``, or the CPU count).
    Undocumented attribute; same in 5.3 to 5.7.
    """
    concurrency = getattr(worker, "concurrency", None)
    return concurrency if isinstance(concurrency, int) and concurrency > 0 else None


def worker_pool_start_method(worker: Any) -> str:
    """How the prefork pool starts its children: ``"fork"`` or ``"spawn"``.

    ``WorkController.pool_start_method`` (the ``worker_pool_start_method``
    setting) exists from Celery 5.7 on; before, children are always forked
    and this returns ``"fork"``.
    """
    method = getattr(worker, "pool_start_method", None)
    return method if isinstance(method, str) and method else "fork"


def worker_hub(worker: Any) -> Any | None:
    """The worker's kombu event loop (``call_soon``, ``call_later``), or None.

    ``WorkController.hub``: a ``kombu.asynchronous.Hub`` for pools that use
    the event loop (prefork on Redis and RabbitMQ), else None.  Its
    ``call_soon(callback, *args)`` runs the callback on the loop's thread,
    unguarded (an exception stops the loop).  Undocumented; same in 5.3 to 5.7.
    """
    return getattr(worker, "hub", None)


def pool_process(task_pool: Any, pid: int) -> Any | None:
    """The billiard process object of the prefork child ``pid``, or None.

    ``task_pool`` is the worker's ``WorkController.pool`` (Celery's prefork
    ``TaskPool``).  ``task_pool._pool._process_by_pid(pid)``: private on
    both sides (``TaskPool._pool`` is billiard's ``Pool``, Celery's
    ``AsynPool`` in a worker, once the pool has started), returning
    ``(process, index)`` or ``(None, None)``.  billiard 4.1 to 4.3.
    """
    finder = getattr(getattr(task_pool, "_pool", None), "_process_by_pid", None)
    if finder is None:
        return None
    process, _index = finder(pid)
    return process


def mark_process_terminated(process: Any) -> None:
    """Mark a billiard child as terminated on purpose, before it is killed.

    What billiard's own ``Pool.terminate_job`` sets after its kill:
    ``_controlled_termination`` (no "exited with" error log) and
    ``_job_terminated`` (its job ends with ``Terminated``, which Celery
    turns into REVOKED and acknowledged, instead of ``WorkerLostError``).
    Private; billiard 4.1 to 4.3.
    """
    process._controlled_termination = True
    process._job_terminated = True


def pool_maintainer(task_pool: Any) -> Callable[[], None] | None:
    """billiard's ``Pool.maintain_pool`` of a prefork ``TaskPool`` (replaces dead children).

    Public in billiard but reached through Celery's private
    ``TaskPool._pool``; the pool calls it itself on a timer (every 5 s in
    Celery's event loop).  billiard 4.1 to 4.3.
    """
    pool = getattr(task_pool, "_pool", None)
    maintain: Callable[[], None] | None = getattr(pool, "maintain_pool", None)
    return maintain


def process_index() -> int | None:
    """This prefork child's index in its pool (0 to concurrency-1), or None.

    ``billiard.process.current_process().index``, set by billiard's pool
    on each worker process it creates; a replacement child gets the index
    of the one it replaces.  Undocumented; billiard 4.1 to 4.3.
    """
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) else None


def retire_child_when(should_retire: Callable[[], bool]) -> bool:
    """In a prefork child: leave the pool, the way ``max_tasks_per_child`` does, when asked.

    Called at ``worker_process_init``.  From then on, each time the child is
    about to wait for its next job it calls ``should_retire()`` first, and
    if that says so it leaves billiard's work loop with exit code
    ``EX_RECYCLE`` instead of taking another job: the job it ran last has
    been reported (its result is on the pool's result queue, so acknowledged
    and stored as usual), billiard's own exit path waits until the main
    process has read it, and the pool replaces the child without an error
    (the path of ``max_tasks_per_child``, whose loop returns ``EX_RECYCLE``
    after its last job).  ``should_retire`` must take no lock and do no I/O:
    it runs in a process that may hold a lock for ever.

    Relies on billiard's ``Worker`` (the pool child's process target,
    ``current_process()._target``, private): ``Worker.__call__`` sets
    ``self.wait_for_job`` (``_make_child_methods``) before ``after_fork``
    runs the pool's initializer (Celery's ``process_initializer``, which
    sends ``worker_process_init``), and ``workloop`` reads
    ``self.wait_for_job`` after that, calling it before every job.  A
    ``SystemExit`` raised through the patched ``sys.exit`` of the child
    records the exit code that ``Worker._do_exit`` uses.  billiard 4.1 to
    4.3.  False if this process is not such a child.
    """
    import sys

    from billiard.pool import EX_RECYCLE
    from billiard.process import current_process

    worker: Any = getattr(current_process(), "_target", None)
    wait = getattr(worker, "wait_for_job", None)
    if wait is None or not callable(wait):
        return False

    def wait_for_job(*args: Any, **kwargs: Any) -> Any:
        if should_retire():
            sys.exit(EX_RECYCLE)
        return wait(*args, **kwargs)

    worker.wait_for_job = wait_for_job
    return True


#: Signal numbers billiard installs or resets handlers for in pool children
#: (``billiard.common.TERMSIGS_FULL``, names; private).  A wake-up signal
#: must be none of them.  billiard 4.1 to 4.3.
BILLIARD_TERMSIGS: Final = frozenset(
    number
    for number in (getattr(signal_module, name, None) for name in _BILLIARD_TERMSIGS_FULL)
    if isinstance(number, int)
)


# --------------------------------------------------------------------------
# Result backends, the broker connection, redis-py.


def redis_backend_client(backend: Any) -> Any | None:
    """The redis-py client of a Redis (or Sentinel) result backend, or None.

    ``RedisBackend.client``: a cached property (one ``redis.Redis`` per
    backend, on the backend's connection pool).  Undocumented; same in 5.3
    to 5.7.
    """
    if type(backend).__name__ not in ("RedisBackend", "SentinelBackend"):
        return None
    return getattr(backend, "client", None)


def filesystem_backend_path(backend: Any) -> str | None:
    """The directory of a filesystem result backend (``file://...``), or None.

    ``FilesystemBackend.path``: bytes (the URL's path, encoded).
    Undocumented; same in 5.3 to 5.7.
    """
    if type(backend).__name__ != "FilesystemBackend":
        return None
    path = backend.path
    return path.decode() if isinstance(path, bytes) else str(path)


def database_backend_engine(backend: Any) -> tuple[str, dict[str, Any], Any] | None:
    """How a database result backend (``db+...``) makes its engine, or None for others.

    ``(url, engine_options, engine_callback)``: ``DatabaseBackend.url`` (the
    URL without ``db+``), ``DatabaseBackend.engine_options`` (the app's
    ``database_engine_options`` merged with the backend's own) and, on
    Celery 5.7, ``SessionManager.engine_callback`` (``database_engine_callback``;
    None before).  Undocumented attributes; ``url`` and ``engine_options``
    are the same in 5.3 to 5.7.
    """
    cls = type(backend)
    if cls.__name__ != "DatabaseBackend" or not cls.__module__.startswith("celery."):
        return None
    url = getattr(backend, "url", None)
    if not isinstance(url, str):
        return None
    options = dict(getattr(backend, "engine_options", None) or {})
    callback = getattr(getattr(backend, "session_manager", None), "engine_callback", None)
    return url, options, callback


def django_result_database(backend: Any) -> dict[str, Any] | None:
    """The Django database settings of a ``django-db`` result backend, or None for others.

    django-celery-results' ``DatabaseBackend`` stores results through the
    ``TaskResult`` model; the database it writes to is
    ``router.db_for_write(TaskResult)``, and its settings are that
    connection's ``settings_dict`` (``ENGINE``, ``NAME``, ``USER``, ``OPTIONS``
    ...).  Public Django API; the backend's class and module are the same in
    django-celery-results 2.4 to 2.6.
    """
    if not type(backend).__module__.startswith("django_celery_results."):
        return None
    from django.db import connections, router
    from django_celery_results.models import TaskResult

    alias = router.db_for_write(TaskResult) or "default"
    return {"alias": alias, **connections[alias].settings_dict}


def close_thread_connections(backend: Any) -> None:
    """Close the database connections a ``django-db`` result backend opened in this thread.

    Django's connections are per thread: a thread of ours that read through
    the backend and ends with its connection open leaks it (psycopg warns
    when it is collected).  Nothing for other backends.  Public Django API.
    """
    if type(backend).__module__.startswith("django_celery_results."):
        from django.db import connections

        connections.close_all()


def redis_broker_client(connection: Any) -> Any | None:
    """The redis-py client behind a kombu connection to Redis, or None for other brokers.

    ``Connection.default_channel.client``: the Redis transport's
    ``Channel.client`` (a ``redis.Redis`` on the channel's pool).  Opening
    the default channel connects.  Undocumented; kombu 5.3 to 5.7.
    """
    client = getattr(connection.default_channel, "client", None)
    return client if callable(getattr(client, "ping", None)) else None


def push_redis_message(connection: Any, queue: str, body: Mapping[str, Any], ttl: float) -> None:
    """Publish ``body`` to ``queue`` as kombu's Redis transport does, with a TTL on its list.

    What ``Producer.publish(body, exchange="", routing_key=queue,
    serializer="json", delivery_mode=1, expiration=ttl)`` sends on kombu's
    Redis transport (``kombu.serialization.dumps``; the virtual
    ``Channel.prepare_message`` and ``_inplace_augment_message``, which
    encodes the body with the channel's ``body_encoding`` and gives it a
    ``delivery_tag``; ``Channel._put``, for the anonymous exchange: an
    ``LPUSH`` of the JSON envelope onto the list named as the queue, priority
    0 having no suffix), together with a ``PEXPIRE`` of that list to ``ttl``
    seconds, in one pipelined round trip on the channel's ``client`` (which
    adds the ``global_keyprefix`` transport option to the keys of the
    commands in ``PrefixedStrictRedis.PREFIXED_SIMPLE_COMMANDS``; ``PEXPIRE``
    is in it only in recent kombu, so the prefix is added here when the
    client would not).  Bounded by the connection's ``socket_timeout``.
    Undocumented; kombu 5.3 to 5.7.
    """
    from kombu.serialization import dumps as serialize
    from kombu.utils.json import dumps as envelope

    channel = connection.default_channel
    ms = max(1, int(ttl * 1000))
    content_type, content_encoding, data = serialize(dict(body), serializer="json")  # type: ignore[no-untyped-call]
    message = channel.prepare_message(
        data,
        0,
        content_type,
        content_encoding,
        {},
        {"delivery_mode": 1, "expiration": str(ms)},
    )
    channel._inplace_augment_message(message, "", queue)
    client = channel.client
    prefix = getattr(channel, "global_keyprefix", "") or ""
    commands = getattr(client, "PREFIXED_SIMPLE_COMMANDS", None)
    key = queue if not prefix or (commands and "PEXPIRE" in commands) else prefix + queue
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(queue, envelope(message))  # type: ignore[no-untyped-call]
        pipe.pexpire(key, ms)
        pipe.execute()


def bounded_redis_client(client: Any, timeout: float) -> Any:
    """A new ``redis.Redis`` to the same server as ``client``, every wait bounded by ``timeout``.

    Copies the connection parameters of ``client``'s pool
    (``ConnectionPool.connection_kwargs``, ``connection_class``,
    ``max_connections``; a ``SentinelConnectionPool`` also its
    ``service_name``, ``sentinel_manager`` and ``is_master``) onto a pool of
    its own, with ``socket_timeout`` and ``socket_connect_timeout`` at most
    ``timeout`` (a smaller one configured is kept) and no retry
    (``retry=Retry(NoBackoff(), 0)``, ``retry_on_timeout=False``,
    ``retry_on_error=[]``): redis-py 4.5 to 8 retry a failed command only
    through the connection's ``retry``, so one call waits at most
    ``timeout`` to connect and ``timeout`` for each reply.  ``client``
    itself (Celery's, with its 120 s socket timeout) is left untouched.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs.pop("connection_pool", None)  # a Sentinel pool's proxy to itself
    # redis-py 8 keeps per-pool state here (its maintenance-notification
    # handler, the timeouts to restore after one): the new pool makes its own.
    for name in (
        "maint_notifications_pool_handler",
        "orig_socket_timeout",
        "orig_socket_connect_timeout",
    ):
        kwargs.pop(name, None)
    for name in ("socket_timeout", "socket_connect_timeout"):
        given = kwargs.get(name)
        kwargs[name] = timeout if given is None else min(float(given), timeout)
    kwargs.update(retry=Retry(NoBackoff(), 0), retry_on_timeout=False, retry_on_error=[])
    if kwargs.get("health_check_interval"):
        kwargs["health_check_interval"] = 0  # its PING would be one more wait
    connection_class = pool.connection_class
    try:
        connection_class(**kwargs)  # builds, never connects: are all parameters known?
    except TypeError:  # an old Unix-socket connection has no connect timeout
        kwargs.pop("socket_connect_timeout", None)
    except Exception:  # noqa: BLE001 - e.g. a Sentinel connection wants its pool
        pass
    max_connections = getattr(pool, "max_connections", None)
    service = getattr(pool, "service_name", None)
    if service is not None and hasattr(pool, "sentinel_manager"):
        from redis.sentinel import SentinelConnectionPool

        new_pool: Any = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            service,
            pool.sentinel_manager,
            connection_class=connection_class,
            is_master=getattr(pool, "is_master", True),
            max_connections=max_connections,
            **kwargs,
        )
    else:
        new_pool = redis.ConnectionPool(
            connection_class=connection_class, max_connections=max_connections, **kwargs
        )
    return redis.Redis(connection_pool=new_pool)


#: ``ssl_cert_reqs`` spellings Celery's Redis backend and kombu's Redis
#: transport accept (``celery.backends.redis.RedisBackend.__init__``).
_CERT_REQS: Final = {
    "CERT_REQUIRED": "required",
    "CERT_OPTIONAL": "optional",
    "CERT_NONE": "none",
    "required": "required",
    "optional": "optional",
    "none": "none",
}


@dataclasses.dataclass(frozen=True)
class RedisLedgerClient:
    """What `redis_ledger_client` makes: the client, a key prefix, and where it points."""

    #: A ``redis.Redis`` whose every wait is bounded (`bounded_redis_client`).
    client: Any
    #: ``global_keyprefix`` of the transport options ("" when none).
    keyprefix: str
    #: The server(s), without a password, for log lines and messages.
    where: str


def redis_ledger_client(
    url: str,
    *,
    use_ssl: Mapping[str, Any] | bool | None,
    transport_options: Mapping[str, Any] | None,
    timeout: float,
    setting: str,
    celery_keyprefix: bool = False,
) -> RedisLedgerClient:
    """A bounded redis-py client for a Redis URL, read the way Celery and kombu read it.

    ``url``: ``redis://``, ``rediss://``, ``unix://``/``socket://`` or one or
    more ``sentinel://`` URLs joined by ``;`` (kombu's and Celery's spelling).
    As in ``celery.backends.redis.RedisBackend`` (``_params_from_url``) and
    ``kombu.transport.redis.Channel._connparams``:

    * ``use_ssl`` (``broker_use_ssl`` / ``redis_backend_use_ssl``: a dict of
      ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
      ``ssl_keyfile``) makes the connection TLS; a ``rediss://`` URL's
      query parameters of the same names override it.  ``ssl_cert_reqs`` is
      a ``ssl.CERT_*`` constant or ``CERT_REQUIRED``/``required`` (and the
      optional/none forms); missing, it is required.
    * ``transport_options``: ``master_name``, ``sentinel_kwargs``,
      ``min_other_sentinels`` (Sentinel), ``global_keyprefix``,
      ``socket_timeout``, ``socket_connect_timeout``; never more than
      ``timeout`` (`bounded_redis_client`).  ``celery_keyprefix``: add ``_``
      to a prefix that ends in none of ``:_-.``, as Celery's backend does.
    * A Sentinel URL's first host gives the master's password, username and
      db; the sentinels themselves are asked with ``sentinel_kwargs``, their
      waits bounded by ``timeout`` too.

    Makes no connection.  Raises ``ValueError`` naming ``setting`` for a URL
    or option it cannot use.
    """
    import ssl as ssl_module

    import redis
    from kombu.utils.url import url_to_parts

    options = dict(transport_options or {})
    chunks = [chunk.strip() for chunk in url.split(";") if chunk.strip()]
    if not chunks:
        raise ValueError(f"{setting}: empty Redis URL")
    hosts = []
    for chunk in chunks:
        try:
            parts = url_to_parts(chunk)
        except Exception as exc:
            raise ValueError(f"{setting}: cannot parse {_safe_url(chunk)!r}: {exc}") from exc
        hosts.append((chunk, parts))
    schemes = {parts.scheme for _, parts in hosts}
    if len(schemes) > 1 or (len(hosts) > 1 and schemes != {"sentinel"}):
        raise ValueError(
            f"{setting}: several URLs joined by ';' must all be sentinel:// URLs, "
            f"got {_safe_url(url)!r}"
        )
    scheme = hosts[0][1].scheme
    if scheme not in ("redis", "rediss", "unix", "socket", "sentinel"):
        raise ValueError(
            f"{setting}: not a Redis URL (redis://, rediss://, unix://, sentinel://): "
            f"{_safe_url(url)!r}"
        )
    first = hosts[0][1]
    query = dict(first.query)
    params: dict[str, Any] = {}
    if first.username:
        params["username"] = first.username
    if first.password:
        params["password"] = first.password
    if scheme in ("unix", "socket"):
        # redis-py's unix:///path?db=N, Celery's socket:///path?virtual_host=N
        params["path"] = "/" + (first.path or "")
        db = query.pop("db", None) or query.pop("virtual_host", None)
    else:
        db = query.pop("virtual_host", None) or first.path
    try:
        params["db"] = int(str(db or 0).strip("/") or 0)
    except ValueError as exc:
        raise ValueError(f"{setting}: the database in {_safe_url(url)!r} is not a number") from exc
    for name in ("socket_timeout", "socket_connect_timeout"):
        given = options.get(name)
        if given is not None:
            params[name] = float(given)
    ssl_params: dict[str, Any] = {}
    use_tls = scheme == "rediss"
    if isinstance(use_ssl, Mapping):
        ssl_params.update(use_ssl)
        use_tls = True
    elif use_ssl:
        use_tls = True
    for name in ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        value = query.pop(name, None)
        if value and (scheme == "rediss" or scheme == "sentinel"):
            ssl_params[name] = urllib.parse.unquote(value)
        elif value:
            raise ValueError(
                f"{setting}: {name} in a {scheme}:// URL; use rediss:// for TLS: {_safe_url(url)!r}"
            )
    if use_tls:
        reqs = ssl_params.get("ssl_cert_reqs", ssl_module.CERT_REQUIRED)
        if isinstance(reqs, str):
            if reqs not in _CERT_REQS:
                raise ValueError(
                    f"{setting}: ssl_cert_reqs must be CERT_REQUIRED, CERT_OPTIONAL or "
                    f"CERT_NONE (or required, optional, none), got {reqs!r}"
                )
            reqs = _CERT_REQS[reqs]
        elif reqs not in (ssl_module.CERT_REQUIRED, ssl_module.CERT_OPTIONAL, ssl_module.CERT_NONE):
            raise ValueError(f"{setting}: ssl_cert_reqs {reqs!r} is not an ssl.CERT_* value")
        else:
            reqs = {
                ssl_module.CERT_REQUIRED: "required",
                ssl_module.CERT_OPTIONAL: "optional",
                ssl_module.CERT_NONE: "none",
            }[reqs]
        ssl_params["ssl_cert_reqs"] = reqs
        unknown = set(ssl_params) - {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
        for name in unknown:  # e.g. ssl_check_hostname: redis-py knows more
            if not name.startswith("ssl_"):
                raise ValueError(f"{setting}: unknown TLS option {name!r}")
        params.update(ssl_params)
    keyprefix = str(options.get("global_keyprefix") or "")
    if keyprefix and celery_keyprefix and keyprefix[-1] not in ":_-.":
        keyprefix += "_"
    if scheme == "sentinel":
        client = _sentinel_client(hosts, params, options, use_tls, timeout, setting)
        where = (
            ";".join(f"sentinel://{parts.hostname}:{parts.port or 26379}" for _, parts in hosts)
            + f" (master {options.get('master_name')!r}, db {params['db']})"
        )
    else:
        if scheme in ("unix", "socket"):
            params["connection_class"] = redis.UnixDomainSocketConnection
            where = f"unix://{params['path']} (db {params['db']})"
        else:
            params["host"] = first.hostname or "localhost"
            params["port"] = first.port or 6379
            params["connection_class"] = redis.SSLConnection if use_tls else redis.Connection
            where = f"{'rediss' if use_tls else 'redis'}://{params['host']}:{params['port']}/{params['db']}"
        try:
            pool = redis.ConnectionPool(**params)
        except TypeError as exc:
            raise ValueError(f"{setting}: {exc}") from exc
        client = bounded_redis_client(redis.Redis(connection_pool=pool), timeout)
    return RedisLedgerClient(client, keyprefix, where)


def _sentinel_client(
    hosts: list[tuple[str, Any]],
    params: dict[str, Any],
    options: Mapping[str, Any],
    use_tls: bool,
    timeout: float,
    setting: str,
) -> Any:
    # As ``celery.backends.redis.SentinelBackend`` and kombu's SentinelChannel.
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

    master_name = options.get("master_name")
    if not master_name:
        raise ValueError(
            f"{setting}: a sentinel:// URL needs master_name in the transport options "
            "(broker_transport_options or result_backend_transport_options)"
        )
    sentinel_kwargs = dict(options.get("sentinel_kwargs") or {})
    for name in ("socket_timeout", "socket_connect_timeout"):
        given = sentinel_kwargs.get(name)
        sentinel_kwargs[name] = timeout if given is None else min(float(given), timeout)
    sentinel_kwargs["retry"] = Retry(NoBackoff(), 0)
    sentinels = [(parts.hostname or "localhost", parts.port or 26379) for _, parts in hosts]
    connection = dict(params)
    connection["connection_class"] = (
        SentinelManagedSSLConnection if use_tls else SentinelManagedConnection
    )
    for name in ("socket_timeout", "socket_connect_timeout"):
        given = connection.get(name)
        connection[name] = timeout if given is None else min(float(given), timeout)
    manager = Sentinel(
        sentinels,
        min_other_sentinels=int(options.get("min_other_sentinels", 0)),
        sentinel_kwargs=sentinel_kwargs,
    )
    pool = redis.sentinel.SentinelConnectionPool(  # type: ignore[no-untyped-call]
        master_name, manager, **connection
    )
    return bounded_redis_client(redis.Redis(connection_pool=pool), timeout)


def _safe_url(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return ";".join(str(maybe_sanitize_url(chunk)) for chunk in url.split(";"))


def redis_server_of(client: Any) -> str:
    """Where a redis-py client points, without a password (for log lines).

    ``ConnectionPool.connection_kwargs`` (``host``, ``port``, ``db``,
    ``path``) and a ``SentinelConnectionPool``'s ``service_name``: public
    attributes, redis-py 4.5 to 8.
    """
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    db = kwargs.get("db", 0)
    service = getattr(pool, "service_name", None)
    if service is not None:
        return f"Sentinel master {service!r} (db {db})"
    if "path" in kwargs:
        return f"unix://{kwargs['path']} (db {db})"
    tls = (
        "rediss"
        if "ssl_cert_reqs" in kwargs or "SSL" in pool.connection_class.__name__
        else "redis"
    )
    return f"{tls}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def ping_redis_once(client: Any, timeout: float) -> None:
    """One ``PING`` on ``client``'s pool, waiting at most ``timeout`` s, never retried.

    ``client.ping()`` would follow the client's retry policy (back-off on
    connection errors).  So we take a connection from the pool and set its
    timeouts ourselves: ``ConnectionPool.get_connection()`` (redis-py 5.3
    and later; earlier versions want a command name), the connection's
    ``socket_timeout`` / ``socket_connect_timeout`` and private ``_sock``,
    ``send_command`` / ``read_response``, ``disconnect`` and
    ``pool.release``.  redis-py 4.5 to 8.
    """
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        connection = pool.get_connection("PING")
    try:
        connection.socket_timeout = timeout
        connection.socket_connect_timeout = timeout
        if connection._sock is not None:
            connection._sock.settimeout(timeout)
        connection.send_command("PING")
        connection.read_response()
    except Exception:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def redis_command_once(client: Any, timeout: float, *command: Any) -> Any:
    """One command on ``client``'s pool, waiting at most ``timeout`` s, never retried.

    The same private parts as `ping_redis_once`.  redis-py 4.5 to 8.
    """
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        connection = pool.get_connection(command[0])
    try:
        connection.socket_timeout = timeout
        connection.socket_connect_timeout = timeout
        if connection._sock is not None:
            connection._sock.settimeout(timeout)
        connection.send_command(*command)
        return connection.read_response()
    except Exception:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def started_hostnames(backend: Any, task_ids: Sequence[str], timeout: float) -> list[str] | None:
    """The worker each task runs on, from its STARTED state; None unless all are known.

    Celery stores ``{"pid": ..., "hostname": <node name>}`` as the result of a
    task's STARTED state when ``task_track_started`` is on.  A Redis (or
    Sentinel) result backend only: one ``MGET`` of the tasks' meta keys
    (``KeyValueStoreBackend.get_key_for_task``), bounded by ``timeout``,
    decoded by ``backend.decode_result``.  Celery 5.3 to 5.6.  None when the
    backend is another kind, a state is not STARTED or names no node.
    """
    client = redis_backend_client(backend)
    if client is None or not task_ids:
        return None
    keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
    hosts: list[str] = []
    for raw in redis_command_once(client, timeout, "MGET", *keys):
        if raw is None:
            return None
        meta = backend.decode_result(raw)
        result = meta.get("result") if meta.get("status") == "STARTED" else None
        host = result.get("hostname") if isinstance(result, dict) else None
        if not isinstance(host, str) or not host:
            return None
        hosts.append(host)
    return hosts


# --------------------------------------------------------------------------
# The consumer losing its broker connection (cancellable.celery._shutdown).


def wrap_consumer_connection_lost(make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace ``Consumer.on_connection_error_after_connected``; False if already wrapped.

    ``celery.worker.consumer.consumer.Consumer.start`` calls
    ``self.on_connection_error_after_connected(exc)`` on the consumer's
    thread when the broker connection of a consumer that was connected
    fails, before it closes the connection (``self.connection`` is still
    the old one), before ``worker_cancel_long_running_tasks_on_connection_loss``
    cancels the ``acks_late`` requests that are not acknowledged, and
    before ``on_close`` and the blueprint's restart.  Signature ``(self,
    exc)``.  Undocumented; same in 5.3 to 5.7.
    """
    from celery.worker.consumer.consumer import Consumer

    original = Consumer.on_connection_error_after_connected
    if getattr(original, ORIGINAL, None) is not None:
        return False
    Consumer.on_connection_error_after_connected = _wrapper(original, make(original))
    return True


def unwrap_consumer_connection_lost() -> bool:
    """Put Celery's own ``on_connection_error_after_connected`` back; False if not wrapped."""
    from celery.worker.consumer.consumer import Consumer

    original = getattr(Consumer.on_connection_error_after_connected, ORIGINAL, None)
    if original is None:
        return False
    Consumer.on_connection_error_after_connected = original
    return True


def redelivers_unacked(connection: Any) -> bool:
    """Whether the broker of a kombu connection requeues its unacked messages when it drops.

    ``Connection.transport.driver_type`` is ``"amqp"`` for the ``pyamqp``
    and ``librabbitmq`` transports (an AMQP broker requeues the unacked
    deliveries of a closed channel at once).  kombu's Redis transport
    restores them itself when the channel closes (`restores_unacked_on_close`);
    ``"SQS"`` and the others only after a visibility timeout.  kombu 5.3 to 5.7.
    """
    transport = getattr(connection, "transport", None)
    return getattr(transport, "driver_type", None) == "amqp"


def restores_unacked_on_close(connection: Any) -> bool:
    """Whether closing the kombu connection's channels puts their unacked messages back at once.

    kombu's Redis transport (``driver_type == "redis"``) does, when its
    channel closes (``Channel.close`` -> ``QoS.restore_unacked_once``, with
    ``QoS.restore_at_shutdown`` and ``Channel.do_restore`` true by default):
    each message delivered on the channel and not acked yet goes back on
    its queue, if the server answers at that moment.  A consumer that lost
    its connection closes it, so another worker may start a running task
    again while it still runs.  kombu 5.3 to 5.7.
    """
    transport = getattr(connection, "transport", None)
    if getattr(transport, "driver_type", None) != "redis":
        return False
    qos = getattr(getattr(transport, "Channel", None), "QoS", None)
    return bool(getattr(qos, "restore_at_shutdown", False))


def keep_unacked_on_close(request: Any, consumer: Any) -> bool:
    """Keep ``request``'s message out of what its Redis channel restores when it closes.

    Removes the message's delivery tag from the channel's
    ``QoS._delivered`` (what ``restore_unacked_once`` walks): the message
    stays in the server's unacked hash.  Its channel is then replaced by
    `_AckThroughCurrent`, so that the ack Celery sends when the task ends
    goes through the consumer's channel of that moment (kombu 5.7 cannot
    ack through a closed Redis channel: ``QoS.ack`` raised AttributeError,
    an "Unrecoverable error" that took the worker down).  If the worker has
    no channel then, or dies first, the message stays unacked and kombu's
    ``restore_visible`` puts it back after the visibility timeout.  False
    if the message is not there (acked, restored, or not delivered on a
    virtual channel).  Undocumented; kombu 5.3 to 5.7
    (``Message.channel``, ``QoS._delivered``), Celery's ``Request.message``
    and ``Consumer.task_consumer``.
    """
    message = getattr(request, "message", None)
    tag = getattr(message, "delivery_tag", None)
    channel = getattr(message, "channel", None)
    delivered = getattr(getattr(channel, "qos", None), "_delivered", None)
    if message is None or tag is None or not isinstance(delivered, dict):
        return False
    if delivered.pop(tag, None) is None:
        return False
    message.channel = _AckThroughCurrent(channel, consumer)
    return True


class _AckThroughCurrent:
    """A kept message's channel: acks and rejects go to the consumer's live channel."""

    def __init__(self, old: Any, consumer: Any) -> None:
        self._old = old
        self._consumer = consumer

    def _current(self) -> Any | None:
        channel = getattr(getattr(self._consumer, "task_consumer", None), "channel", None)
        if channel is None or channel is self._old or getattr(channel, "connection", None) is None:
            return None
        return channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current() or self._old, name)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        channel = self._current()
        if channel is not None:  # else: unacked, back after the visibility timeout
            channel.basic_ack(delivery_tag, multiple=multiple)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        channel = self._current()
        if channel is not None:
            channel.basic_reject(delivery_tag, requeue=requeue)


def drop_acknowledgement(request: Any) -> None:
    """Never acknowledge or reject ``request``'s message (its channel is gone).

    ``Request.acknowledged``: ``acknowledge()`` and ``reject()`` do nothing
    once it is True, and the connection-loss loop of
    ``worker_cancel_long_running_tasks_on_connection_loss`` skips such a
    request (it would SIGTERM the child).  Undocumented; same in 5.3 to 5.7.
    """
    request.acknowledged = True


def publish_control_once(
    app: Any,
    connection: Any,
    command: str,
    arguments: Mapping[str, Any],
    timeout: float = 1.0,
    destination: Sequence[str] | None = None,
) -> None:
    """Publish the broadcast ``app.control.broadcast(command, arguments=...)`` sends, once.

    The same message on the same exchange (Celery's ``Control.mailbox``
    bound to ``connection``, then kombu's ``Mailbox._publish(type, arguments,
    destination=, reply_ticket=, channel=, timeout=, producer=)``, no reply
    wanted, ``timeout`` as Celery's default: the message expires after it),
    but published by a ``Producer`` on ``connection``'s channel that makes
    one attempt: ``Mailbox._publish`` asks ``Producer.publish`` for
    ``retry=True`` without a retry policy, which kombu's ``Connection.ensure``
    retries for ever.  The broadcast therefore goes over ``connection`` (not
    over the app's producer pool) and fails with the transport's error.
    ``destination``: the node names to address (None: every worker).
    ``Mailbox.__call__``, ``_publish``: kombu 5.3 to 5.7.
    """
    mailbox = app.control.mailbox(connection)
    channel = connection.default_channel
    mailbox._publish(
        command,
        dict(arguments),
        destination=None if destination is None else list(destination),
        reply_ticket=None,
        channel=channel,
        timeout=timeout,
        producer=_OneAttemptProducer(channel),
    )


class _OneAttemptProducer:
    """A kombu ``Producer`` whose ``publish`` never enters kombu's retry loop."""

    def __init__(self, channel: Any) -> None:
        self._producer: Any = _Producer(channel, auto_declare=False)  # type: ignore[no-untyped-call]

    def publish(self, body: Any, **kwargs: Any) -> Any:
        kwargs["retry"] = False
        return self._producer.publish(body, **kwargs)


def is_fallback_app(app: Any) -> bool:
    """Whether ``app`` is the app Celery falls back on when none is current.

    ``celery._state.default_app`` as ``_get_current_app`` makes it when no
    app was set as the default: ``Celery("default", set_as_current=False)``,
    configured for ``amqp://localhost``.  A thread that has no current app
    (``_tls.current_app`` is set per thread) gets it from ``current_app``.
    Undocumented; same in 5.3 to 5.7.
    """
    from celery import _state

    return (
        app is _state.default_app
        and getattr(app, "main", None) == "default"
        and getattr(app, "set_as_current", True) is False
    )


def stored_states(
    backend: Any, task_ids: list[str], into: dict[str, str], hosts: dict[str, str] | None = None
) -> None:
    """Fill ``into`` with the stored state of each of ``task_ids``.

    A key-value backend (Redis, Memcached, the filesystem: Celery's
    ``KeyValueStoreBackend``) is read in bulk with its ``mget``, its
    ``get_key_for_task`` and its ``decode_result``, a thousand ids a round
    trip; any other backend one ``get_task_meta`` per id.  ``into`` fills as
    reads complete, so a caller that stops waiting keeps what was read.  A
    task the backend has no record of is PENDING.  ``mget`` and
    ``decode_result`` are not in Celery's documented API; same in 5.3 to 5.7.
    ``hosts`` (bulk reads only) gets the node name of each task read
    STARTED with one (``{"pid", "hostname"}``, see `started_hostnames`).
    """
    from celery import states

    if all(hasattr(backend, name) for name in ("mget", "get_key_for_task", "decode_result")):
        try:
            for start in range(0, len(task_ids), 1000):
                chunk = task_ids[start : start + 1000]
                values = backend.mget([backend.get_key_for_task(t) for t in chunk])
                for task_id, value in zip(chunk, values, strict=True):
                    meta = backend.decode_result(value) if value else {}
                    status = str(meta.get("status") or states.PENDING)
                    if hosts is not None and status == states.STARTED:
                        result = meta.get("result")
                        host = result.get("hostname") if isinstance(result, dict) else None
                        if isinstance(host, str) and host:
                            hosts[task_id] = host
                    into[task_id] = status
        except NotImplementedError:  # a key-value backend without a bulk read
            pass
        else:
            return
    for task_id in task_ids:
        if task_id in into:
            continue
        into[task_id] = str(backend.get_task_meta(task_id).get("status") or states.PENDING)
