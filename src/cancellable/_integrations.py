"""Activating the optional integrations when their framework is imported.

The core never imports an integration.  Instead, importing `cancellable`
registers a post-import hook by module name (`wrapt.when_imported`): the
moment the program imports ``celery`` (or at once, if it already has),
`cancellable.celery` is imported and registers its task runner with the
core (`cancellable._decorator.register_task_runner`) and its worker-side
signal handlers with Celery.  A program that never imports Celery never
loads the integration, and no worker flag is needed in one that does.

In a worker this happens while the main process imports Celery, long before
the pool forks its children, so every child inherits the installed machinery.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import wrapt

__all__ = ["INTEGRATIONS", "register_all"]

#: Framework module name -> the integration module activated when it is imported.
INTEGRATIONS = {"celery": "cancellable.celery"}

_registered = False


def _activator(integration: str) -> Callable[[ModuleType], None]:
    def activate(module: ModuleType) -> None:
        importlib.import_module(integration)

    return activate


def register_all() -> None:
    """Register the post-import hook of every integration (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    for framework, integration in INTEGRATIONS.items():
        wrapt.register_post_import_hook(_activator(integration), framework)
