"""Workflows: who belongs to one, and what a cancelled member leaves behind.

Everything this library knows about Celery canvases is here: the targets
that name a whole workflow on the client (`workflow_of`, `resolve_id`,
`unsent_ids`), and, on the worker, the tasks a message would send later.

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
over the REVOKED state we stored, nor publish it.  The body is stored
before the member's own state: a backend without native chords joins the
header by polling it (``celery.chord_unlock``, `cancellable.celery._chords`),
and once it finds the whole header ready it must find the body REVOKED too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Final

from celery import states
from celery.exceptions import TaskRevokedError

from .._exceptions import CancelReason
from . import _celery_internals as celery_internals
from ._ledger import Target

__all__ = [
    "downstream",
    "downstream_ids",
    "is_group_result",
    "pending_signatures",
    "resolve_id",
    "revoke_downstream",
    "revoke_member",
    "signature_ids",
    "tree_ids",
    "tree_targets",
    "unsent_ids",
    "workflow_of",
    "workflow_targets",
]

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


def _walk(signature: Any, depth: int = 0) -> Iterator[tuple[str, str | None]]:
    """``(task id, task name)`` of every task inside ``signature`` (a task, group, chain
    or chord), nested."""
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
            yield task_id, name if isinstance(name, str) else None
    # Links and the rest of a chain can hang off any signature's options.
    for key in ("link", "chain"):
        for part in _as_list(options.get(key)):
            yield from _walk(part, depth + 1)


def signature_ids(signature: Any) -> list[str]:
    """The task ids inside a signature (a task, group, chain or chord, as a dict), in order."""
    return list(dict(_walk(signature)))


def downstream_ids(request: Any) -> Iterator[str]:
    """Ids of the tasks a request would send after it succeeds, at any depth."""
    for task_id, _name in downstream(request):
        yield task_id


def downstream(request: Any) -> Iterator[tuple[str, str | None]]:
    """``(id, name)`` of the tasks a request would send after it succeeds, at any depth."""
    for signature in pending_signatures(request):
        yield from _walk(signature)


def revoke_downstream(
    backend: Any, request: Any, reason: CancelReason
) -> list[tuple[str, str | None]]:
    """Store REVOKED with ``reason`` for every task the request would have sent.

    Returns ``(id, name)`` of each task marked (the worker announces them:
    `cancellable.celery._ending`).  Called only for a task that ended
    cancelled, whose later parts can therefore never be sent.
    """
    marked = list(dict(downstream(request)).items())
    if not marked:
        return []
    exc = TaskRevokedError(reason.describe())
    for task_id, _name in marked:
        backend.store_result(task_id, exc, states.REVOKED)
    return marked


def revoke_member(
    backend: Any,
    task_id: str,
    reason: CancelReason,
    request: Any,
    *,
    store_result: bool = True,
    message: str | None = None,
) -> list[tuple[str, str | None]]:
    """End a cancelled task: REVOKED with ``reason``, and the same for all it would have sent.

    ``message`` is the text of the task's own `TaskRevokedError` (default:
    ``reason.describe()``; the ladder adds how the task ended).  Unlike
    ``backend.mark_as_revoked`` this does not report to the task's chord
    (see the module docstring): the chord body is among the tasks marked
    REVOKED, before the task itself.  Returns what `revoke_downstream` returns.
    """
    try:
        return revoke_downstream(backend, request, reason)
    finally:
        if store_result:
            text = reason.describe() if message is None else message
            backend.store_result(task_id, TaskRevokedError(text), states.REVOKED, request=request)


# --------------------------------------------------------------------------
# Which targets name a whole workflow (the client side of ``workflow=True``).

#: How far up a chain of ``.parent`` results (or stored parent ids) we climb.
_MAX_CLIMB: Final = 10_000


def is_group_result(obj: object) -> bool:
    """Whether ``obj`` is a `~celery.result.GroupResult` (or quacks like one)."""
    return getattr(obj, "results", None) is not None and hasattr(obj, "revoke")


def _lineage(node: Any) -> list[Any]:
    """``node``, then the results before it (its ``.parent``, and theirs), first task last."""
    path = [node]
    for _ in range(_MAX_CLIMB):
        parent = getattr(path[-1], "parent", None)
        if parent is None:
            break
        path.append(parent)
    return path


def _top(node: Any) -> Any:
    """The first result of the workflow ``node`` is part of."""
    return _lineage(node)[-1]


def workflow_of(node: Any) -> list[Target]:
    """Targets that name the whole workflow a held result (task or group) belongs to.

    ``("root", held id)`` reaches every task whose later work includes it
    (the worker checks that), and the workflow's top covers the rest by
    root id.
    """
    targets: list[Target] = [] if is_group_result(node) else [("root", node.id)]
    return targets + tree_targets(_top(node))


def tree_targets(top: Any) -> list[Target]:
    """Targets that name every task sent from ``top`` on (a task, or a group)."""
    if not is_group_result(top):
        return [("root", top.id)]
    # A group's members carry its id, but the first link of a chain inside
    # a group does not (Celery gives it no group, and its own id as root id):
    # such a chain is named by its first link.
    targets: list[Target] = [("group", top.id)]
    for member in top.results or ():
        if is_group_result(member):
            targets.extend(tree_targets(member))
        elif getattr(member, "parent", None) is not None:
            targets.extend(tree_targets(_top(member)))
    return targets


def _succeeded(node: Any) -> bool:
    if is_group_result(node):
        return all(_succeeded(member) for member in node.results or ())
    return bool(node.state == states.SUCCESS)


def _leaf_ids(node: Any) -> list[str]:
    """Every task id inside a result node (a group's members and their chains)."""
    if is_group_result(node):
        ids: list[str] = []
        for member in node.results or ():
            ids.extend(_leaf_ids(member))
        return ids
    # The chain that ends at this task, up to the group it started in.
    return [step.id for step in itertools.takewhile(_is_task_result, _lineage(node))]


def _is_task_result(node: Any) -> bool:
    return not is_group_result(node)


def tree_ids(node: Any, *, whole: bool = False) -> list[str]:
    """Task ids of a held result: a task's id, a group's members (and their chains).

    With ``whole``, also every result before it (its ``.parent`` links, and
    theirs), first task first: the part of its workflow the client holds.
    """
    nodes = list(reversed(_lineage(node))) if whole else [node]
    ids: list[str] = []
    for step in nodes:
        ids.extend(_leaf_ids(step) if is_group_result(step) else [step.id])
    return list(dict.fromkeys(ids))


def unsent_ids(tree: Any) -> list[str]:
    """Ids in a held result tree that cannot have been sent yet.

    Celery sends a chain link (or a chord's body, or a group after a link)
    only when the result before it succeeded; so every node after the first
    one whose predecessor has not succeeded is unsent, and after the
    cancellation it never will be.  Reads one state per node climbed (a
    group's members until the first that has not succeeded).
    """
    path = _lineage(tree)
    for i in range(len(path) - 1, 0, -1):
        if not _succeeded(path[i]):
            ids: list[str] = []
            for node in path[:i]:
                if is_group_result(node):
                    ids.extend(_leaf_ids(node))
                else:
                    ids.append(node.id)
            return ids
    return []


def resolve_id(backend: Any, task_id: str) -> tuple[list[Target], dict[str, str]]:
    """Targets for ``cancel(id, workflow=True)`` from what the result backend knows.

    ``("root", id)`` always: workers cancel every task whose id or root id
    it is, or whose later work includes it.  The backend stores a task's
    parent id and group id once the task has a state; we climb the parent
    ids to the workflow's first task and name it by root id, and name every
    group met on the way (a member of a top-level group has no parent).  A
    task with no stored state (still queued, or not sent) tells us nothing
    more.  Also returns the states seen on the way, by task id.
    """
    targets: list[Target] = [("root", task_id)]
    states_seen: dict[str, str] = {}
    current, climbed = task_id, {task_id}
    groups: list[str] = []
    for _ in range(_MAX_CLIMB):
        try:
            meta = backend.get_task_meta(current)
        except Exception:  # noqa: BLE001 - an unknown id is not an error here
            break
        if meta.get("status") != states.PENDING:
            states_seen[current] = str(meta.get("status"))
        group_id = meta.get("group_id")
        if isinstance(group_id, str) and group_id:
            groups.append(group_id)
        parent_id = meta.get("parent_id")
        if not isinstance(parent_id, str) or not parent_id or parent_id in climbed:
            break
        climbed.add(parent_id)
        current = parent_id
    if current != task_id:
        targets.append(("root", current))
    targets.extend(("group", group_id) for group_id in groups)
    return targets, states_seen


def workflow_targets(app: Any, task_ids: Iterable[str]) -> tuple[list[Target], dict[str, str]]:
    """The targets ``cancel(task_ids, workflow=True)`` records, and the states seen on the way.

    For ``celery cancel --workflow``, which reports on what it found.
    """
    targets: list[Target] = []
    states_seen: dict[str, str] = {}
    for task_id in dict.fromkeys(task_ids):
        found, seen = resolve_id(app.backend, task_id)
        targets.extend(found)
        states_seen.update(seen)
    return list(dict.fromkeys(targets)), states_seen
