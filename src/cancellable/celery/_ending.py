"""How a cancelled task's ending is announced: Celery's ``task-revoked`` event and log line.

Monitoring tools (Flower, ``celery events``, Prometheus exporters) follow a
task through the worker's task events.  Celery sends ``task-revoked`` only
from its own discard and terminate paths; a task that stops at a
checkpoint leaves the tracer with `~celery.exceptions.Ignore`, for which
Celery sends no event at all and logs "Task name[id] ignored".  So:

* The task boundary (`cancellable.celery._task`) raises `CancelledEnding`,
  an ``Ignore`` that carries the REVOKED message it stored and the
  workflow members it stored REVOKED with it.  It crosses the prefork
  pool's pipe (it pickles) to the worker's main process, where
  ``Request.on_failure`` acknowledges it as any ``Ignore``; our wrapper
  (`on_failure`) then sends Celery's own ``task-revoked`` event for the
  task (``terminated=False, signum=None, expired=False``) and for each of
  those members, with the message in ``exception`` as
  ``TaskRevokedError('...')``: ``exception`` is a field of Celery's event
  state (``celery.events.state.Task._fields``), so Flower shows it on the
  task page and in its API, and ``celery events`` keeps it.  Events are
  sent only when the worker sends task events (``-E``), through the same
  dispatcher and checks as Celery's own (`send_revoked_events`).
* The tracer's log line for it reads "Task name[id] revoked: <message>"
  (`log_policy`, around ``celery.app.trace.get_log_policy``), at INFO as
  for ``Ignore``, once.
* Endings the main process decides itself (a discard before start, a
  terminate) go through Celery's ``_announce_revoked``, which sends the
  event; `cancellable.celery._revokes.announce_revoked` adds the same
  ``exception`` field to it (`revoked_fields`) and logs the same line.

No new ``task-*`` event type is sent: an unknown state outranks REVOKED in
Celery's event state machine, and the task would stay in it for ever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from celery.exceptions import Ignore, TaskRevokedError

from .._log import logger
from ..events import TASK_EVENT_NOT_SENT
from . import _celery_internals as celery_internals

__all__ = [
    "CancelledEnding",
    "Member",
    "description",
    "log_policy",
    "on_failure",
    "revoked_fields",
    "send_revoked_events",
]

#: ``(task id, task name or None)`` of a workflow member stored REVOKED.
Member = tuple[str, str | None]


class CancelledEnding(Ignore):  # type: ignore[misc]  # Celery is untyped
    """The ``Ignore`` a cancelled task leaves Celery's tracer with.

    Args:
        text: The message of the `~celery.exceptions.TaskRevokedError`
            stored for the task ("revoked by alice: stop (interrupted after
            1.0 s)").
        members: ``(id, name)`` of the workflow members stored REVOKED
            with it (the rest of its chain, its links, its chord's body).

    Pickles through its ``args`` (it crosses the prefork pool's pipe).
    """

    def __init__(self, text: str = "", members: Iterable[Member] = ()) -> None:
        members = [(str(task_id), name) for task_id, name in members]
        super().__init__(text, members)
        self.text = text
        self.members = members

    def __str__(self) -> str:
        return self.text


def description(text: str) -> str:
    """What follows "Task name[id]" in the worker's log line for a cancelled task."""
    return f"revoked: {text}"


def revoked_fields(text: str) -> dict[str, Any]:
    """The fields added to a ``task-revoked`` event: the REVOKED message, where Flower shows it."""
    return {"exception": repr(TaskRevokedError(text))}


def log_policy(original: Callable[..., Any]) -> Callable[..., Any]:
    """``celery.app.trace.get_log_policy``, with "revoked: <message>" for `CancelledEnding`."""

    def get_log_policy(task: Any, einfo: Any, exc: Any) -> Any:
        if isinstance(exc, CancelledEnding):
            return celery_internals.revoked_log_policy(description(exc.text))
        return original(task, einfo, exc)

    return get_log_policy


def send_revoked_events(
    request: Any,
    text: str,
    members: Iterable[Member] = (),
    *,
    own: bool = True,
) -> int:
    """Send ``task-revoked`` for ``request`` (if ``own``) and for each member; return how many.

    Nothing is sent unless the worker sends task events.  A member gets its
    task name in ``name`` too: it was never received, so no earlier event
    named it.
    """
    fields = {"terminated": False, "signum": None, "expired": False, **revoked_fields(text)}
    sent = 0
    if own and celery_internals.send_task_event(request, "task-revoked", **fields):
        sent += 1
    for task_id, name in members:
        extra = {} if name is None else {"name": name}
        if celery_internals.send_task_event(request, "task-revoked", task_id, **fields, **extra):
            sent += 1
    return sent


def on_failure(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Request.on_failure``, announcing a `CancelledEnding` after Celery acknowledged it."""

    def wrapper(self: Any, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, exc_info, *args, **kwargs)
        exc = celery_internals.einfo_exception(exc_info)
        if isinstance(exc, CancelledEnding):
            try:
                send_revoked_events(self, exc.text, exc.members)
            except Exception as error:  # noqa: BLE001 - never break the worker's event loop
                logger.warning(
                    TASK_EVENT_NOT_SENT,
                    task_id=getattr(self, "id", None),
                    error=repr(error),
                    exc_info=error,
                )
        return result

    return wrapper
