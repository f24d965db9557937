"""The dramatiq app that ``peers.py`` runs in a real dramatiq worker (``dramatiq peers_app``).

dramatiq's `RedisBroker` with its default middleware and dramatiq-abort's
`Abortable` middleware with its Redis event backend, both on the Redis of
``CANCELLABLE_BENCH_REDIS_URL`` (the same server and database as the Celery
benchmarks), and one actor on the queue ``CANCELLABLE_BENCH_PEERS_QUEUE``
(one per run, so that no other worker takes its messages):

* ``peers_spin``: the busy loop of ``bench.spin`` (``bench_app.py``) without
  a checkpoint: dramatiq-abort stops a running actor by raising `Abort` in
  its thread, so the loop needs no check.  It records in a Redis hash when
  it started and when `Abort` reached it (``time.time()`` in its ``except``
  block); the hash is written after the moment is taken.

``max_retries=0``: an aborted message must not be retried (dramatiq counts
an abort as a failure).
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq_abort import Abort, Abortable
from dramatiq_abort.backends import RedisBackend

REDIS_URL = os.environ.get("CANCELLABLE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
QUEUE = os.environ.get("CANCELLABLE_BENCH_PEERS_QUEUE", "cancellable-bench-peers")

#: An actor gives up after this long if nobody aborts it.
SPIN_LIMIT_SECONDS = 30.0

broker = RedisBroker(url=REDIS_URL)
broker.add_middleware(Abortable(backend=RedisBackend.from_url(REDIS_URL)))
dramatiq.set_broker(broker)

_client = redis.Redis.from_url(REDIS_URL)


@dramatiq.actor(queue_name=QUEUE, max_retries=0, time_limit=60_000)
def peers_spin(key: str) -> None:
    """Spin until aborted; record the start and the moment `Abort` arrived in ``key``."""
    _client.hset(key, mapping={"started": time.time(), "pid": os.getpid()})
    limit = time.monotonic() + SPIN_LIMIT_SECONDS
    x = 1
    try:
        while time.monotonic() < limit:
            for i in range(1000):
                x = (x * 31 + i) % 65521
    except Abort:
        raised = time.time()
        _client.hset(key, "raised", raised)
        raise
    _client.hset(key, "finished", time.time())
