"""Canvas semantics: what a cancelled task leaves behind, and who belongs to a workflow.

Celery sends the later parts of a canvas only when an earlier part
succeeds: the rest of a chain rides in the running link's message
(``request.chain``, last link first), explicit links in
``request.callbacks``, and a chord's body in each header member's
``request.chord``.  Every one of those signatures already has its task id
(Celery freezes the whole canvas when it is applied), and the client holds
``AsyncResult`` objects for them.  When a member ends cancelled, none of them
will ever be sent, so without help they would stay PENDING forever and
``AsyncResult.get()`` of the chain would never return.

This module walks those signatures (plain dicts in the message, or
`~celery.canvas.Signature` objects) and stores REVOKED, with the member's
reason, for every task id in them (`revoke_member`), and lists them for the
worker's index (`downstream_ids`), which treats a ``root`` target as "the
workflow this id belongs to".

A cancelled chord member does not report to the chord
(``on_chord_part_return``): its body is REVOKED here instead, so the
backend's join can never fail the body with a `~celery.exceptions.ChordError`
over the REVOKED state we stored, nor publish it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from celery import states
from celery.exceptions import TaskRevokedError

from .._exceptions import CancelReason
from . import _celery_internals as celery_internals

__all__ = ["downstream_ids", "pending_signatures", "revoke_downstream", "revoke_member"]

#: The deepest canvas nesting walked (a guard against a malformed message).
MAX_DEPTH: Final = 64


def _embed(request: Any) -> tuple[Any, Any, Any]:
    """``(callbacks, chain, chord)`` of a worker ``Request`` or a task ``Context``."""
    embedded = celery_internals.request_embed(request)
    if embedded is not None:
        # A worker Request (main process): the canvas rides in the message body.
        return embedded
    return (
        getattr(request, "callbacks", None),
        getattr(request, "chain", None),
        getattr(request, "chord", None),
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return []


def pending_signatures(request: Any) -> list[Any]:
    """The signatures a request would send after it succeeds (never sent yet)."""
    callbacks, chain, chord = _embed(request)
    return [*_as_list(chain), *_as_list(callbacks), *_as_list(chord)]


def _walk(signature: Any, depth: int = 0) -> Iterator[str]:
    """Every task id inside ``signature`` (a task, group, chain or chord), nested."""
    if depth > MAX_DEPTH or not isinstance(signature, dict):
        return
    kwargs = signature.get("kwargs") or {}
    options = signature.get("options") or {}
    kind = signature.get("subtask_type")
    name = signature.get("task")
    if kind == "chord" or name == "celery.chord":
        for part in _as_list(kwargs.get("header")):
            yield from _walk(part, depth + 1)
        yield from _walk(kwargs.get("body"), depth + 1)
    elif kind in ("group", "chain") or name in ("celery.group", "celery.chain"):
        for part in _as_list(kwargs.get("tasks")):
            yield from _walk(part, depth + 1)
    else:
        task_id = options.get("task_id")
        if isinstance(task_id, str) and task_id:
            yield task_id
    # Links and the rest of a chain can hang off any signature's options.
    for key in ("link", "chain"):
        for part in _as_list(options.get(key)):
            yield from _walk(part, depth + 1)


def downstream_ids(request: Any) -> Iterator[str]:
    """Ids of the tasks a request would send after it succeeds, at any depth."""
    for signature in pending_signatures(request):
        yield from _walk(signature)


def revoke_downstream(backend: Any, request: Any, reason: CancelReason) -> int:
    """Store REVOKED with ``reason`` for every task the request would have sent.

    Returns how many ids were marked.  Called only for a task that ended
    cancelled, whose later parts can therefore never be sent.
    """
    ids = list(dict.fromkeys(downstream_ids(request)))
    if not ids:
        return 0
    exc = TaskRevokedError(reason.describe())
    for task_id in ids:
        backend.store_result(task_id, exc, states.REVOKED)
    return len(ids)


def revoke_member(
    backend: Any,
    task_id: str,
    reason: CancelReason,
    request: Any,
    *,
    store_result: bool = True,
    message: str | None = None,
) -> None:
    """End a cancelled task: REVOKED with ``reason``, and the same for all it would have sent.

    ``message`` is the text of the task's own `TaskRevokedError` (default:
    ``reason.describe()``; the ladder adds how the task ended).  Unlike
    ``backend.mark_as_revoked`` this does not report to the task's chord
    (see the module docstring): the chord body is among the tasks marked
    REVOKED.
    """
    if store_result:
        text = reason.describe() if message is None else message
        backend.store_result(task_id, TaskRevokedError(text), states.REVOKED, request=request)
    revoke_downstream(backend, request, reason)
