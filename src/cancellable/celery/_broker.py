"""The broker side of `~cancellable.celery.cancel`: bounded connections, a check, one publish.

``cancel()`` never uses the app's own connection pool (``app.pool``): its
connections have no socket timeout (kombu's default), kombu's Redis
transport ``PING`` s the server when it opens a channel, and a control
broadcast is published with kombu's retry loop, which retries for ever.  A
Redis that accepts connections but answers nothing (stopped, paused,
partitioned after the connection was made) would hold ``cancel()`` until it
answers again.

`Broadcasts` keeps, per app, a pool of connections of its own to the app's
broker, made by ``app.connection_for_write`` (so the broker URL, failover
hosts, TLS and the app's ``broker_transport_options`` all apply) with every
wait bounded by ``wait`` seconds: the connect (``connect_timeout`` and, for
Redis, ``socket_connect_timeout``), each reply (Redis ``socket_timeout``,
AMQP ``read_timeout`` / ``write_timeout``), no retry of a timed-out Redis
command (``retry_on_timeout=False``) and no reconnection loop when a
channel is opened (``max_retries=0``).  `check` makes one round trip;
`publish` publishes the revoke broadcast once, without kombu's retry loop.
A pool lives as long as its app (held weakly) and is dropped when
`~cancellable.celery.configure` changes the app's settings; a forked child
starts with none (`cancellable.celery._runtime`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any, Final

from . import _celery_internals as celery_internals
from ._settings import settings_for

__all__ = ["MAX_WAIT", "Broadcasts", "Deadline", "wait_for"]

#: The longest a single wait for the broker may take, in seconds (connect,
#: or one reply); less when ``cancellable_cancel_timeout`` is below 6 s.
MAX_WAIT: Final = 2.0


class Deadline:
    """The time one `cancel` call has left (``time.monotonic``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.at = self.started + seconds

    def left(self) -> float:
        """Seconds left (0.0 once it has passed)."""
        return max(0.0, self.at - time.monotonic())

    def elapsed(self) -> float:
        """Seconds since the call began."""
        return time.monotonic() - self.started


def wait_for(cancel_timeout: float) -> float:
    """The bound of one broker wait for a ``cancellable_cancel_timeout``.

    A third of it, at most `MAX_WAIT`: the check, the ledger write and the
    broadcast each fit in the call's bound.
    """
    return min(MAX_WAIT, cancel_timeout / 3)


def _bounded_options(app: Any, wait: float) -> dict[str, Any]:
    options = dict(app.conf.broker_transport_options or {})
    for name in ("socket_timeout", "socket_connect_timeout", "read_timeout", "write_timeout"):
        given = options.get(name)
        options[name] = wait if not isinstance(given, (int, float)) else min(float(given), wait)
    options.update(
        retry_on_timeout=False,  # Redis: a timed-out command is not sent again
        max_retries=0,  # opening a channel: one connection attempt, no loop
        interval_start=0,
        connect_retries_timeout=wait,
    )
    return options


class _Pool:
    """One app's bounded connections."""

    def __init__(self, app: Any, wait: float) -> None:
        self.wait = wait
        connection = app.connection_for_write(
            connect_timeout=wait, transport_options=_bounded_options(app, wait)
        )
        self.pool = connection.Pool(limit=app.conf.broker_pool_limit or None)


class Broadcasts:
    """The bounded broker connections of one process, one pool per app.

    Made once per process with its `~cancellable.celery._runtime.Runtime`,
    and anew in a forked child: connections do not cross a fork.
    """

    def __init__(self) -> None:
        self._pools: weakref.WeakKeyDictionary[Any, _Pool] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def forget(self, app: Any) -> None:
        """Drop ``app``'s pool (its settings changed); the next call makes a new one."""
        with self._lock:
            pool = self._pools.pop(app, None)
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.pool.force_close_all()

    def _pool(self, app: Any) -> _Pool:
        with self._lock:
            pool = self._pools.get(app)
            if pool is None:
                wait = wait_for(settings_for(app).cancel_timeout)
                pool = self._pools[app] = _Pool(app, wait)
        return pool

    def acquire(self, app: Any, deadline: Deadline) -> Any:
        """A bounded connection to ``app``'s broker, waiting for a free one until ``deadline``.

        Give it back with `release`.

        Raises:
            kombu.exceptions.ConnectionLimitExceeded: Every connection of the
                pool stayed busy until the deadline.
        """
        return self._pool(app).pool.acquire(block=True, timeout=max(deadline.left(), 0.001))

    @staticmethod
    def release(conn: Any, *, broken: bool) -> None:
        """Give ``conn`` back to its pool; a ``broken`` one is closed first (no round trip).

        The next call that gets it connects anew, a bounded wait too.
        """
        if broken:
            with contextlib.suppress(Exception):
                conn.collect()
        conn.release()

    def check(self, conn: Any, deadline: Deadline) -> None:
        """One round trip to the broker, each wait bounded; raise if it does not answer.

        Opening the connection's channel connects (kombu's Redis transport
        ``PING`` s then); on Redis, a ``PING`` on the pooled connection as
        well, since the transport says a pooled connection is connected
        whether or not the server still answers.
        """
        # One attempt per broker URL (several with failover URLs), each wait
        # bounded by the connection's options; no attempt after the deadline.
        hosts = len(getattr(conn, "alt", None) or ()) or 1
        conn.ensure_connection(
            max_retries=hosts - 1,
            interval_start=0,
            interval_step=0,
            timeout=max(deadline.left(), 0.001),
        )
        client = celery_internals.redis_broker_client(conn)
        if client is not None:
            wait = min(float(conn.connect_timeout or MAX_WAIT), max(deadline.left(), 0.001))
            celery_internals.ping_redis_once(client, wait)
        elif conn.transport.driver_type == "amqp":
            # A pooled AMQP connection says it is connected whether or not
            # the broker still answers, and a publish only fills the socket's
            # buffer: open and close a channel, a round trip each, bounded by
            # the connection's read_timeout.
            channel = conn.channel()
            channel.close()

    def publish(
        self,
        app: Any,
        conn: Any,
        arguments: dict[str, Any],
        destination: list[str] | None = None,
    ) -> None:
        """Publish the revoke on ``conn``, once (no kombu retry loop).

        To every worker, or to the node names in ``destination``.
        """
        celery_internals.publish_control_once(
            app, conn, "revoke", arguments, destination=destination
        )
