"""``celery cancel``: cancel tasks from the command line, and say what happened.

Registered through the ``celery.commands`` entry point, so it runs as
``celery -A proj cancel ID [ID ...] [--reason TEXT]``, or
``celery -A proj cancel --workflow ID [ID ...]`` to cancel the whole
workflow each id belongs to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
from celery import states
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from kombu.exceptions import OperationalError

from ._client import BrokerUnavailableError
from ._client import cancel as cancel_tasks
from ._receipt import Outcome
from ._revokes import MEMBERS_COMMAND
from ._runtime import runtime
from ._settings import SettingError
from ._workflow import workflow_targets

__all__ = ["cancel"]


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
@click.option(
    "--workflow",
    cls=CeleryOption,
    is_flag=True,
    default=False,
    help="Cancel the whole workflow (chain, group, chord) each id belongs to.",
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
    workflow: bool,
    **kwargs: Any,
) -> None:
    """Cancel tasks by id and report, per id, what it was doing.

    Running @cancellable tasks stop at their next checkpoint and end as
    REVOKED; queued tasks will not run; finished tasks are left alone (not
    recorded, not broadcast).  Prints each task's outcome (the receipt's:
    discarded before it started, stopped at a checkpoint, interrupted,
    terminated, finished, finished without observing the cancellation,
    still running, queued, unknown).  Ids no online worker knows are still
    recorded (they will not run if they are queued somewhere), reported as
    unknown, and make the exit status 1.
    """
    app = ctx.obj.app
    ids = list(dict.fromkeys(task_ids))
    empty = [task_id for task_id in ids if not task_id.strip()]
    if empty:
        raise click.BadParameter("a task id must be a non-empty string", param_hint="TASK_IDS")
    _say_not_durable(app)
    if workflow:
        _cancel_workflows(ctx, ids, reason, requested_by, wait, timeout, grace)
        return
    try:
        with app.pool.acquire(block=True) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2)
        receipt = cancel_tasks(ids, reason, requested_by=requested_by, app=app, grace=grace)
    except OperationalError as exc:
        raise click.ClickException(
            f"cannot reach the broker or result backend: {exc}; nothing was cancelled"
        ) from exc
    except BrokerUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc
    # The same outcomes as CancelReceipt.wait() gives a caller of cancel().
    outcomes = receipt.wait(wait, workers_timeout=timeout)
    for outcome in outcomes:
        line = outcome.describe()
        if outcome.outcome is Outcome.RUNNING:
            line = f"still running after {wait:g}s (no checkpoint reached yet)"
        click.echo(f"{outcome.task_id}: {line}")
    unknown = sum(1 for outcome in outcomes if outcome.outcome is Outcome.UNKNOWN)
    if unknown:
        click.echo(f"{unknown} of {len(ids)} task id(s) unknown", err=True)
        ctx.exit(1)


def _members(app: Any, targets: list[Any], timeout: float) -> tuple[dict[str, str], set[str]]:
    """Tasks online workers hold that ``targets`` name, and their parents' ids.

    Returns ``({id: "active" | "reserved"}, {parent id, ...})``.
    """
    found: dict[str, str] = {}
    parents: set[str] = set()
    replies = app.control.broadcast(
        MEMBERS_COMMAND,
        arguments={"targets": [list(t) for t in targets]},
        reply=True,
        timeout=timeout,
    )
    for reply in replies or []:
        for held in reply.values():
            for task_id, (state, parent_id) in (
                (held or {}).items() if isinstance(held, dict) else ()
            ):
                if state == "active" or task_id not in found:
                    found[task_id] = str(state)
                if isinstance(parent_id, str) and parent_id:
                    parents.add(parent_id)
    return found, parents


def _cancel_workflows(
    ctx: click.Context,
    ids: list[str],
    reason: str | None,
    requested_by: str | None,
    wait: float,
    timeout: float,
    grace: float | None = None,
) -> None:
    """``--workflow``: cancel each id's workflow and say what was found in it.

    Members found: the tasks online workers hold that the workflow's targets
    name (running or queued), and the tasks the result backend knows from
    climbing the parent ids of the given id and of those held tasks
    (finished ones are counted as finished).
    """
    app = ctx.obj.app
    try:
        with app.pool.acquire(block=True) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2)
        found = {}
        for task_id in ids:
            targets, seen = workflow_targets(app, [task_id])
            members, parents = _members(app, targets, timeout)
            if parents:
                # The members' parents (finished links before them) and theirs.
                _more, earlier = workflow_targets(app, sorted(parents - set(members)))
                seen = {**earlier, **seen}
            found[task_id] = (members, seen)
        receipt = cancel_tasks(
            ids, reason, requested_by=requested_by, app=app, workflow=True, grace=grace
        )
    except OperationalError as exc:
        raise click.ClickException(
            f"cannot reach the broker or result backend: {exc}; nothing was cancelled"
        ) from exc
    except BrokerUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc

    running = {t for members, _seen in found.values() for t, s in members.items() if s == "active"}
    # Every task of the workflows that is known, with the receipt's outcome.
    known = [*receipt.task_ids]
    for members, seen in found.values():
        known.extend([*members, *seen])
    outcomes = dataclasses.replace(receipt, task_ids=tuple(dict.fromkeys(known))).wait(
        wait, workers_timeout=timeout
    )
    by_id = {outcome.task_id: outcome for outcome in outcomes}
    not_ended = (Outcome.RUNNING, Outcome.QUEUED, Outcome.UNKNOWN)
    stopped = {t for t in running if by_id[t].outcome not in not_ended}

    unknown = 0
    for task_id in ids:
        members, seen = found[task_id]
        active = [t for t, s in members.items() if s == "active"]
        queued = [t for t, s in members.items() if s != "active"]
        finished = [t for t, s in seen.items() if s in states.READY_STATES and t not in members]
        if not members and not seen:
            unknown += 1
            click.echo(
                f"{task_id}: workflow unknown (no online worker holds a task of it and the "
                "result backend knows nothing of it); recorded, so nothing of it will run"
            )
            continue
        parts = []
        if active:
            done = len([t for t in active if t in stopped])
            still = len(active) - done
            text = f"{len(active)} running ({done} stopped"
            text += f", {still} still running after {wait:g}s)" if still else ")"
            parts.append(text)
        parts.append(f"{len(queued)} queued (will not run)")
        parts.append(f"{len(finished)} finished")
        click.echo(f"{task_id}: workflow cancelled: " + ", ".join(parts))
        for member in dict.fromkeys([*members, *seen]):
            click.echo(f"  {member}: {by_id[member].describe()}")
    if unknown:
        click.echo(f"{unknown} of {len(ids)} workflow id(s) unknown", err=True)
        ctx.exit(1)


def _say_not_durable(app: Any) -> None:
    # The same words as cancel()'s NotDurableWarning (which, once per process
    # and app, is then not issued again by this command).
    try:
        why = runtime().ledgers.not_durable_once(app)
    except (SettingError, ValueError):
        return  # a bad setting: cancel() reports it
    if why is not None:
        click.echo(f"warning: {why}", err=True)
