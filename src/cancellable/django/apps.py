"""The Django app config of `cancellable.django` (found by Django, not imported by you)."""

from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate

__all__ = ["CancellableConfig"]


class CancellableConfig(AppConfig):
    """Adds the cancel action to the registered ``TaskResult`` admin when Django starts."""

    name = "cancellable.django"
    label = "cancellable_django"
    verbose_name = "cancellable"

    def ready(self) -> None:
        """Install the action and have ``migrate`` create the permission."""
        from . import _admin

        _admin.install()
        post_migrate.connect(_admin.create_permission, dispatch_uid="cancellable.django")
