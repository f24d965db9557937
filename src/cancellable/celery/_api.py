"""The client side: `cancel` and `configure`."""

from __future__ import annotations

import contextlib
import dataclasses
import signal as signal_module
import warnings
from collections.abc import Iterable
from typing import Any

from .._config import validate_seconds
from .._exceptions import CancelReason
from .._log import logger
from ..events import LEDGER_UNAVAILABLE
from . import _ledger, _wakeup

__all__ = [
    "BrokerUnavailableError",
    "LedgerUnavailableWarning",
    "cancel",
    "configure",
    "install_client_side",
]


class BrokerUnavailableError(ConnectionError):
    """`cancel` could not reach the broker; nothing was recorded or sent.

    .. versionadded:: 0.1.0
    """


class LedgerUnavailableWarning(UserWarning):
    """The cancellation was broadcast but could not be recorded durably.

    Online workers still stop the task; a worker that was offline or restarts
    before it receives the task may run it.

    .. versionadded:: 0.1.0
    """


def _collect(task_or_id: object, ids: list[str], apps: list[Any]) -> None:
    if isinstance(task_or_id, str):
        if not task_or_id.strip():
            raise ValueError("a task id must be a non-empty string")
        ids.append(task_or_id)
        return
    if task_or_id is None:
        raise TypeError("cancel() needs a task id, an AsyncResult or a list of them, got None")
    results = getattr(task_or_id, "results", None)
    if results is not None and hasattr(task_or_id, "revoke"):
        # A GroupResult: its members (and nested groups).
        apps.append(getattr(task_or_id, "app", None))
        for member in results:
            _collect(member, ids, apps)
        return
    task_id = getattr(task_or_id, "id", None)
    if isinstance(task_id, str) and hasattr(task_or_id, "revoke"):
        apps.append(getattr(task_or_id, "app", None))
        _collect(task_id, ids, apps)
        return
    if isinstance(task_or_id, (list, tuple, set, frozenset)):
        for item in task_or_id:
            _collect(item, ids, apps)
        return
    raise TypeError(
        "cancel() needs a task id (str), an AsyncResult, a GroupResult or a list of them, "
        f"got {type(task_or_id).__name__}"
    )


def cancel(
    task_or_id: str | Any | Iterable[str | Any],
    reason: CancelReason | str | None = None,
    *,
    requested_by: str | None = None,
    app: Any = None,
    grace: float | None = None,
) -> CancelReason:
    """Cancel Celery tasks, durably and with a reason.

    A queued or reserved task will not run; a running ``@cancellable`` task
    stops at its next checkpoint, runs its cleanup hooks and ends as REVOKED
    with ``reason`` in its `~celery.exceptions.TaskRevokedError`.  The
    cancellation is written to the ledger, so it is honoured by workers that
    are offline now or restart later, and by redelivered ``acks_late``
    messages.  It is also a standard ``revoke`` broadcast, so tasks that are
    not ``@cancellable`` are revoked the usual way.

    Args:
        task_or_id: A task id, an `~celery.result.AsyncResult`, a
            `~celery.result.GroupResult`, or a list of them.
        reason: A message `str`, a `~cancellable.CancelReason`, or None.
            A string becomes a reason with source ``"revoked"``.
        requested_by: Who is cancelling (a user, a service); stored with
            the reason.
        app: The Celery app; defaults to the result's app or the current app.
        grace: Seconds a running ``@cancellable`` task may take to stop at a
            checkpoint before it is interrupted, and later terminated (see
            :doc:`/grace`).  None: the task's ``@cancellable(grace=)``, else
            the app's ``cancellable_grace`` (default: cooperative only).

    Returns:
        The `~cancellable.CancelReason` that was recorded and sent.

    Raises:
        TypeError: ``task_or_id``, ``reason`` or ``grace`` has the wrong type.
        ValueError: An id is empty, the reason message is too long, or
            ``grace`` is negative, NaN or infinite.
        BrokerUnavailableError: The broker cannot be reached; nothing was
            recorded or sent.

    Warns:
        LedgerUnavailableWarning: The ledger is down; the broadcast was sent
            but the cancellation is not durable.

    .. versionadded:: 0.1.0
    """
    grace_s = validate_seconds(grace, "grace")
    ids: list[str] = []
    apps: list[Any] = []
    _collect(task_or_id, ids, apps)
    if not ids:
        raise ValueError("cancel() was given no task ids")
    ids = list(dict.fromkeys(ids))
    cancel_reason = CancelReason.coerce(reason, default_source="revoked")
    if requested_by is not None:
        cancel_reason = dataclasses.replace(cancel_reason, requested_by=requested_by)
    if app is None:
        app = next((a for a in apps if a is not None), None)
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()

    targets: list[_ledger.Target] = [("task", task_id) for task_id in ids]
    # A pooled connection: repeated cancels reuse one open connection.
    with app.pool.acquire(block=True) as conn:
        _check_broker(conn, app)
        try:
            _ledger.ledger_for(app).record(targets, cancel_reason, grace_s)
        except _ledger.LedgerError as exc:
            logger.warning(LEDGER_UNAVAILABLE, error=str(exc), task_ids=ids[:20])
            warnings.warn(
                f"cancellation of {len(ids)} task(s) sent to online workers but not recorded "
                f"durably: {exc}",
                LedgerUnavailableWarning,
                stacklevel=2,
            )
        app.control.broadcast(
            "revoke",
            arguments={
                "task_id": ids,
                "terminate": False,
                "signal": "SIGTERM",
                "cancellable": cancel_reason.to_dict(),
                "cancellable_grace": grace_s,
            },
            connection=conn,
        )
    return cancel_reason


#: Seconds `cancel` waits for the broker before it gives up.
BROKER_CHECK_TIMEOUT = 2.0


def _check_broker(conn: Any, app: Any) -> None:
    """Raise `BrokerUnavailableError` unless the broker answers within about 2 s.

    ``ensure_connection`` alone is not enough: on a pooled connection it
    returns at once (kombu's Redis transport always says it is connected),
    and the broadcast would then block in kombu's retry loop until the
    broker comes back.  So we also make the transport do a round trip: a
    ``PING`` for Redis, opening a channel for the others.
    """
    try:
        conn.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0.2, timeout=BROKER_CHECK_TIMEOUT
        )
        channel = conn.default_channel
        client = getattr(channel, "client", None)
        ping = getattr(client, "ping", None)
        if callable(ping):
            _ping_once(client)
    except Exception as exc:
        with contextlib.suppress(Exception):
            conn.collect()  # do not give the broken connection back to the pool
        raise BrokerUnavailableError(
            f"cannot reach the broker at {conn.as_uri()}: {exc}; nothing was cancelled"
        ) from exc


def _ping_once(client: Any) -> None:
    # One PING with a bounded wait and no retry, whatever the client's own
    # retry policy (redis-py retries connection errors with back-off).
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        connection = pool.get_connection("PING")
    try:
        connection.socket_timeout = BROKER_CHECK_TIMEOUT
        connection.socket_connect_timeout = BROKER_CHECK_TIMEOUT
        if connection._sock is not None:
            connection._sock.settimeout(BROKER_CHECK_TIMEOUT)
        connection.send_command("PING")
        connection.read_response()
    except Exception:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def install_client_side() -> None:
    """Make Celery's own ``Control.revoke`` durable too (idempotent).

    ``AsyncResult.revoke()``, ``GroupResult.revoke()`` and
    ``app.control.revoke()`` all end in ``Control.revoke``.  In a process
    where the integration is active, a revoke sent to every worker (no
    ``destination``, no ``terminate``) is also recorded in the ledger after
    Celery's broadcast, as ``cancel()`` records its own: so a plain revoke
    sent while no worker is online is not lost either.  A failure to record
    is logged (``ledger.unavailable``) and never fails Celery's call.
    """
    from celery.app.control import Control
    from celery.utils.functional import maybe_list

    original = Control.revoke
    if getattr(original, "_cancellable_original", None) is not None:
        return

    def revoke(
        self: Any,
        task_id: Any,
        destination: Any = None,
        terminate: bool = False,
        signal: Any = "SIGTERM",
        **kwargs: Any,
    ) -> Any:
        result = original(
            self, task_id, destination=destination, terminate=terminate, signal=signal, **kwargs
        )
        if destination is None and not terminate:
            ids = [str(t) for t in (maybe_list(task_id) or []) if t]
            try:
                _ledger.ledger_for(self.app).record(
                    [("task", t) for t in ids], CancelReason(source="revoked")
                )
            except _ledger.LedgerError as exc:
                logger.warning(LEDGER_UNAVAILABLE, error=str(exc), task_ids=ids[:20])
        return result

    revoke._cancellable_original = original  # type: ignore[attr-defined]
    revoke.__doc__ = original.__doc__
    Control.revoke = revoke


def configure(
    app: Any,
    *,
    ledger_url: str | None = None,
    ledger_ttl: float | None = None,
    poll_interval: float | None = None,
    signal: int | str | None = None,
) -> None:
    """Set `cancellable`'s options on a Celery app (all optional).

    The same options can be set in the app's configuration as
    ``cancellable_ledger_url``, ``cancellable_ledger_ttl`` and
    ``cancellable_poll_interval``.  Call it where you create the app, before
    the worker starts.

    Args:
        app: The Celery app.
        ledger_url: Where to record cancellations durably: ``redis://...``,
            ``file:///path`` or ``"none"``.  Default: the app's Redis or
            filesystem result backend, else its Redis broker.
        ledger_ttl: How long a cancellation is remembered, in seconds
            (default one week).  Keep it longer than a task can wait in a
            queue.
        poll_interval: How often a worker asks the ledger about the tasks it
            is running, in seconds (default 2).  A safety net only; normal
            delivery is pushed.
        signal: The signal used to wake prefork children (default
            ``SIGURG``, whose default action is to do nothing).  Signals
            that billiard uses or resets in pool children (``SIGUSR1``,
            ``SIGUSR2``, ``SIGTERM``, ``SIGHUP``, ...) are refused.

    Raises:
        TypeError, ValueError: An option is invalid.

    .. versionadded:: 0.1.0
    """
    if ledger_url is not None:
        if not isinstance(ledger_url, str):
            raise TypeError("ledger_url must be a str")
        if ledger_url.lower() != "none" and not ledger_url.startswith(
            ("redis://", "rediss://", "unix://", "file://")
        ):
            raise ValueError(
                "ledger_url must be a redis://, rediss://, unix:// or file:// URL, or 'none'"
            )
        app.conf.cancellable_ledger_url = ledger_url
    if ledger_ttl is not None:
        ttl = validate_seconds(ledger_ttl, "ledger_ttl", allow_none=False)
        if not ttl:
            raise ValueError("ledger_ttl must be positive")
        app.conf.cancellable_ledger_ttl = ttl
    if poll_interval is not None:
        interval = validate_seconds(poll_interval, "poll_interval", allow_none=False)
        if not interval:
            raise ValueError("poll_interval must be positive")
        app.conf.cancellable_poll_interval = interval
    if signal is not None:
        if isinstance(signal, str):
            name = signal.upper()
            name = name if name.startswith("SIG") else "SIG" + name
            try:
                signum = int(getattr(signal_module, name))
            except AttributeError:
                raise ValueError(f"unknown signal {signal!r}") from None
        elif isinstance(signal, int) and not isinstance(signal, bool):
            signum = signal
        else:
            raise TypeError("signal must be a signal name or number")
        from billiard.common import TERMSIGS_FULL

        taken = {getattr(signal_module, name, None) for name in TERMSIGS_FULL}
        taken |= {getattr(signal_module, name, None) for name in ("SIGKILL", "SIGSTOP", "SIGINT")}
        if signum in taken:
            raise ValueError(
                f"signal {signum} cannot be caught, or billiard uses it in pool children; "
                "keep the default (SIGURG) or pick one such as SIGWINCH"
            )
        _wakeup.set_signal(signum)
