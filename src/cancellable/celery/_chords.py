"""Chords joined by polling: ``celery.chord_unlock`` and a cancelled chord.

A result backend with native chord support (Redis, django-celery-results'
``django-db``) counts the header members as they report
(``on_chord_part_return``) and sends the body after the last one.  A
cancelled member never reports: its body is stored REVOKED instead
(`cancellable.celery._workflow`), so it is never sent.

The other backends (Celery's ``db+postgresql://``, ``db+mysql://``,
``db+sqlite://``...) have the body sent by Celery's builtin task
``celery.chord_unlock``, sent with the chord: it polls the header's states
every ``result_chord_retry_interval`` and, once every header result is
ready, sends the body, or, when one of them is REVOKED (or failed), logs
"Chord ... raised" at ERROR and stores FAILURE with a
`~celery.exceptions.ChordError` for the body, over the REVOKED state the
cancellation stored.

So the worker wraps that task (`unlock_chord`, installed at
``worker_init``): a body stored REVOKED means the chord was cancelled (a
cancelled header member, the worker that discarded one, or
`~cancellable.celery.cancel` itself stored it, and nothing else stores a
REVOKED state for a task that was never sent), so the task stops polling
at once, sends nothing and fails nothing, and logs ``chord.cancelled``.  It
reads the body's state when it starts, and again right after it found the
whole header ready: a cancelled member stores the body before its own
state, so a header found ready with a cancelled member always comes with a
REVOKED body.  Otherwise (a member failed, or the header succeeded) Celery's
own join runs unchanged.  A body of several tasks (a chain or a group)
has every other task of it stored REVOKED with the same message too, as
the worker that discards a cancelled task does for what it would send.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError

from .._log import logger
from ..events import CHORD_CANCELLED, TASK_RESULT_NOT_STORED
from . import _celery_internals as celery_internals
from . import _workflow

__all__ = ["install", "revoked_body", "unlock_chord"]


class _BodyRevoked(BaseException):
    """Leaves ``celery.chord_unlock`` from inside its header check (not an ``Exception``:
    Celery's handlers, which retry or fail the chord, let it through)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def revoked_body(backend: Any, body_ids: list[str]) -> str | None:
    """The REVOKED message of a chord's body (its first task) if it is stored REVOKED, else None."""
    if not body_ids:
        return None
    meta = backend.get_task_meta(body_ids[0], cache=False)
    if meta.get("status") != states.REVOKED:
        return None
    result = meta.get("result")
    return str(result) if result is not None else "revoked"


def _revoke_the_rest(backend: Any, body_ids: list[str], text: str) -> None:
    # The other tasks of a chain or group body: never sent (the body is sent
    # by this task only), so REVOKED with the same message.
    rest = body_ids[1:]
    if not rest:
        return
    found: dict[str, str] = {}
    celery_internals.stored_states(backend, rest, found)
    exc = TaskRevokedError(text)
    for task_id in rest:
        if found.get(task_id) != states.REVOKED:
            backend.store_result(task_id, exc, states.REVOKED)


def unlock_chord(original: Callable[..., Any]) -> Callable[..., Any]:
    """``celery.chord_unlock``'s ``run``, ending quietly for a cancelled chord (see above)."""

    def run(self: Any, group_id: Any, callback: Any, *args: Any, **kwargs: Any) -> Any:
        body_ids = _workflow.signature_ids(callback)
        if not body_ids or len(args) > 4:
            # Not a body we can name, or Celery's hooks given positionally.
            return original(self, group_id, callback, *args, **kwargs)
        backend = self.app.backend
        try:
            text = revoked_body(backend, body_ids)
        except Exception:  # noqa: BLE001 - Celery's join reads the backend next, and retries
            text = None
        if text is None:

            def after_ready(ready: bool) -> None:
                # An error reading the body is Celery's "deps.ready() raised": a retry.
                if ready:
                    found = revoked_body(backend, body_ids)
                    if found is not None:
                        raise _BodyRevoked(found)

            checked = celery_internals.chord_unlock_checking_ready(self.app, kwargs, after_ready)
            try:
                return original(self, group_id, callback, *args, **checked)
            except _BodyRevoked as stop:
                text = stop.text
        try:
            _revoke_the_rest(backend, body_ids, text)
        except Exception as exc:  # noqa: BLE001 - the chord is over either way
            logger.warning(
                TASK_RESULT_NOT_STORED, task_id=body_ids[1], error=repr(exc), exc_info=exc
            )
        logger.info(
            CHORD_CANCELLED,
            task_id=getattr(self.request, "id", None),
            task_name=getattr(self, "name", None),
            group=group_id,
            body=body_ids[0],
            revoked=text,
        )
        return None

    return run


def install(app: Any) -> bool:
    """Wrap ``app``'s ``celery.chord_unlock`` (idempotent; False if it was already)."""
    return celery_internals.wrap_chord_unlock(app, unlock_chord)
