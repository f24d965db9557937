"""The private names of `cancellable` that the benchmarks read, all in this one module.

Every other benchmark module uses only the public API (`cancellable`,
`cancellable.celery`).  The bulk-cancellation part needs three things that
no public name gives, and reads them here:

* the size of a worker main process's cancellation index (`index_size`, in
  the ``cancellable_bench_index`` inspect command of ``bench_app.py``);
* the index's class, to count its bytes per entry (`new_index`);
* the two round trips of ``cancel()`` before its broadcast, to time them
  apart (`cancel_steps`: the broker check and the ledger write).

When the library moves one of them, the accessor raises `PrivateNameMoved`
and the results that need it are reported as skipped with its message:
update this module, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PrivateNameMoved(RuntimeError):
    """A private name of `cancellable` that a benchmark reads is not where it was."""


def _load(module: str, name: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PrivateNameMoved(f"{module}.{name} is gone ({exc}): update _internals.py") from exc


def index_size() -> int:
    """Targets in this process's cancellation index (a worker's main process)."""
    return len(_load("cancellable.celery._index", "index"))


def new_index() -> Any:
    """An empty index of the class the worker fills (``add(targets, reason)``)."""
    return _load("cancellable.celery._index", "TargetIndex")()


def cancel_steps(app: Any, reason: Any) -> dict[str, Callable[[str], None]]:
    """``cancel()``'s broker check and ledger write for ``app``, each a call on one task id."""
    check_broker = _load("cancellable.celery._api", "_check_broker")
    ledger = _load("cancellable.celery._ledger", "ledger_for")(app)

    def check(task_id: str) -> None:
        with app.pool.acquire(block=True) as conn:
            check_broker(conn, app)

    def record(task_id: str) -> None:
        ledger.record([("task", task_id)], reason)

    return {"broker_check_us": check, "ledger_record_us": record}
