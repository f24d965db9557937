"""A worker loses its broker connection mid-task (a TCP proxy between it and the broker is cut).

With RabbitMQ the broker requeues the unacked message at once and another
worker starts it: the first copy must stop (cleanup run, nothing stored),
so the task never runs twice at once and ends SUCCESS from the other
worker's run.  With Redis nothing is stopped, and the running task's message
is kept out of what kombu restores as it closes the dead channel, so no other
worker starts it while it runs.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Iterator

import pytest
import redis
from tests.proxy import TcpProxy

from .conftest import BROKERS, Keys, Worker, state_of, task_meta, wait_for, wait_state
from .reruns import StateWatch, log_lines


def _proxied(broker: str, proxy: TcpProxy) -> str:
    """The broker URL of ``broker`` with its port replaced by the proxy's."""
    parts = urllib.parse.urlsplit(BROKERS[broker])
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(name="proxy_for")
def proxy_for_fixture() -> Iterator[Callable[[str], TcpProxy]]:
    """``proxy_for(broker)``: a proxy to that broker, closed at teardown."""
    proxies: list[TcpProxy] = []

    def make(broker: str) -> TcpProxy:
        parts = urllib.parse.urlsplit(BROKERS[broker])
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.mark.parametrize("celery_cancels", [False, True])
def test_rabbitmq_connection_loss_stops_the_first_copy(
    make_worker: Callable[..., Worker],
    keys: Keys,
    proxy_for: Callable[[str], TcpProxy],
    celery_cancels: bool,
) -> None:
    """Cut A's RabbitMQ connection while it runs an acks_late task: B starts
    the redelivered copy, A's copy stops within 2 s of the cut with its
    cleanup run, the task ends SUCCESS from B's run with no REVOKED,
    FAILURE or RETRY in between, and A serves new tasks once the proxy is
    back.  With Celery's ``worker_cancel_long_running_tasks_on_connection_loss``
    the task takes the same cooperative path (Celery alone would SIGTERM
    the child, without cleanup, and store RETRY)."""
    proxy = proxy_for("rabbitmq")
    settings = {"worker_cancel_long_running_tasks_on_connection_loss": celery_cancels}
    a = make_worker(
        broker="rabbitmq",
        concurrency=1,
        extra_env={
            "CIT_BROKER_URL": _proxied("rabbitmq", proxy),
            "CIT_SETTINGS": json.dumps(settings),
        },
    )
    result = a.send("cit.rerun.late", keys.key("t"))
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the first run to start on A")
    a_child = keys.started("t")[0]
    assert a_child in a.children()
    b = make_worker(broker="rabbitmq", concurrency=1, queue=a.queue)
    watch = StateWatch(result)

    cut_at = time.time()
    proxy.cut()
    wait_for(lambda: len(keys.started("t")) >= 2, 20, message="B to start the redelivered copy")
    seen = watch.wait(30)
    assert state_of(result) == "SUCCESS", task_meta(result)
    assert "REVOKED" not in seen, seen
    assert "FAILURE" not in seen, seen
    assert "RETRY" not in seen, seen
    assert result.get(timeout=5).startswith("run 2 on ")

    lines = log_lines(keys, "t")
    first = [line for line in lines if line[1] == 1]
    second = [line for line in lines if line[1] == 2]
    assert [line[0] for line in first] == ["start", "cancelled", "cleanup"], lines
    assert {line[2] for line in first} == {a_child}
    assert first[-1][3] - cut_at < 2.0, f"A's copy stopped {first[-1][3] - cut_at:.2f} s after"
    assert second[0][2] in b.children()
    assert keys.flag("t", "reason") == (
        "connection_lost|broker connection lost: the broker redelivers the task"
    )

    # A reconnects once the proxy is back, and serves the queue alone.
    proxy.restore()
    b.stop()
    wait_for(a.healthy, 30, interval=0.5, message="A to reconnect")
    assert 5 == a.send("cit.plain.add", 2, 3).get(timeout=30)
    log = a.log_path.read_text(errors="replace")
    assert "worker.connection_lost" in log
    assert "how='redelivered'" in log


def test_the_setting_turns_it_off(
    make_worker: Callable[..., Worker], keys: Keys, proxy_for: Callable[[str], TcpProxy]
) -> None:
    """With ``cancellable_cancel_on_connection_loss=False`` a cut leaves A's
    copy running: it runs to its end while B runs the redelivered copy, at
    the same time (Celery's behaviour, which the setting restores)."""
    proxy = proxy_for("rabbitmq")
    a = make_worker(
        broker="rabbitmq",
        concurrency=1,
        extra_env={
            "CIT_BROKER_URL": _proxied("rabbitmq", proxy),
            "CIT_SETTINGS": json.dumps({"cancellable_cancel_on_connection_loss": False}),
        },
    )
    a.send("cit.rerun.late", keys.key("t"), 10.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the first run to start on A")
    make_worker(broker="rabbitmq", concurrency=1, queue=a.queue)
    proxy.cut()
    # B's start is awaited first: on a loaded machine it may take seconds to
    # consume the redelivered message, and the first run lasts 10 s so the
    # overlap does not depend on B being quick.
    wait_for(
        lambda: any(line[1] == 2 and line[0] == "start" for line in log_lines(keys, "t")),
        20,
        message="B to start the redelivered copy",
    )
    wait_for(
        lambda: [line[0] for line in log_lines(keys, "t") if line[1] == 1][-1:] == ["done"],
        20,
        message="A's copy to run to its end",
    )
    lines = log_lines(keys, "t")
    assert [line[0] for line in lines if line[1] == 1] == ["start", "done"], lines
    second_start = [line[3] for line in lines if line[1] == 2 and line[0] == "start"]
    first_done = [line[3] for line in lines if line[1] == 1 and line[0] == "done"]
    assert second_start, lines
    assert second_start[0] < first_done[0], "the two copies ran at the same time"
    assert "worker.connection_lost" not in a.log_path.read_text(errors="replace")


@pytest.mark.parametrize("refused_s", [1.5, 0.0])
def test_redis_connection_loss_stops_nothing_and_runs_nothing_twice(
    make_worker: Callable[..., Worker],
    keys: Keys,
    proxy_for: Callable[[str], TcpProxy],
    refused_s: float,
) -> None:
    """Cut A's Redis broker connection while it runs an acks_late task, with B
    consuming the same queue: the task is not stopped, B never starts it, and
    it ends SUCCESS from its only run.  kombu's Redis transport puts a closing
    channel's unacked messages back on their queue; A keeps the running task's
    message out of that (``worker.connection_lost``, ``how='kept_running'``).
    ``refused_s``: the proxy refuses A for that long, or lets it back at once.
    Before, kombu tried that restore, and on kombu 5.7 it raised and took the
    worker down ("Unrecoverable error") once the task had ended; where the
    restore succeeds, B would start a second copy while A's still runs."""
    proxy = proxy_for("redis")
    a = make_worker(
        broker="redis", concurrency=1, extra_env={"CIT_BROKER_URL": _proxied("redis", proxy)}
    )
    # Long enough to outlast B's start on a loaded machine (8 s seen in CI).
    result = a.send("cit.rerun.late", keys.key("t"), 15.0)
    wait_for(lambda: keys.flag("t", "looping"), 20, message="the run to start on A")
    make_worker(broker="redis", concurrency=1, queue=a.queue)
    assert [line[0] for line in log_lines(keys, "t")] == ["start"], "the run ended before the cut"
    proxy.cut()
    time.sleep(refused_s)
    proxy.restore()
    wait_state(result, ("SUCCESS", "FAILURE", "REVOKED"), 30)
    # B had every chance: it idles on the queue for a while after the end.
    time.sleep(2.0)
    assert state_of(result) == "SUCCESS", task_meta(result)
    assert result.get(timeout=5).startswith("run 1 on ")
    assert [line[0] for line in log_lines(keys, "t")] == ["start", "done"]
    log = a.log_path.read_text(errors="replace")
    assert f"worker.connection_lost task_ids=['{result.id}'] how='kept_running'" in log
    assert "Restoring 1 unacknowledged message" not in log
    # kombu 5.7's restore at that close raised AttributeError (the connection
    # it would restore through was already released): "Unrecoverable error",
    # and A shut down once its task had ended.
    assert "Unrecoverable error" not in log
    assert a.alive()
    # Its ack went through A's new channel: nothing is left unacked for the
    # visibility timeout to bring back (a run more, an hour later).
    broker = redis.Redis.from_url(BROKERS["redis"])
    try:
        unacked = broker.hvals("unacked")
    finally:
        broker.close()
    assert [] == [m for m in unacked if result.id.encode() in m]
