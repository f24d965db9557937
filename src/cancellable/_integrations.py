"""Activating the optional integrations when their framework is imported.

The core never imports an integration.  Instead, importing `cancellable`
registers a post-import hook by module name (`wrapt.when_imported`): the
moment the program imports ``celery`` (or at once, if it already has),
`cancellable.celery` is imported and registers its task runner with the
core (`cancellable._decorator.register_task_runner`) and one receiver of
Celery's ``worker_init`` signal.  It patches nothing: a worker installs what
it needs when it starts (see `cancellable.celery._activation`).  A program
that never imports Celery never loads the integration, and no worker flag is
needed in one that does.

In a worker this happens while the main process imports Celery, long before
the worker is built, so ``worker_init`` is heard.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import wrapt

__all__ = ["INTEGRATIONS", "register_all"]

#: Framework module name -> the integration module activated when it is imported.
INTEGRATIONS = {"celery": "cancellable.celery"}


class _Registered:
    """Whether the hooks are registered in this process."""

    done = False


def _activator(integration: str) -> Callable[[ModuleType], None]:
    def activate(module: ModuleType) -> None:
        importlib.import_module(integration)

    return activate


def register_all() -> None:
    """Register the post-import hook of every integration (idempotent)."""
    if _Registered.done:
        return
    _Registered.done = True
    for framework, integration in INTEGRATIONS.items():
        wrapt.register_post_import_hook(_activator(integration), framework)
