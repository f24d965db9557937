"""The admin action, the permission, and how they are added to the ``TaskResult`` admin."""

from __future__ import annotations

from typing import Any, Final

from django.apps import apps as global_apps
from django.conf import settings
from django.contrib import admin, messages
from django.db import DEFAULT_DB_ALIAS
from django.utils.html import format_html, format_html_join
from django.utils.module_loading import import_string

from ..celery import BrokerUnavailableError, CancelReceipt, Outcome, TaskOutcome, cancel
from . import PERMISSION

__all__ = ["CancelTasksMixin", "create_permission", "install"]

_APP_LABEL, CODENAME = PERMISSION.split(".")

#: Seconds the action waits for the tasks to end before it reports (a running
#: task usually stops within milliseconds); ``CANCELLABLE_ADMIN_WAIT`` overrides it.
DEFAULT_WAIT: Final = 2.0

#: At most this many tasks are listed one by one in the message.
LISTED: Final = 50


def _celery_app() -> Any:
    """``CANCELLABLE_CELERY_APP`` (an app or its dotted path), or None for the current app."""
    app = getattr(settings, "CANCELLABLE_CELERY_APP", None)
    return import_string(app) if isinstance(app, str) else app


class CancelTasksMixin:
    """Adds the *Cancel selected tasks* action to a ``TaskResult`` admin class."""

    opts: Any

    @admin.action(permissions=["cancel"], description="Cancel selected tasks")
    def cancel_selected_tasks(self, request: Any, queryset: Any) -> None:
        """Cancel the selected tasks and report each one's outcome."""
        task_ids = list(dict.fromkeys(queryset.values_list("task_id", flat=True)))
        if not task_ids:
            return
        user = request.user.get_username()
        try:
            receipt = cancel(
                task_ids,
                "cancelled in the Django admin",
                requested_by=user,
                app=_celery_app(),
            )
        except (BrokerUnavailableError, RuntimeError) as exc:
            messages.error(request, f"Nothing was cancelled: {exc}")
            return
        wait = float(getattr(settings, "CANCELLABLE_ADMIN_WAIT", DEFAULT_WAIT))
        outcomes = receipt.wait(wait, workers_timeout=min(1.0, wait))
        messages.add_message(request, _level(outcomes), _report(receipt, outcomes, user))

    def has_cancel_permission(self, request: Any) -> bool:
        """Whether the user may cancel tasks (`cancellable.django.PERMISSION`)."""
        return bool(request.user.has_perm(PERMISSION))


def _level(outcomes: list[TaskOutcome]) -> int:
    if any(o.outcome in (Outcome.RUNNING, Outcome.UNKNOWN) for o in outcomes):
        return int(messages.WARNING)
    return int(messages.SUCCESS)


def _report(receipt: CancelReceipt, outcomes: list[TaskOutcome], user: str) -> Any:
    cancelled = sum(1 for o in outcomes if o.cancelled)
    finished = len(receipt.finished)
    head = format_html(
        "Cancellation requested by {} for {} task(s): {} cancelled, {} already finished "
        "(left alone).",
        user,
        len(outcomes),
        cancelled,
        finished,
    )
    rows = format_html_join(
        "", "<li><code>{}</code>: {}</li>", ((o.task_id, o.describe()) for o in outcomes[:LISTED])
    )
    more = f" and {len(outcomes) - LISTED} more" if len(outcomes) > LISTED else ""
    return format_html("{}<ul>{}</ul>{}", head, rows, more)


def install(site: Any = None) -> None:
    """Give the registered ``TaskResult`` admin the action (idempotent).

    The registered admin class (django-celery-results' own, or yours) is
    replaced by a subclass of it that adds `CancelTasksMixin`, so your
    customisations stay.
    """
    from django_celery_results.models import TaskResult

    site = admin.site if site is None else site
    if not site.is_registered(TaskResult):
        # Our app comes before admin.autodiscover(): register theirs now.
        import django_celery_results.admin  # noqa: F401

    if not site.is_registered(TaskResult):
        return
    registry: dict[Any, Any] = site._registry  # public since Django 5.0: get_model_admin()
    current = type(registry[TaskResult])
    if issubclass(current, CancelTasksMixin):
        return
    actions = [*(current.actions or ()), "cancel_selected_tasks"]
    cls = type(
        f"Cancellable{current.__name__}",
        (CancelTasksMixin, current),
        {"actions": actions, "__module__": __name__},
    )
    site.unregister(TaskResult)
    site.register(TaskResult, cls)


def create_permission(
    sender: Any, using: str = DEFAULT_DB_ALIAS, apps: Any = global_apps, **kwargs: Any
) -> None:
    """``post_migrate``: create `PERMISSION` once django-celery-results is migrated."""
    if getattr(sender, "label", None) != _APP_LABEL:
        return
    try:
        content_type_model = apps.get_model("contenttypes", "ContentType")
        permission_model = apps.get_model("auth", "Permission")
        task_result = apps.get_model(_APP_LABEL, "TaskResult")
    except LookupError:
        return
    content_type = content_type_model.objects.db_manager(using).get_for_model(task_result)
    permission_model.objects.using(using).get_or_create(
        content_type=content_type, codename=CODENAME, defaults={"name": "Can cancel task result"}
    )
