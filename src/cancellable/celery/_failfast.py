"""Fail fast: when one member of a group fails, cancel the rest of its group.

Opt in per task with the task option ``cancel_siblings_on_failure=True``
(``@app.task(cancel_siblings_on_failure=True)``), or for every task of an
app with the setting ``cancellable_cancel_siblings_on_failure = True`` (a
task option wins over the setting).

When such a task fails for good (Celery's ``task_failure`` signal: no retry
left) and it is a member of a group (its request carries a group id), the
process that ran it records one ``group`` target in the ledger and
broadcasts it, exactly as ``cancel(group_result)`` would: running
``@cancellable`` siblings stop at their next checkpoint, queued ones never
run, and all of them end REVOKED with a reason that names the member that
failed.  The failed member itself stays FAILURE.  The target also goes
into the failing process's own index at once, so the next sibling that
process picks up is skipped even if the broadcast is still on its way.  A chord's header is a
group, so a failed header member also ends the chord: its body is REVOKED
by the first sibling that ends cancelled (see `cancellable.celery._workflow`).
"""

from __future__ import annotations

from typing import Any, Final

from celery import signals

from .._exceptions import CancelReason
from .._log import logger
from ..events import CANCEL_DELIVERY_FAILED, SIBLINGS_CANCELLED
from ._ledger import Target
from ._runtime import runtime
from ._settings import SettingError, settings_for

__all__ = ["OPTION", "SETTING", "install", "wants_fail_fast"]

#: The task option.
OPTION: Final = "cancel_siblings_on_failure"

#: The app setting (the default for tasks that do not set the option).
SETTING: Final = "cancellable_cancel_siblings_on_failure"


class _Installed:
    """Whether the receiver is connected in this process."""

    done = False


def wants_fail_fast(task: Any) -> bool:
    """Does ``task`` cancel its group's other members when it fails?"""
    chosen = getattr(task, OPTION, None)
    if chosen is None:
        app = getattr(task, "app", None)
        try:
            chosen = settings_for(app).cancel_siblings_on_failure if app is not None else None
        except SettingError:
            return False  # a worker of this app does not start; an eager run does not fail fast
    return bool(chosen)


def _on_failure(sender: Any = None, task_id: Any = None, exception: Any = None, **_: Any) -> None:
    task = sender
    if task is None or not wants_fail_fast(task):
        return
    request = getattr(task, "request", None)
    group_id = getattr(request, "group", None)
    if not isinstance(group_id, str) or not group_id or getattr(request, "is_eager", False):
        return
    from . import _client

    reason = CancelReason(
        source="revoked",
        message=f"group member {task_id} failed: {type(exception).__name__}: {exception}"[:500],
    )
    target: list[Target] = [("group", group_id)]
    # This process first: the sibling a prefork child (or a threads worker)
    # picks up next must not start before the broadcast reaches the worker.
    runtime().tasks.index.add(target, reason)
    try:
        _client.cancel_targets(task.app, [], target, reason)
    except Exception as exc:  # noqa: BLE001 - a failing task must still end as FAILURE
        logger.error(CANCEL_DELIVERY_FAILED, task_id=task_id, group=group_id, error=repr(exc))
        return
    logger.info(SIBLINGS_CANCELLED, task_id=task_id, task_name=task.name, group=group_id)


def install() -> None:
    """Listen for task failures (idempotent)."""
    if not _Installed.done:
        _Installed.done = True
        signals.task_failure.connect(_on_failure, weak=False)
