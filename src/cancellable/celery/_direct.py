"""Directed delivery: a cancel of a running task reaches only the worker that runs it.

Celery's control exchange is a fanout: on Redis every broadcast is a
``PUBLISH`` that every worker's connection receives, and each worker wakes,
reads and decodes it even when it is addressed to another node (kombu drops
it only then).  With 16 workers on two cores, the worker that holds the task
waits its turn behind the fifteen others.  So each worker also consumes a
queue of its own (`DirectStep`, a consumer bootstep: Celery's public
``bootsteps.ConsumerStep``), named after its node name and the app's
control exchange (`queue_name`), on the broker's default exchange: a
message published there with the queue's name as routing key reaches that
queue alone.  `~cancellable.celery.cancel` sends the revoke of running tasks
whose STARTED state names their worker there (`publish`), one message per
worker, and nothing to the others: they learn the cancellation from the
ledger at their next poll.  Queued, reserved or unknown tasks, group and
workflow targets, and plain revokes are broadcast as before.

Redis and AMQP brokers only (kombu's ``driver_type`` ``redis`` or
``amqp``); with another broker the revoke is broadcast with Celery's
``destination`` (every worker still receives it).

Nothing accumulates for a worker that is gone:

* **Redis.**  The queue is a list; a worker takes each message off with
  ``BRPOP`` as it arrives.  Every push also sets the list's time to live to
  `TTL` (``PEXPIRE``, in the same pipelined round trip), so the list of a
  worker that no longer consumes it (stopped, killed, or started without
  this step) is deleted `TTL` seconds
  after the last cancel sent to it, holding at most the cancels of that
  stretch.
* **AMQP.**  The queue is transient: deleted when the worker's consumer
  goes (``auto_delete``), and by the broker after `TTL` seconds unused
  (``x-expires``); each message lives at most `TTL` seconds
  (``x-message-ttl``).  A message for a queue that does not exist is
  dropped by the broker (the default exchange routes only to existing
  queues).

Fallbacks: a message that reaches no worker (it is gone, or its consumer
is reconnecting) loses nothing, since the cancellation was recorded in the
ledger first (`cancel()` sends a directed revoke only when the ledger holds
it): every worker reads the ledger every ``cancellable_poll_interval``
seconds, so a task that moved to another worker meanwhile (redelivered,
retried) is stopped there at its next read, and checked at receipt once
read.  Messages are consumed without
acknowledgement: one lost in a crash is covered the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

from celery import bootsteps
from kombu.entity import Queue
from kombu.messaging import Consumer, Producer

from .._log import logger
from ..events import CANCEL_DELIVERY_FAILED
from . import _celery_internals as celery_internals
from ._broker import Deadline
from ._revokes import cancel_message
from ._runtime import runtime
from ._settings import settings_for

__all__ = ["TTL", "DirectStep", "publish", "queue_name", "supported"]

#: Seconds a directed message, and the queue of a worker that consumes no
#: more, are kept by the broker (see the module docstring).
TTL: Final = 60.0
#: The brokers (kombu ``Transport.driver_type``) with directed delivery.
TRANSPORTS: Final = frozenset({"redis", "amqp"})


def supported(connection: Any) -> bool:
    """Whether directed delivery works over the kombu ``connection``'s broker."""
    transport = getattr(connection, "transport", None)
    return getattr(transport, "driver_type", None) in TRANSPORTS


def queue_name(app: Any, hostname: str) -> str:
    """The directed queue of the worker named ``hostname`` (its node name) for ``app``."""
    return f"{hostname}.{app.conf.control_exchange}.cancellable"


def _queue(app: Any, hostname: str) -> Queue:
    # The default exchange: no binding to declare (none kept on Redis).
    return Queue(  # type: ignore[no-untyped-call]
        queue_name(app, hostname),
        durable=False,
        auto_delete=True,
        expires=TTL,
        message_ttl=TTL,
    )


def publish(
    app: Any,
    connection: Any,
    hostnames: Sequence[str],
    arguments: Mapping[str, Any],
    deadline: Deadline | None = None,
) -> None:
    """Send the revoke ``arguments`` to each worker in ``hostnames``, once, on ``connection``.

    No kombu retry loop: each wait is bounded by the connection's options,
    and no message is begun once ``deadline`` has passed (`TimeoutError`;
    the ledger holds the cancellation).  On Redis, each worker's list gets
    `TTL` as its time to live.
    """
    redis = connection.transport.driver_type == "redis"
    producer = None
    if not redis:
        producer = Producer(connection.default_channel, serializer="json", auto_declare=False)  # type: ignore[no-untyped-call]
    for hostname in hostnames:
        if deadline is not None and deadline.left() <= 0:
            raise TimeoutError(f"no time left of cancellable_cancel_timeout={deadline.seconds}")
        name = queue_name(app, hostname)
        if producer is None:
            # The message and its list's TTL in one round trip.
            celery_internals.push_redis_message(connection, name, arguments, TTL)
            continue
        producer.publish(  # type: ignore[no-untyped-call]
            dict(arguments),
            exchange="",
            routing_key=name,
            retry=False,
            delivery_mode=1,  # transient
            expiration=TTL,
        )


class DirectStep(bootsteps.ConsumerStep):  # type: ignore[misc]  # Celery is untyped
    """The worker's directed queue: consumed with the worker's other queues.

    Started with the consumer (and again after each reconnection), on a
    channel of its own; not started when ``cancellable_direct_running`` is
    False or the broker is neither Redis nor AMQP.  Each message is handled
    on the consumer's thread as the ``revoke`` command handles a `cancel()`
    revoke (`cancellable.celery._revokes.cancel_message`).
    """

    label = "cancellable-direct"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.app = parent.app
        self.hostname = str(getattr(parent, "hostname", "") or "")
        self.consumer: Any = parent
        try:
            self.wanted = bool(settings_for(self.app).direct_running)
        except Exception:  # noqa: BLE001 - the worker's own step reports a bad setting
            self.wanted = False

    def start(self, parent: Any) -> None:
        """Consume the directed queue if this worker and its broker take part."""
        self.consumer = parent
        if not self.wanted or not self.hostname or not supported(parent.connection):
            self.consumers: list[Any] = []
            return
        super().start(parent)

    def get_consumers(self, channel: Any) -> list[Any]:
        """One consumer of this worker's directed queue, without acknowledgements."""
        return [
            Consumer(  # type: ignore[no-untyped-call]
                channel,
                queues=[_queue(self.app, self.hostname)],
                callbacks=[self.on_message],
                accept=["json"],
                no_ack=True,
            )
        ]

    def on_message(self, body: Any, message: Any) -> None:
        """A directed cancel: handled if this process runs the worker for the app."""
        worker = runtime().worker
        if worker is None or not worker.serves(self.app):
            return
        try:
            cancel_message(worker, body, self.consumer)
        except Exception as exc:  # noqa: BLE001 - never break the consumer's event loop
            with contextlib.suppress(Exception):
                logger.error(CANCEL_DELIVERY_FAILED, error=repr(exc), exc_info=exc)
