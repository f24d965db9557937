"""Runtime objects for the Celery unit tests: each test builds its own.

`running_worker` makes a `~cancellable.celery._runtime.WorkerRuntime`,
makes it this process's worker runtime (as a worker's bootstep does when it
starts) and removes it afterwards, so the patched Celery methods act for
it; nothing else of the process is touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from cancellable.celery._activation import install_patches
from cancellable.celery._runtime import WorkerRuntime, install_worker, remove_worker

__all__ = ["running_worker"]


@contextlib.contextmanager
def running_worker(app: Any, **kwargs: Any) -> Iterator[WorkerRuntime]:
    """A fresh, active worker runtime for ``app`` (``WorkerRuntime`` arguments in ``kwargs``)."""
    install_patches()
    rt = WorkerRuntime(app, **kwargs)
    install_worker(rt)
    rt.active = True
    try:
        yield rt
    finally:
        rt.active = False
        if rt.poller is not None:
            rt.poller.stop()
            rt.poller = None
        remove_worker(rt)
