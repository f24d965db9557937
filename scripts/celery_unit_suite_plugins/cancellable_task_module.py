"""pytest plugin for ``scripts/celery_unit_suite.py``: import a module with a ``@cancellable`` task.

Loaded with ``-p cancellable_task_module`` before Celery's tests are collected,
as a project's tasks module would be imported: an app of its own (not made
the current app, so Celery's tests keep theirs), a ``@cancellable`` task on
it, and the app finalized so the task object is built.
"""

from __future__ import annotations

from celery import Celery

from cancellable import cancellable, checkpoint, on_cancel

app = Celery("cancellable-probe", set_as_current=False)


@app.task(bind=True, name="cancellable_probe.count")
@cancellable(timeout=60)
def count(self: object, n: int) -> int:
    """Reach ``n`` checkpoints; return ``n``."""
    on_cancel(lambda: None)
    for _ in range(n):
        checkpoint()
    return n


app.finalize()
