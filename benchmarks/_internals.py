"""The private names of `cancellable` that the benchmarks read, all in this one module.

Every other benchmark module uses only the public API (`cancellable`,
`cancellable.celery`).  The bulk-cancellation part needs three things that
no public name gives, and reads them here:

* the size of a worker main process's cancellation index (`index_size`, in
  the ``cancellable_bench_index`` inspect command of ``bench_app.py``), from
  the process's runtime object or, in the layout before it, a module global;
* the index's class, to count its bytes per entry (`new_index`);
* the two round trips of ``cancel()`` before its broadcast, to time them
  apart (`cancel_steps`: the broker check and the ledger write).

Each accessor knows the layout of ``cancellable.celery`` with a runtime
object (``_runtime.runtime()``, ``_client``) and the one before it
(module globals, ``_api``).

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


def _runtime() -> Any:
    # The process's runtime object (cancellable.celery._runtime), where the
    # library has one; PrivateNameMoved where it has module globals instead.
    return _load("cancellable.celery._runtime", "runtime")()


def index_size() -> int:
    """Targets in this process's cancellation index (a worker's main process)."""
    try:
        worker = _runtime().worker
    except PrivateNameMoved:
        return len(_load("cancellable.celery._index", "index"))
    if worker is None:
        raise PrivateNameMoved("this process runs no worker: no index to measure")
    return len(worker.index)


def new_index() -> Any:
    """An empty index of the class the worker fills (``add(targets, reason)``)."""
    return _load("cancellable.celery._index", "TargetIndex")()


def cancel_steps(app: Any, reason: Any) -> dict[str, Callable[[str], None]]:
    """``cancel()``'s broker check and ledger write for ``app``, each a call on one task id."""
    try:
        check_broker = _load("cancellable.celery._client", "_check_broker")
        ledger = _runtime().ledgers.get(app)
    except PrivateNameMoved:
        check_broker = _load("cancellable.celery._api", "_check_broker")
        ledger = _load("cancellable.celery._ledger", "ledger_for")(app)

    def check(task_id: str) -> None:
        with app.pool.acquire(block=True) as conn:
            check_broker(conn, app)

    def record(task_id: str) -> None:
        ledger.record([("task", task_id)], reason)

    return {"broker_check_us": check, "ledger_record_us": record}
