"""``celery cancel``: cancel tasks from the command line, and say what happened.

Registered through the ``celery.commands`` entry point, so it runs as
``celery -A proj cancel ID [ID ...] [--reason TEXT]``.
"""

from __future__ import annotations

import time
from typing import Any

import click
from celery import states
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from kombu.exceptions import OperationalError

from ._api import BrokerUnavailableError
from ._api import cancel as cancel_tasks

__all__ = ["cancel"]


def _where(app: Any, task_ids: list[str], timeout: float) -> dict[str, str]:
    """Which of ``task_ids`` are running or waiting on an online worker."""
    found: dict[str, str] = {}
    replies = app.control.inspect(timeout=timeout).query_task(*task_ids) or {}
    for tasks in replies.values():
        for task_id, (state, _info) in (tasks or {}).items():
            if state == "active" or task_id not in found:
                found[task_id] = state
    return found


@click.command(cls=CeleryCommand)
@click.argument("task_ids", nargs=-1, required=True)
@click.option(
    "--reason", cls=CeleryOption, default=None, help="Why (stored with the REVOKED state)."
)
@click.option("--by", "requested_by", cls=CeleryOption, default=None, help="Who is cancelling.")
@click.option(
    "--grace",
    cls=CeleryOption,
    type=float,
    default=None,
    help="Seconds to stop at a checkpoint before the task is interrupted, then terminated.",
)
@click.option(
    "--wait",
    cls=CeleryOption,
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for running tasks to stop.",
)
@click.option(
    "--timeout",
    cls=CeleryOption,
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds to wait for workers to answer.",
)
@click.pass_context
@handle_preload_options
def cancel(
    ctx: click.Context,
    task_ids: tuple[str, ...],
    reason: str | None,
    requested_by: str | None,
    grace: float | None,
    wait: float,
    timeout: float,
    **kwargs: Any,
) -> None:
    """Cancel tasks by id and report, per id, what it was doing.

    Running @cancellable tasks stop at their next checkpoint and end as
    REVOKED; queued tasks will not run; finished tasks are left alone (not
    recorded, not broadcast).  Ids no online worker knows are still recorded
    (they will not run if they are queued somewhere), reported as unknown,
    and make the exit status 1.
    """
    app = ctx.obj.app
    ids = list(dict.fromkeys(task_ids))
    empty = [task_id for task_id in ids if not task_id.strip()]
    if empty:
        raise click.BadParameter("a task id must be a non-empty string", param_hint="TASK_IDS")
    try:
        with app.pool.acquire(block=True) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2)
        before = {task_id: app.AsyncResult(task_id).state for task_id in ids}
        where = _where(app, ids, timeout)
    except OperationalError as exc:
        raise click.ClickException(
            f"cannot reach the broker or result backend: {exc}; nothing was cancelled"
        ) from exc
    to_cancel = [t for t in ids if before[t] not in states.READY_STATES]
    try:
        if to_cancel:
            cancel_tasks(to_cancel, reason, requested_by=requested_by, app=app, grace=grace)
    except BrokerUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc

    # "stopped" is read from the stored state: the worker running a task
    # stores REVOKED only after its cleanup hooks ran (cancel() does not let
    # idle workers write an early REVOKED).
    running = [t for t in to_cancel if where.get(t) == "active"]
    stopped: set[str] = set()
    deadline = time.monotonic() + wait
    while running and time.monotonic() < deadline:
        for task_id in running:
            if app.AsyncResult(task_id).state in states.READY_STATES:
                stopped.add(task_id)
        if stopped.issuperset(running):
            break
        time.sleep(0.05)

    unknown = 0
    for task_id in ids:
        if before[task_id] in states.READY_STATES:
            line = f"finished ({before[task_id]}); nothing to cancel"
        elif task_id in running:
            if task_id in stopped:
                final = app.AsyncResult(task_id).state
                line = f"running; stopped ({final})"
            else:
                line = f"running; still running after {wait:g}s (no checkpoint reached yet)"
        elif where.get(task_id) in ("reserved", "scheduled"):
            line = f"queued ({where[task_id]} by a worker); will not run"
        elif before[task_id] != states.PENDING:
            line = f"queued ({before[task_id]}); will not run"
        else:
            unknown += 1
            line = "unknown (not seen by any online worker); recorded, so it will not run if queued"
        click.echo(f"{task_id}: {line}")
    if unknown:
        click.echo(f"{unknown} of {len(ids)} task id(s) unknown", err=True)
        ctx.exit(1)
