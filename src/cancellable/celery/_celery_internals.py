"""The Celery boundary: every use of Celery, kombu, billiard and redis-py internals.

`cancellable.celery` relies on a few things that those libraries do not
document as API.  Each one is used here and nowhere else, and each has a
contract test (``tests/test_celery_contract.py``) that fails if the
installed version no longer behaves the way we rely on.  Everything else in
the package uses public API only, or this module.

The worker's own state (``celery.worker.state``)
    `held_request`, `held_requests`, `active_request_ids`: the requests a
    worker holds (reserved or running) and runs; `in_revoked_set` and
    `add_to_revoked_set`: Celery's bounded set of revoked ids.
A worker ``Request``
    `child_pid` (``worker_pid``), `request_payload` (``_payload``: the
    message body), `request_context` (``_context``), `already_revoked`
    (``_already_revoked``), `announce_revoked` (``_announce_revoked``).
Patch points (installed by `cancellable.celery._activation`)
    `patch_request` (``Request.revoked``, ``Request._announce_revoked``),
    `wrap_control_command` and `register_inspect_command` (the remote
    control registry ``Panel.data``), `patch_control_revoke`
    (``Control.revoke``).
The current task
    `current_task` (``celery._state.get_current_task``).
billiard's pool
    `pool_process`, `mark_terminated_on_purpose`, `pool_maintainer`: the
    prefork pool's process objects; `child_index` (a child's pool index);
    `reserved_signals` (``billiard.common.TERMSIGS_FULL``).
redis-py
    `ping_once`: one ``PING`` on a connection of a client's pool, with a
    bounded wait.
"""

from __future__ import annotations

import signal as signal_module
from collections.abc import Callable
from typing import Any, Final

from celery.worker import state as worker_state

__all__ = [
    "active_request_ids",
    "add_to_revoked_set",
    "already_revoked",
    "announce_revoked",
    "child_index",
    "child_pid",
    "current_task",
    "held_request",
    "held_requests",
    "in_revoked_set",
    "mark_terminated_on_purpose",
    "patch_control_revoke",
    "patch_request",
    "ping_once",
    "pool_maintainer",
    "pool_process",
    "register_inspect_command",
    "request_context",
    "request_payload",
    "reserved_signals",
    "wrap_control_command",
]

#: The attribute that marks our wrappers, and holds what they wrap.
ORIGINAL: Final = "_cancellable_original"

# --------------------------------------------------------------------------
# The worker's state.


def held_request(task_id: str) -> Any:
    """The request of ``task_id`` if this worker holds it (reserved or running), else None."""
    return worker_state.requests.get(task_id)


def held_requests() -> dict[str, Any]:
    """Every request this worker holds, by task id (a copy)."""
    return dict(worker_state.requests.copy())


def active_request_ids() -> set[str]:
    """Ids of the requests this worker runs now."""
    return {request.id for request in list(worker_state.active_requests)}


def in_revoked_set(task_id: str) -> bool:
    """Whether Celery's own revoked set names ``task_id``."""
    return task_id in worker_state.revoked


def add_to_revoked_set(task_id: str) -> None:
    """Add ``task_id`` to Celery's revoked set (Celery then discards the task)."""
    worker_state.revoked.add(task_id)


# --------------------------------------------------------------------------
# A worker Request.


def child_pid(request: Any) -> int | None:
    """The pid of the pool process running ``request`` (None: not started in one yet)."""
    pid = getattr(request, "worker_pid", None)
    return pid if isinstance(pid, int) and pid else None


def request_payload(request: Any) -> Any:
    """A worker ``Request``'s message body ``(args, kwargs, embed)``; None for a ``Context``."""
    if getattr(type(request), "_payload", None) is None:
        return None
    return request._payload


def request_context(request: Any) -> Any:
    """The task ``Context`` a worker ``Request`` builds for its task."""
    return request._context


def already_revoked(request: Any) -> bool:
    """Whether Celery has already announced ``request`` as revoked."""
    return bool(request._already_revoked)


def announce_revoked(
    request: Any, reason: str, terminated: bool, signum: int | None, expired: bool
) -> Any:
    """Celery's ending of a revoked request: store REVOKED, acknowledge, send ``task_revoked``."""
    return request._announce_revoked(reason, terminated, signum, expired)


# --------------------------------------------------------------------------
# Patch points.


def patch_request(
    revoked: Callable[[Callable[[Any], bool]], Callable[[Any], bool]],
    announce: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> bool:
    """Wrap ``Request.revoked`` and ``Request._announce_revoked`` (once; False if done before).

    ``revoked(original)`` and ``announce(original)`` return the wrappers.
    """
    from celery.worker.request import Request

    if getattr(Request.revoked, ORIGINAL, None) is not None:
        return False
    original_revoked = Request.revoked
    original_announce = Request._announce_revoked
    new_revoked = revoked(original_revoked)
    new_announce = announce(original_announce)
    setattr(new_revoked, ORIGINAL, original_revoked)
    setattr(new_announce, ORIGINAL, original_announce)
    new_revoked.__doc__ = original_revoked.__doc__
    Request.revoked = new_revoked
    Request._announce_revoked = new_announce
    return True


def wrap_control_command(
    name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> bool:
    """Replace the remote-control command ``name`` by ``wrap(original)`` (once; False if not)."""
    from celery.worker.control import Panel

    original = Panel.data.get(name)
    if original is None or getattr(original, ORIGINAL, None) is not None:
        return False
    wrapper = wrap(original)
    setattr(wrapper, ORIGINAL, original)
    wrapper.__doc__ = original.__doc__
    Panel.data[name] = wrapper
    return True


def register_inspect_command(name: str, handler: Callable[..., Any]) -> bool:
    """Register a read-only remote-control command (once; False if the name is taken)."""
    from celery.worker.control import Panel

    if name in Panel.data:
        return False
    Panel.register(handler, name=name, type="inspect")
    return True


def patch_control_revoke(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace ``Control.revoke`` (the client's revoke) by ``wrap(original)`` (once)."""
    from celery.app.control import Control

    original = Control.revoke
    if getattr(original, ORIGINAL, None) is not None:
        return False
    wrapper = wrap(original)
    setattr(wrapper, ORIGINAL, original)
    wrapper.__doc__ = original.__doc__
    Control.revoke = wrapper
    return True


# --------------------------------------------------------------------------
# The current task.


def current_task() -> Any:
    """The task executing on this thread, or None (``celery._state.get_current_task``)."""
    from celery._state import get_current_task

    return get_current_task()


# --------------------------------------------------------------------------
# billiard's pool.


def pool_process(worker: Any, pid: int) -> Any:
    """The billiard process object of the pool child ``pid`` (None: not a prefork child)."""
    inner = getattr(getattr(worker, "pool", None), "_pool", None)
    finder = getattr(inner, "_process_by_pid", None)
    if finder is None:
        return None
    proc, _index = finder(pid)
    return proc


def mark_terminated_on_purpose(proc: Any) -> None:
    """What billiard's ``terminate_job`` marks: the pool then reports the job ``Terminated``."""
    proc._controlled_termination = True
    proc._job_terminated = True


def pool_maintainer(worker: Any) -> Callable[[], Any] | None:
    """The prefork pool's ``maintain_pool`` (replaces dead children), or None."""
    maintain = getattr(getattr(getattr(worker, "pool", None), "_pool", None), "maintain_pool", None)
    return maintain if callable(maintain) else None


def child_index() -> int | None:
    """This pool child's index (0 to concurrency - 1; a replacement takes the old index)."""
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) else None


def reserved_signals() -> set[int]:
    """Signals a wake-up must not use: billiard's in pool children, and uncatchable ones."""
    from billiard.common import TERMSIGS_FULL

    names = (*TERMSIGS_FULL, "SIGKILL", "SIGSTOP", "SIGINT")
    return {int(getattr(signal_module, name)) for name in names if hasattr(signal_module, name)}


# --------------------------------------------------------------------------
# redis-py.


def ping_once(client: Any, timeout: float) -> None:
    """One ``PING`` on a connection of ``client``'s pool, waiting at most ``timeout`` seconds.

    No retry, whatever the client's own retry policy (redis-py retries
    connection errors with back-off).
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
