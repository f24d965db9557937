"""Helpers for testing code that uses `cancellable`.

Nothing here is needed in production code; import it from your tests::

    from cancellable.testing import cancel_after, capture_events

    def test_cleanup_runs_when_cancelled():
        with capture_events() as events, cancel_after(3) as scope:
            process_items(range(100))  # calls checkpoint() once per item

        assert scope.cancelled_caught
        assert "scope.cancelled" in [e["event"] for e in events]

`cancel_after` makes cancellation deterministic: instead of racing a timer or a
second thread, the scope is cancelled at an exact checkpoint.
`count_checkpoints` tells you how often your code checks, and
`capture_events` collects the structured log events the library emits.

The helpers that watch checkpoints (`cancel_after`, `count_checkpoints`)
make every `~cancellable.checkpoint` in the process take the slow path while
they are active, so keep them out of benchmarks.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Final

import structlog
import structlog.testing

from . import _scope, events
from ._exceptions import CancelReason
from ._scope import CancelScope

__all__ = [
    "CheckpointCounter",
    "cancel_after",
    "capture_events",
    "count_checkpoints",
]

#: Every event name in `cancellable.events` (``LOGGER_NAME`` is not an event).
_EVENT_NAMES: Final = frozenset(
    getattr(events, name) for name in events.__all__ if name != "LOGGER_NAME"
)


@contextlib.contextmanager
def _installed(probe: Callable[[], object]) -> Iterator[None]:
    # A probe is called at every checkpoint in the process (on whichever
    # thread), before the checkpoint looks at its scope; installing one keeps
    # the process-wide pending flag set so no checkpoint skips it.
    _scope.add_probe(probe)
    try:
        yield
    finally:
        _scope.remove_probe(probe)


@contextlib.contextmanager
def cancel_after(
    n: int,
    reason: CancelReason | str | None = None,
) -> Iterator[CancelScope]:
    """Open a `~cancellable.CancelScope` that cancels itself at its *n*-th checkpoint.

    Only checkpoints reached inside the block on the calling thread count
    (including those inside nested scopes and ``@cancellable`` calls); the
    *n*-th one raises `~cancellable.Cancelled`, and the scope catches it
    like any scope catches its own cancellation, so execution continues
    after the ``with`` block.  `~cancellable.is_cancelled` calls do not
    count; ``with checkpoint():`` counts twice (it checks on entry and on
    exit).

    Args:
        n: Which checkpoint raises; 1 means the first.
        reason: The reason to cancel with (a `~cancellable.CancelReason` or a
            message); defaults to a manual reason naming this helper.

    Yields:
        The scope.  Its ``cancelled_caught`` tells whether the block was cut
        short; ``cancel_called`` whether the *n*-th checkpoint was reached.

    Raises:
        TypeError: ``n`` is not an int, or ``reason`` has the wrong type.
        ValueError: ``n`` is less than 1.

    .. versionadded:: 0.1.0
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"cancel_after() needs an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"cancel_after() counts checkpoints from 1, got {n}")
    if reason is None:
        cancel_reason = CancelReason(message=f"cancel_after({n})")
    else:
        cancel_reason = CancelReason.coerce(reason)
    owner = threading.get_ident()
    seen = 0

    with CancelScope() as scope:

        def probe() -> None:
            nonlocal seen
            if threading.get_ident() != owner or not _scope.is_entered(scope):
                return
            seen += 1
            if seen == n:
                scope.cancel(cancel_reason)

        with _installed(probe):
            yield scope


class CheckpointCounter:
    """How many checkpoints a thread reached; made by `count_checkpoints`.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        #: The number of checkpoints reached so far.
        self.count = 0

    def __repr__(self) -> str:
        return f"<CheckpointCounter count={self.count}>"


@contextlib.contextmanager
def count_checkpoints() -> Iterator[CheckpointCounter]:
    """Count the checkpoints the calling thread reaches inside the block.

    Checkpoints count inside and outside cancel scopes;
    `~cancellable.is_cancelled` calls do not count, and ``with checkpoint():``
    counts twice (entry and exit).
    Use it to check that a loop really checks for cancellation::

        with count_checkpoints() as counter:
            process_items(range(10))
        assert counter.count >= 10

    Yields:
        A `CheckpointCounter` whose ``count`` grows as checkpoints run.

    .. versionadded:: 0.1.0
    """
    counter = CheckpointCounter()
    owner = threading.get_ident()

    def probe() -> None:
        if threading.get_ident() == owner:
            counter.count += 1

    with _installed(probe):
        yield counter


def _keep_cancellable_events(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if event_dict.get("event") not in _EVENT_NAMES:
        raise structlog.DropEvent
    return event_dict


@contextlib.contextmanager
def capture_events() -> Iterator[list[MutableMapping[str, Any]]]:
    """Collect the structlog events `cancellable` emits inside the block.

    A wrapper around `structlog.testing.capture_logs` that keeps only the
    events named in `cancellable.events`, so assertions are not disturbed by
    your own logging.  The list fills as events happen, also events logged
    on other threads (a deadline firing on the timer thread, for example).
    Each entry is the event dict: ``event`` (the name), ``log_level`` and
    the event's fields.

    Like ``capture_logs``, it replaces the configured processors while the
    block runs, and does not work with loggers cached by
    ``cache_logger_on_first_use=True``.

    Yields:
        The list of captured event dicts, oldest first.

    .. versionadded:: 0.1.0
    """
    with structlog.testing.capture_logs(processors=[_keep_cancellable_events]) as captured:
        yield captured
