"""Peers side by side: dramatiq-abort's delivery latency beside ours, and the per-call table.

The per-call checks of the peers are micro-benchmark cases (``peers.*`` in
``cases.py``), measured by ``micro.py`` in the same pyperf run as ours.
This module adds the delivery latency of dramatiq-abort over the same Redis
as ours, in the same run, and prints the peers' per-call table from several
pyperf passes.

Latency.  Two real workers are up at once: the Celery benchmark worker
(``celery -A bench_app worker --pool=prefork -c 2``, Redis broker, given by
``run.py``) and a dramatiq worker started here (``dramatiq peers_app
--processes 1 --threads 2``: dramatiq's `RedisBroker` and dramatiq-abort's
`Abortable` middleware with its Redis event backend, on the same Redis
database).  Samples alternate between them, so that both see the same load:

* ``peers.latency.cancellable.revoke_to_checkpoint``: ``bench.spin`` (a
  ``@cancellable`` loop with a checkpoint per iteration), revoked with the
  standard ``AsyncResult.revoke()`` 100 ms after it started; until its
  checkpoint raised (`latency.one_sample`, the same sample as
  ``latency.revoke_to_checkpoint``);
* ``peers.latency.dramatiq_abort.abort_to_raise``: ``peers_spin`` (the same
  busy loop), aborted with ``dramatiq_abort.abort(message_id)`` 100 ms after
  it started; until `Abort` was raised in it;
* ``peers.latency.dramatiq_abort_settled.abort_to_raise``: the same, aborted
  1.2 s after it started.  dramatiq-abort's watcher thread waits for aborts
  with a ``BLPOP`` of 1 s on the keys of the messages running when the call
  began, so a message that started less than a second ago may not be
  watched yet; after 1.2 s it is.

All clocks are ``time.time()`` on the same machine, times in milliseconds,
measured from just before the call that cancels.

Per-call table::

    for pass in 1 2 3 4 5 6; do
        python benchmarks/micro.py --peers -p 3 -q -o peers-$pass.json
    done
    python benchmarks/peers.py table peers-*.json
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_REDIS_URL, log, measured, percentile, selected, skipped
from _workers import log_tail, stop_process_group

HERE = Path(__file__).resolve().parent
TIMES = "\u00d7"  # multiplication sign
DASH = "\u2013"  # en dash

OURS = "peers.latency.cancellable.revoke_to_checkpoint"
DRAMATIQ = "peers.latency.dramatiq_abort.abort_to_raise"
DRAMATIQ_SETTLED = "peers.latency.dramatiq_abort_settled.abort_to_raise"
NAMES = (OURS, DRAMATIQ, DRAMATIQ_SETTLED)
#: Our check in the per-call table, the peers' second yardstick.
OURS_PER_CALL = "checkpoint.live_scope"

#: (rounds, every how many rounds a settled sample is added) per mode.  A
#: round is one sample of ours and one of dramatiq-abort at 100 ms.
SAMPLES = {"full": (200, 4), "quick": (8, 4), "smoke": (1, 1)}
#: How long a task runs before it is cancelled: as in ``latency.py``, and
#: past dramatiq-abort's 1 s watcher cycle.
RUNNING_BEFORE_ABORT = 0.1
RUNNING_BEFORE_ABORT_SETTLED = 1.2
#: Threads of the dramatiq worker (two slots, like ``celery worker -c 2``).
DRAMATIQ_THREADS = 2
#: Longest wait for any one step (the first message also waits for the worker to boot).
STEP_TIMEOUT = 15.0
START_TIMEOUT = 60.0

#: Raw samples of the last `run`, in ms, by result name.
RAW: dict[str, list[float]] = {}


class PeerError(RuntimeError):
    """The dramatiq worker did not start, died, or a sample did not complete."""


def available() -> str | None:
    """None if dramatiq and dramatiq-abort can be imported, else why not."""
    import importlib.util

    absent = [m for m in ("dramatiq", "dramatiq_abort") if importlib.util.find_spec(m) is None]
    if absent:
        return (
            f"needs {', '.join(absent)}, not installed: "
            "pip install -e '.[bench]' (the benchmark-only dependencies)"
        )
    return None


class DramatiqWorker:
    """One ``dramatiq peers_app`` worker subprocess on its own queue."""

    def __init__(self, redis_url: str, threads: int = DRAMATIQ_THREADS) -> None:
        token = uuid.uuid4().hex[:10]
        self.redis_url = redis_url
        self.queue = f"cancellable-bench-peers-{token}"
        self.threads = threads
        self.logfile = Path(tempfile.gettempdir()) / f"cancellable-bench-dramatiq-{token}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._actor: Any = None
        self._abortable: Any = None

    def _client_side(self) -> tuple[Any, Any]:
        # The sending side: the same broker settings and queue as the worker.
        if self._actor is None:
            import dramatiq
            from dramatiq.brokers.redis import RedisBroker
            from dramatiq_abort import Abortable
            from dramatiq_abort.backends import RedisBackend

            broker = RedisBroker(url=self.redis_url)
            self._abortable = Abortable(backend=RedisBackend.from_url(self.redis_url))
            broker.add_middleware(self._abortable)

            def peers_spin(key: str) -> None:
                """Stands for the worker's actor of this name (only sent from here)."""

            self._actor = dramatiq.actor(broker=broker, queue_name=self.queue, max_retries=0)(
                peers_spin
            )
        return self._actor, self._abortable

    def send(self, key: str) -> str:
        """Enqueue ``peers_spin(key)``; its message id."""
        actor, _ = self._client_side()
        return str(actor.send(key).message_id)

    def abort(self, message_id: str) -> None:
        """dramatiq-abort's ``abort(message_id)`` (mode ABORT, no grace period)."""
        from dramatiq_abort import abort

        _, abortable = self._client_side()
        abort(message_id, middleware=abortable)

    def start(self) -> None:
        """Start the worker (it is ready when its first message starts; see `one_sample`)."""
        env = dict(os.environ)
        env.update(
            CANCELLABLE_BENCH_REDIS_URL=self.redis_url,
            CANCELLABLE_BENCH_PEERS_QUEUE=self.queue,
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        )
        cmd = [
            sys.executable,
            "-m",
            "dramatiq",
            "peers_app",
            "--processes",
            "1",
            "--threads",
            str(self.threads),
            "--queues",
            self.queue,
        ]
        with self.logfile.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=HERE,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() reaches the children
            )

    def check_alive(self) -> None:
        """Raise `PeerError` if the worker's main process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise PeerError(f"the dramatiq worker exited ({code}); {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        """The end of the worker's log, for error messages."""
        return log_tail(self.logfile, lines)

    def stop(self) -> None:
        """Stop the worker and every process of its group; idempotent."""
        proc, self.proc = self.proc, None
        stop_process_group(proc)
        if self._actor is not None:
            self._actor.broker.close()
            self._actor = None
        with contextlib.suppress(OSError):
            self.logfile.unlink()

    def __enter__(self) -> DramatiqWorker:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self.proc is not None:
            sys.stderr.write(self.tail() + "\n")
        self.stop()


def _wait_for(predicate: Any, timeout: float, what: str, worker: DramatiqWorker) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        worker.check_alive()
        if time.monotonic() > deadline:
            raise PeerError(f"timed out waiting for {what}; {worker.tail()}")
        time.sleep(0.002)


def one_sample(
    worker: DramatiqWorker,
    client: Any,
    running: float = RUNNING_BEFORE_ABORT,
    start_timeout: float = STEP_TIMEOUT,
) -> float:
    """Run ``peers_spin``, abort it ``running`` s after it started; ms until `Abort` was raised."""
    key = f"cancellable-bench:peers:{uuid.uuid4().hex}"
    try:
        message_id = worker.send(key)
        _wait_for(lambda: client.hget(key, "started"), start_timeout, "the actor to start", worker)
        time.sleep(running)
        aborted_at = time.time()
        worker.abort(message_id)
        marks = _wait_for(
            lambda: (lambda m: m if b"raised" in m or b"finished" in m else None)(
                client.hgetall(key)
            ),
            STEP_TIMEOUT,
            "Abort to reach the actor",
            worker,
        )
        if b"raised" not in marks:
            raise PeerError(f"message {message_id} finished without being aborted")
        return (float(marks[b"raised"]) - aborted_at) * 1000.0
    finally:
        client.delete(key)


def _record(name: str, values: list[float], names: list[str]) -> list[dict[str, Any]]:
    RAW[name] = list(values)
    log(
        f"{name}: p50 {statistics.median(values):.2f} p90 {percentile(values, 90):.2f} "
        f"p99 {percentile(values, 99):.2f} max {max(values):.2f} ms over {len(values)}"
    )
    return [measured(name, values, "ms", runs=len(values))] if name in names else []


def run(
    mode: str = "full",
    only: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    worker: Any = None,
) -> list[dict[str, Any]]:
    """Result records for the selected ``peers.latency.*`` names.

    ``worker`` is the Celery benchmark worker (prefork, Redis broker) that
    ``run.py`` shares between its parts; without one, one is started.
    """
    RAW.clear()
    names = [name for name in NAMES if selected(name, only)]
    if not names:
        return []
    reason = available()
    if reason is not None:
        return [skipped(name, reason) for name in names]
    if worker is None:
        from _workers import session

        with session(redis_url) as own:
            return run(mode, only, redis_url, own)
    import redis

    import latency

    rounds, settled_every = SAMPLES[mode]
    client = redis.Redis.from_url(redis_url)
    samples: dict[str, list[float]] = {name: [] for name in NAMES}
    try:
        with DramatiqWorker(redis_url) as dramatiq_worker:
            # The first message also waits for the worker to boot.
            one_sample(dramatiq_worker, client, start_timeout=START_TIMEOUT)
            log(f"peers: dramatiq worker on {dramatiq_worker.queue} is up")
            for number in range(rounds):
                ours = latency.one_sample(worker, client)["revoke_to_checkpoint"]
                samples[OURS].append(ours)
                samples[DRAMATIQ].append(one_sample(dramatiq_worker, client))
                if number % settled_every == settled_every - 1:
                    samples[DRAMATIQ_SETTLED].append(
                        one_sample(dramatiq_worker, client, RUNNING_BEFORE_ABORT_SETTLED)
                    )
    finally:
        client.close()
    records: list[dict[str, Any]] = []
    for name in NAMES:
        records += _record(name, samples[name], names)
    return records


# --------------------------------------------------------------------------
# The per-call table, from pyperf passes of ``micro.py --peers``.


def pass_ratios(suites: list[Any]) -> dict[str, dict[str, Any]]:
    """Per case: median ns over all passes, and the net ratio to the empty call of each pass.

    Each suite is one pass (``micro.py --peers -o FILE``); a pass's ratio
    uses that pass's harness loop and empty call: (case - loop) / (empty -
    loop), the rule of every table in ``docs/performance.md``.  ``to_ours``
    is the median over passes of the same ratio with ``checkpoint()`` in a
    live scope in place of the empty call.
    """
    import cases

    values: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    to_ours: dict[str, list[float]] = {}
    for suite in suites:
        medians = {}
        for bench in suite.get_benchmarks():
            vals = [v * 1e9 for v in bench.get_values()]
            values.setdefault(bench.get_name(), []).extend(vals)
            medians[bench.get_name()] = statistics.median(vals)
        loop, empty = medians["baseline.timeit_loop"], medians["baseline.empty_call"]
        ours = medians.get(OURS_PER_CALL)
        for name, median in medians.items():
            ratios.setdefault(name, []).append((median - loop) / (empty - loop))
            if ours is not None:
                to_ours.setdefault(name, []).append((median - loop) / (ours - loop))
    rows = {}
    for name in (c.name for c in cases.CASES if c.name in values):
        rows[name] = {
            "ns": statistics.median(values[name]),
            "ratio": statistics.median(ratios[name]),
            "ratio_min": min(ratios[name]),
            "ratio_max": max(ratios[name]),
            "to_ours": statistics.median(to_ours[name]) if name in to_ours else None,
            "passes": len(ratios[name]),
            "values": len(values[name]),
        }
    return rows


def print_table(paths: list[str]) -> None:
    """Print the Markdown per-call table of the peers from pyperf JSON files (one per pass)."""
    import pyperf

    rows = pass_ratios([pyperf.BenchmarkSuite.load(path) for path in paths])
    print(
        f"| case | median | {TIMES} empty call (median of passes) "
        f"| min {DASH} max over passes | {TIMES} `checkpoint()` |"
    )
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        if name.startswith("baseline.") and name != "baseline.empty_call":
            continue
        ours = "" if row["to_ours"] is None else f"{row['to_ours']:.1f}"
        print(
            f"| `{name}` | {row['ns']:.1f} ns | {row['ratio']:.2f} "
            f"| {row['ratio_min']:.2f} {DASH} {row['ratio_max']:.2f} | {ours} |"
        )
    passes = {row["passes"] for row in rows.values()}
    print(f"\n{', '.join(map(str, sorted(passes)))} passes")


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        print_table(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} table FILE.json...")
