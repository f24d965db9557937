"""Tests of the benchmark suite in ``benchmarks/``.

They check three things, quickly:

* the driver (``benchmarks/run.py --smoke``: tiny iteration counts, the real
  pyperf subprocess) produces every expected result name and a JSON document
  of exactly the documented shape;
* every micro-benchmark statement really runs the code its name promises:
  each case's setup and its compiled timed loop run once under a profiler,
  and the cancellation-related cases are checked for their effect (cancelling
  the scope makes the timed statement raise, the deadline is an hour away,
  ten hooks run, the other threads loop in their own scopes, ...);
* the helpers (ratios, name selection, schema check, overhead loops) do what
  the numbers in ``docs/performance.md`` rely on.

Redis (DB 14 of ``CANCELLABLE_TEST_REDIS``, see ``tests/redis_dbs.py``) is
required; without it these tests fail with a message that says so.  The
``peers.*`` benchmarks need the ``bench`` extra, which ``make test`` installs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests import redis_dbs

import cancellable
from cancellable import Cancelled, CancelScope, current_scope

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import cases  # noqa: E402
import in_task  # noqa: E402
import overhead  # noqa: E402

REDIS_URL = redis_dbs.url(_common.REDIS_DB)

#: The names the brief asks for, spelled out here so that renaming or
#: dropping a benchmark fails a test.
REQUIRED_NAMES = (
    "baseline.empty_call",
    "baseline.loop_iteration",
    "checkpoint.outside_scope",
    "checkpoint.live_scope",
    "checkpoint.deadline_armed",
    "checkpoint.ten_hooks",
    "checkpoint.eight_threads",
    "checkpoint.other_thread_cancelled",
    "checkpoint.other_thread_cleaning_up",
    "is_cancelled.live_scope",
    "celery.request_revoked",
    "alt.abortable_is_aborted",
    "alt.asyncresult_state",
    "alt.redis_get",
    "alt.limitedset_contains",
    "alt.event_is_set",
    "context.body_100ns.overhead_pct",
    "context.body_1us.overhead_pct",
    "context.body_10us.overhead_pct",
    "context.body_100us.overhead_pct",
    "latency.revoke_to_checkpoint",
    "latency.revoke_to_cleanup",
    "latency.revoke_to_revoked_state",
    "latency.async.revoke_to_checkpoint",
    "latency.async.revoke_to_cleanup",
    "latency.async.revoke_to_revoked_state",
    "latency.prefork_rabbitmq.revoke_to_checkpoint",
    "latency.async_threads_redis.revoke_to_checkpoint",
    "latency.threads_redis.revoke_to_checkpoint",
    "latency.threads_rabbitmq.revoke_to_checkpoint",
    "latency.terminate.to_process_death",
    "latency.terminate.to_pool_full",
    "latency.terminate.revoke_to_revoked_state",
    "latency.abortable_100ms.to_noticed",
    "latency.abortable_100ms.to_final_state",
    "throughput.plain_tasks_per_s",
    "throughput.cancellable_tasks_per_s",
    "throughput.per_task_overhead_us",
    "throughput.cancellable_to_plain_ratio",
    "peers.dramatiq_abort_requested",
    "peers.dramatiq_abort_requested_middleware",
    "peers.temporal_is_cancelled",
    "peers.cancelscope_checkpoint",
    "peers.cancelscope_is_cancelled",
    "peers.latency.cancellable.revoke_to_checkpoint",
    "peers.latency.dramatiq_abort.abort_to_raise",
    "peers.latency.dramatiq_abort_settled.abort_to_raise",
)

#: Names measured over real workers (skipped, with the reason, in ``--smoke`` mode).
CELERY_NAMES = {
    n
    for n in REQUIRED_NAMES
    if n.split(".")[0] in ("celery", "latency", "throughput") or n.startswith("peers.latency.")
}


def _code_of(fn: Any) -> Any:
    return fn.__code__


def _expected_code() -> dict[str, Any]:
    """Case name -> the code object its timed statement must call (None: no call).

    Every checkpoint case calls `checkpoint` itself and nothing else: its one
    body answers in place, also in ``checkpoint.other_thread_cancelled``
    (another thread's scope is cancelled), so no case reaches the slow path.
    """
    import cancelscope
    import dramatiq_abort
    import redis
    from celery.contrib.abortable import AbortableAsyncResult
    from celery.result import AsyncResult
    from celery.utils.collections import LimitedSet
    from temporalio import activity

    checkpoint_code = _code_of(cancellable.checkpoint)
    return {
        "baseline.timeit_loop": None,
        "baseline.empty_call": _code_of(cases.empty),
        "baseline.loop_iteration": None,
        "checkpoint.outside_scope": checkpoint_code,
        "checkpoint.live_scope": checkpoint_code,
        "checkpoint.deadline_armed": checkpoint_code,
        "checkpoint.ten_hooks": checkpoint_code,
        "checkpoint.eight_threads": checkpoint_code,
        "checkpoint.eight_threads_wall": checkpoint_code,
        "checkpoint.other_thread_cancelled": checkpoint_code,
        "checkpoint.other_thread_cleaning_up": checkpoint_code,
        "is_cancelled.live_scope": _code_of(cancellable.is_cancelled),
        "alt.abortable_is_aborted": _code_of(AbortableAsyncResult.is_aborted),
        "alt.asyncresult_state": _code_of(AsyncResult.state.fget),
        "alt.redis_get": _code_of(redis.Redis.get),
        "alt.limitedset_contains": _code_of(LimitedSet.__contains__),
        "alt.event_is_set": _code_of(threading.Event.is_set),
        "peers.dramatiq_abort_requested": _code_of(dramatiq_abort.abort_requested),
        "peers.dramatiq_abort_requested_middleware": _code_of(dramatiq_abort.abort_requested),
        "peers.temporal_is_cancelled": _code_of(activity.is_cancelled),
        "peers.cancelscope_checkpoint": _code_of(cancelscope.checkpoint),
        "peers.cancelscope_is_cancelled": _code_of(cancelscope.is_cancelled),
    }


@pytest.fixture(scope="module")
def redis_client() -> Iterator[Any]:
    """A client for Redis DB 14; fails the test (never skips) if Redis is down."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(
            f"Redis is required by the benchmark tests but is not reachable at {REDIS_URL} "
            f"({exc}). Start redis-server on 127.0.0.1:6379.",
            pytrace=False,
        )
    yield client
    client.close()


class Prepared:
    """A case after its setup: its namespace, timed loop and teardown."""

    def __init__(self, case: cases.Case) -> None:
        self.case = case
        self.ns = case.namespace()
        self.inner = cases.make_inner(case, self.ns)
        self.teardown = cases.run_setup(case, self.ns, cases.Options(redis_url=REDIS_URL))

    def run(self, loops: int = 1) -> float:
        """Run the timed loop ``loops`` times, as pyperf would (inside ``run_inside``, if any)."""
        return cases.timed(self.case, self.ns, self.inner)(loops)


@pytest.fixture
def prepare(redis_client: Any) -> Iterator[Callable[[str], Prepared]]:
    """Set a case up by name; every setup is torn down after the test."""
    made: list[Prepared] = []

    def make(name: str) -> Prepared:
        prepared = Prepared(cases.CASES_BY_NAME[name])
        made.append(prepared)
        return prepared

    yield make
    for prepared in reversed(made):
        prepared.teardown()
    assert current_scope() is None, "a benchmark setup leaked a cancel scope"


def _calls_during(fn: Callable[[], object]) -> list[Any]:
    """Code objects of the Python functions called (at any depth) while ``fn`` runs."""
    called: list[Any] = []

    def profiler(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            called.append(frame.f_code)

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return called


# --------------------------------------------------------------------------
# The driver, end to end.


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, redis_client: Any) -> dict[str, Any]:
    """``run.py --smoke --json FILE --plot FILE`` once for the module; its outputs."""
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "results.json", out / "overhead.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--smoke",
            "--json",
            str(json_path),
            "--plot",
            str(png_path),
            "--redis-url",
            REDIS_URL,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"run.py failed:\n{proc.stdout}\n{proc.stderr}"
    return {
        "doc": json.loads(json_path.read_text()),
        "png": png_path,
        "stdout": proc.stdout,
    }


def test_smoke_run_produces_every_expected_name(smoke_run: dict[str, Any]) -> None:
    """Every required name is in the results, measured unless it needs the Celery integration."""
    by_name = {r["name"]: r for r in smoke_run["doc"]["results"]}
    missing = [name for name in REQUIRED_NAMES if name not in by_name]
    assert not missing, f"missing results: {missing}"
    for name in REQUIRED_NAMES:
        record = by_name[name]
        if name in CELERY_NAMES:
            # Skipped only with an explicit reason, never with a fake number.
            if record.get("skipped"):
                assert record["reason"].strip(), name
            else:
                assert record["median"] > 0, name
        else:
            assert not record.get("skipped"), f"{name} was skipped: {record.get('reason')}"
    # Every micro case and every context body is there, measured.
    for case in cases.CASES:
        assert not by_name[case.name].get("skipped"), case.name
    for label, _target in overhead.TARGETS:
        for suffix in ("overhead_pct", "added_ns", "body_ns"):
            assert f"context.body_{label}.{suffix}" in by_name
    for case in ("outside_scope", "live_scope", "other_thread_cancelled"):
        for kind in ("net_ratio", "gross_ratio"):
            record = by_name[f"paired.{case}.{kind}"]
            assert record["unit"] == "x"
            assert record["median"] > 0


def test_smoke_run_json_schema(smoke_run: dict[str, Any]) -> None:
    """The JSON document has exactly the documented keys, types and ratios."""
    doc = smoke_run["doc"]
    assert set(doc) == {"environment", "results"}
    env = doc["environment"]
    assert set(env) == {
        "python",
        "implementation",
        "platform",
        "machine",
        "cpu_count",
        "versions",
        "date",
    }
    assert set(env["versions"]) == {
        "cancellable",
        "celery",
        "kombu",
        "redis-py",
        "pyperf",
        "dramatiq",
        "dramatiq-abort",
        "temporalio",
        "cancelscope",
    }
    assert env["versions"]["pyperf"]
    assert env["versions"]["celery"]
    for peer in cases.PEER_DISTRIBUTIONS:
        assert env["versions"][peer], f"{peer} is not installed (the bench extra)"
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert _common.check_schema(doc, REQUIRED_NAMES) == []
    by_name = {r["name"]: r for r in doc["results"]}
    live = by_name["checkpoint.live_scope"]
    required = {"name", "median", "unit", "p90", "p99", "runs"} | _common.RATIO_KEYS
    assert required <= set(live) <= required | {"stdev"}
    assert live["unit"] == "ns"
    assert by_name["context.body_1us.overhead_pct"]["unit"] == "%"
    assert "ratio_to_empty_call" not in by_name["context.body_1us.overhead_pct"]
    assert by_name["baseline.empty_call"]["ratio_to_empty_call"] == pytest.approx(1.0)
    assert "checkpoint.live_scope" in smoke_run["stdout"]


def test_smoke_run_writes_the_plot(smoke_run: dict[str, Any]) -> None:
    """``--plot`` writes a PNG image."""
    data = smoke_run["png"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5000


def test_report_renders_tables_from_the_results(
    smoke_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``report.py`` turns a results file into Markdown tables naming every measured case."""
    import report

    path = tmp_path / "results.json"
    path.write_text(json.dumps(smoke_run["doc"]))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    for case in cases.CASES:
        assert f"| `{case.name}` |" in out
    assert "| ~1 µs |" in out


def test_only_pattern_rejects_unknown_names() -> None:
    """``--only`` with a pattern that matches nothing exits with status 2."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--only", "no.such.benchmark"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "matches no benchmark" in proc.stderr


# --------------------------------------------------------------------------
# Each statement runs what its name says.


@pytest.mark.parametrize("name", [case.name for case in cases.CASES])
def test_statement_calls_the_named_code(name: str, prepare: Callable[[str], Prepared]) -> None:
    """The timed loop of each case calls the function its name promises."""
    expected = _expected_code()
    assert set(expected) == set(cases.CASES_BY_NAME), "a case has no expectation in this test"
    prepared = prepare(name)
    called = _calls_during(lambda: prepared.run(3))
    # Keep what the compiled timed loop calls (the clock is a builtin).
    inner_code = prepared.inner.__code__
    assert called.count(inner_code) == 1
    called = called[called.index(inner_code) + 1 :]
    target = expected[name]
    if target is None:
        assert called == [], f"{name} should call nothing, called {called}"
    else:
        hits = sum(1 for code in called if code is target)
        assert hits == 3, f"{name}: {target.co_name} ran {hits} times in 3 loops"


def test_loop_iteration_runs_a_bare_range_loop(prepare: Callable[[str], Prepared]) -> None:
    """``baseline.loop_iteration`` divides by the length of the range it really loops over."""
    prepared = prepare("baseline.loop_iteration")
    assert len(prepared.ns["_range_n"]) == prepared.case.inner_loops == cases.RANGE_ITERATIONS
    assert "for _i in _range_n" in prepared.case.stmt


def test_outside_scope_runs_outside_any_scope(prepare: Callable[[str], Prepared]) -> None:
    """``checkpoint.outside_scope`` has no scope, and its setup refuses to run inside one."""
    prepared = prepare("checkpoint.outside_scope")
    assert current_scope() is None
    prepared.run(10)
    with CancelScope(), pytest.raises(RuntimeError, match="outside any cancel scope"):
        cases.run_setup(prepared.case, prepared.ns, cases.Options())


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint.live_scope",
        "checkpoint.deadline_armed",
        "checkpoint.ten_hooks",
        "checkpoint.eight_threads",
        "checkpoint.eight_threads_wall",
        "checkpoint.other_thread_cancelled",
        "checkpoint.other_thread_cleaning_up",
    ],
)
def test_checkpoint_statement_raises_once_its_scope_is_cancelled(
    name: str, prepare: Callable[[str], Prepared]
) -> None:
    """In-scope checkpoint cases time a checkpoint in a live scope of this thread.

    The timed loop runs without raising; once the setup's scope is cancelled,
    the same loop raises `Cancelled`, so it really checks that scope.
    """
    prepared = prepare(name)
    scope = current_scope()
    assert scope is not None
    assert scope is prepared.ns["_scope"]
    assert not scope.cancel_called
    prepared.run(100)
    scope.cancel("test")
    with pytest.raises(Cancelled):
        prepared.run(1)


def test_is_cancelled_statement_reads_the_live_scope(prepare: Callable[[str], Prepared]) -> None:
    """``is_cancelled.live_scope`` evaluates is_cancelled() of a live, then cancelled, scope."""
    prepared = prepare("is_cancelled.live_scope")
    assert eval(prepared.case.stmt, prepared.ns) is False
    prepared.ns["_scope"].cancel("test")
    assert eval(prepared.case.stmt, prepared.ns) is True


def test_deadline_case_has_a_deadline_one_hour_away(prepare: Callable[[str], Prepared]) -> None:
    """``checkpoint.deadline_armed`` runs in a scope whose deadline is about 1 hour away."""
    prepared = prepare("checkpoint.deadline_armed")
    remaining = prepared.ns["_scope"].deadline - time.monotonic()
    assert 3500 < remaining <= 3600


def test_ten_hooks_case_registers_ten_hooks(
    prepare: Callable[[str], Prepared], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``checkpoint.ten_hooks`` has ten on_cancel hooks on its scope; all run on cancel."""
    ran: list[int] = []
    monkeypatch.setattr(cases, "_noop_hook", lambda: ran.append(1))
    prepared = prepare("checkpoint.ten_hooks")
    scope = prepared.ns["_scope"]
    assert len(prepared.ns["_hooks"]) == cases.HOOKS == 10
    assert all(handle.scope is scope for handle in prepared.ns["_hooks"])
    scope.cancel("test")
    with pytest.raises(Cancelled) as info:
        prepared.run(1)
    # Unwind the scope with the Cancelled, as a `with` block would: the hooks run.
    assert scope.__exit__(Cancelled, info.value, info.value.__traceback__) is True
    prepared.teardown = lambda: None
    assert len(ran) == 10


@pytest.mark.parametrize("name", ["checkpoint.eight_threads", "checkpoint.eight_threads_wall"])
def test_eight_threads_case_has_seven_looping_threads_in_own_scopes(
    name: str, prepare: Callable[[str], Prepared]
) -> None:
    """The eight-thread cases run 7 other threads that loop on checkpoint() in their own scopes."""
    prepared = prepare(name)
    spinners = prepared.ns["_spinners"]
    assert len(spinners.threads) == cases.OTHER_THREADS == 7
    assert all(thread.is_alive() for thread in spinners.threads)
    scopes = {id(scope) for scope in spinners.scopes}
    assert len(scopes) == 7
    assert id(prepared.ns["_scope"]) not in scopes
    before = list(spinners.counts)
    prepared.run(1000)
    deadline = time.monotonic() + 5
    while not all(a > b for a, b in zip(spinners.counts, before, strict=True)):
        assert time.monotonic() < deadline, f"a thread is idle: {before} -> {spinners.counts}"
        time.sleep(0.01)
    assert (prepared.case.clock == "thread_cpu") == (name == "checkpoint.eight_threads")
    # Cancelling this thread's scope does not reach the other threads.
    prepared.ns["_scope"].cancel("test")
    with pytest.raises(Cancelled):
        prepared.run(1)
    time.sleep(0.02)
    assert spinners.errors == []


def test_other_thread_cancelled_case_takes_the_slow_path(
    prepare: Callable[[str], Prepared],
) -> None:
    """Another thread's scope is cancelled (the pending flag is up) but ours does not raise."""
    from cancellable import _scope

    prepared = prepare("checkpoint.other_thread_cancelled")
    helper = prepared.ns["_helper"]
    assert helper.scope is not None
    assert helper.scope.cancel_called
    assert _scope._pending is True
    prepared.run(100)
    assert not prepared.ns["_scope"].cancel_called


def test_other_thread_cleaning_up_case_is_on_the_fast_path(
    prepare: Callable[[str], Prepared],
) -> None:
    """Another thread's cancelled scope is inside its cleanup hook: the flag is down again."""
    from cancellable import _scope

    prepared = prepare("checkpoint.other_thread_cleaning_up")
    helper = prepared.ns["_helper"]
    assert helper.scope is not None
    assert helper.scope.cancel_called
    assert "entered" in repr(helper.scope)  # still inside it, in the hook
    assert _scope._pending is False
    prepared.run(100)
    assert not prepared.ns["_scope"].cancel_called


def _gets(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


@pytest.mark.parametrize(
    "name", ["alt.abortable_is_aborted", "alt.asyncresult_state", "alt.redis_get"]
)
def test_redis_alternatives_do_a_real_get(
    name: str, prepare: Callable[[str], Prepared], redis_client: Any
) -> None:
    """The Redis-backed alternatives send one GET to the server per statement."""
    prepared = prepare(name)
    before = _gets(redis_client)
    prepared.run(5)
    assert _gets(redis_client) - before >= 5
    if name != "alt.redis_get":
        # The task's meta is really stored, so the statement reads a value.
        assert prepared.ns["_app"].AsyncResult(prepared.ns["_tid"]).state == "STARTED"
        assert prepared.ns["_app"].conf.result_backend == REDIS_URL


def test_limitedset_case_uses_celerys_revoked_set(prepare: Callable[[str], Prepared]) -> None:
    """``alt.limitedset_contains`` looks a miss up in the worker's 50,000-id revoked set."""
    from celery.worker import state

    prepared = prepare("alt.limitedset_contains")
    assert prepared.ns["_revoked"] is state.revoked
    assert len(state.revoked) >= cases.REVOKED_IDS
    assert prepared.ns["_tid"] not in state.revoked


def test_micro_time_function_sets_up_once_and_measures(redis_client: Any) -> None:
    """micro.make_time_func returns positive times and sets its case up only once."""
    import micro

    calls: list[int] = []
    case = cases.Case("baseline.probe", "probe", "empty()", setup=lambda ns, o: calls.append(1))
    time_func = micro.make_time_func(case, cases.Options())
    assert time_func(10) > 0
    assert time_func(10) > 0
    assert calls == [1]


# --------------------------------------------------------------------------
# Helpers.


def test_ratios_are_net_of_the_harness_loop() -> None:
    """add_ratios subtracts the harness loop and divides by the baselines."""
    results = [
        {"name": "baseline.timeit_loop", "median": 5.0, "unit": "ns", "runs": 1},
        {"name": "baseline.empty_call", "median": 25.0, "unit": "ns", "runs": 1},
        {"name": "baseline.loop_iteration", "median": 10.0, "unit": "ns", "runs": 1},
        {"name": "checkpoint.live_scope", "median": 29.0, "unit": "ns", "runs": 1},
        {"name": "context.body_1us.overhead_pct", "median": 2.0, "unit": "%", "runs": 1},
        _common.skipped("celery.request_revoked", "not yet"),
    ]
    _common.add_ratios(results)
    live = results[3]
    assert live["ratio_to_empty_call"] == pytest.approx(24.0 / 20.0)
    assert live["ratio_to_loop_iteration"] == pytest.approx(2.4)
    assert "ratio_to_empty_call" not in results[4]
    assert "ratio_to_empty_call" not in results[5]


def test_schema_check_catches_bad_documents() -> None:
    """check_schema reports extra keys, missing ratios, bad skips and missing names."""
    good = {
        "environment": _common.environment(),
        "results": [
            {"name": "alt.x", "median": 1.0, "unit": "ns", "runs": 2},
            _common.skipped("latency.y", "why"),
        ],
    }
    problems = _common.check_schema(good, ["alt.x", "latency.y", "alt.z"])
    assert any("per-call result without ratios" in p for p in problems)
    assert any("missing results" in p and "alt.z" in p for p in problems)
    good["results"][0].update(ratio_to_empty_call=1.0, ratio_to_loop_iteration=1.0)
    assert _common.check_schema(good, ["alt.x", "latency.y"]) == []
    bad = json.loads(json.dumps(good))
    bad["results"][0]["extra"] = 1
    bad["results"][1]["reason"] = ""
    bad["environment"].pop("date")
    problems = _common.check_schema(bad)
    assert len(problems) == 3
    assert any("environment keys" in p for p in problems)
    assert any("unexpected keys ['extra']" in p for p in problems)
    assert any("skipped record" in p for p in problems)


def test_paired_ratios_time_the_named_cases() -> None:
    """paired.py interleaves exactly the harness, empty-call and checkpoint cases."""
    import paired

    assert paired._ROLES == {
        "harness": "baseline.timeit_loop",
        "empty": "baseline.empty_call",
        "outside_scope": "checkpoint.outside_scope",
        "live_scope": "checkpoint.live_scope",
        "other_thread_cancelled": "checkpoint.other_thread_cancelled",
    }
    values = paired.measure(rounds=2, ms_per_loop=0.1)
    assert {role: len(v) for role, v in values.items()} == dict.fromkeys(paired._ROLES, 2)
    assert all(v > 0 for vs in values.values() for v in vs)
    assert current_scope() is None


def test_only_pattern_selection() -> None:
    """``--only`` takes a glob, or a substring when it has no wildcard."""
    assert _common.selected("checkpoint.live_scope", "checkpoint.*")
    assert not _common.selected("alt.redis_get", "checkpoint.*")
    assert _common.selected("alt.redis_get", "redis")
    assert _common.selected("anything.at_all", None)
    import micro

    names = [case.name for case in micro.select_cases("alt.redis_get")]
    assert names == [*cases.BASELINES, "alt.redis_get"]


def test_overhead_loops_differ_only_by_a_checkpoint() -> None:
    """The context loop with checkpoints raises in a cancelled scope; the plain one does not."""
    with CancelScope() as scope:
        scope.cancel("test")
        overhead.loop_plain(3, 1)
        with pytest.raises(Cancelled):
            overhead.loop_checkpoint(3, 1)
    calls = _calls_during(lambda: overhead.loop_checkpoint(4, 2))
    assert sum(code is cancellable.checkpoint.__code__ for code in calls) == 4
    assert sum(code is overhead.body.__code__ for code in calls) == 4
    assert overhead.body(50) == overhead.body(50)


def test_overhead_calibration_orders_the_bodies() -> None:
    """Calibrated body sizes grow with the target cost, and the measured costs too."""
    small = overhead.calibrate(1_000, budget=0.0005)
    large = overhead.calibrate(10_000, budget=0.0005)
    assert small[0] < large[0]
    assert small[1] < large[1]
    pct, added = overhead.measure_pairs(small[0], 50, 2)
    assert len(pct) == len(added) == 2


def test_in_task_records_use_the_baselines_of_the_same_task() -> None:
    """celery.* ratios come from the harness, empty call and loop timed in the same task."""
    payload = {
        "values": {
            "revoked": [3005.0, 3005.0],
            "bound_revoked": [1005.0],
            "checkpoint": [29.0, 29.0, 29.0],
            "harness": [5.0],
            "empty": [25.0, 25.0],
            "loop": [10.0],
        }
    }
    records = in_task.records_from(payload, list(in_task.NAMES))
    _common.add_ratios(records)
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == {
        "celery.request_revoked",
        "celery.bound_request_revoked",
        "celery.checkpoint_in_task",
    }
    assert by_name["celery.request_revoked"]["ratio_to_empty_call"] == pytest.approx(150.0)
    assert by_name["celery.checkpoint_in_task"]["ratio_to_loop_iteration"] == pytest.approx(2.4)
    assert all("_baselines" not in r for r in records)
    failed = in_task.records_from({"error": "no revoked()"}, ["celery.request_revoked"])
    assert failed == [_common.skipped("celery.request_revoked", "no revoked()")]


def test_celery_parts_are_skipped_with_a_reason_in_smoke_mode(smoke_run: dict[str, Any]) -> None:
    """Without workers (``--smoke``), every Celery result is an explicit skip naming why."""
    by_name = {r["name"]: r for r in smoke_run["doc"]["results"]}
    for name in CELERY_NAMES:
        assert by_name[name]["skipped"] is True
        reason = by_name[name]["reason"]
        assert "smoke" in reason or "cancellable.celery" in reason, reason


# --------------------------------------------------------------------------
# Delivery latency and throughput over a real worker.


def test_full_run_takes_enough_latency_samples() -> None:
    """The full run times >= 200 cancellations per variant, 5,000 tasks per throughput round."""
    import latency
    import throughput

    full = latency.SAMPLES["full"]
    assert full["main"] >= 200
    assert full["others"] >= 200
    assert full["abortable"] >= 200
    assert set(latency.VARIANTS) == {
        "",
        "async",
        "prefork_rabbitmq",
        "threads_redis",
        "async_threads_redis",
        "threads_rabbitmq",
    }
    assert throughput.SETTINGS["full"][0] == 5000
    assert throughput.SETTINGS["full"][1] >= 2


def test_proc_helpers_see_a_child_die(tmp_path: Path) -> None:
    """live_children lists a live child; once killed it is gone (a zombie counts as dead)."""
    import latency

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in latency.live_children(os.getpid())
        assert not latency.process_gone(child.pid)
        child.kill()
        deadline = time.monotonic() + 5
        while not latency.process_gone(child.pid):  # a zombie until we reap it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert child.pid not in latency.live_children(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert latency.process_gone(child.pid)


@pytest.fixture(scope="module")
def bench_worker(redis_client: Any) -> Iterator[Any]:
    """A real ``celery worker --pool=prefork -c 2`` of the benchmark app, always stopped."""
    import _workers

    with _workers.session(REDIS_URL) as worker:
        yield worker


def test_latency_smoke_run_over_a_real_worker(bench_worker: Any, tmp_path: Path) -> None:
    """latency.run measures every prefork name, keeps the raw samples and plots their CDF.

    Its one ``revoke(terminate=True)`` sample kills exactly one pool child
    (the revoke without terminate and the abort kill none), and the pool is
    back to two live children afterwards.
    """
    import latency
    import run as driver

    before = latency._wait_pool_full(bench_worker)
    assert len(before) == bench_worker.concurrency == 2
    records = latency.run("smoke", None, REDIS_URL, bench_worker)
    after = latency.live_children(bench_worker.pid)
    dead = before - after
    assert len(dead) == latency.SAMPLES["smoke"]["terminate"] == 1, (before, after)
    assert latency.process_gone(dead.pop())
    assert len(after) == 2
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == set(latency.NAMES)
    counts = latency.SAMPLES["smoke"]
    for name in (*latency.variant_names(""), *latency.variant_names("async")):
        assert by_name[name]["runs"] == counts["main"] == len(latency.RAW[name])
    for name in latency.TERMINATE_NAMES:
        assert by_name[name]["runs"] == counts["terminate"] == len(latency.RAW[name])
    for name in latency.ABORTABLE_NAMES:
        assert by_name[name]["runs"] == counts["abortable"] == len(latency.RAW[name])
    for name in latency.NAMES:
        if name.startswith(
            ("latency.threads", "latency.prefork_rabbitmq", "latency.async_threads")
        ):
            assert by_name[name]["skipped"], name  # other workers: full run only
        else:
            assert 0 < by_name[name]["median"] < latency.STEP_TIMEOUT * 1000, name
    # Checkpoint before cleanup before nothing else; the child dies before the pool refills.
    raw = latency.RAW
    for prefix in ("latency.", "latency.async."):
        for raised, cleanup in zip(
            raw[prefix + "revoke_to_checkpoint"], raw[prefix + "revoke_to_cleanup"], strict=True
        ):
            assert raised <= cleanup
    assert (
        0 < raw["latency.terminate.to_process_death"][0] < raw["latency.terminate.to_pool_full"][0]
    )
    assert 0 < raw["latency.abortable_100ms.to_noticed"][0] < 200
    # The CDF plot and its samples are written.
    png = tmp_path / "cdf.png"
    driver.write_cdf(dict(raw), png)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 5000
    saved = json.loads(png.with_suffix(".json").read_text())
    assert saved["unit"] == "ms"
    assert saved["samples"]["latency.revoke_to_checkpoint"] == raw["latency.revoke_to_checkpoint"]
    with pytest.raises(ValueError, match="no latency samples"):
        latency.plot_cdf({}, tmp_path / "none.png")


def test_abortable_sample_sees_is_aborted_turn_true(bench_worker: Any, redis_client: Any) -> None:
    """The AbortableTask polls is_aborted() every 100 ms and returns once it is True."""
    from celery.contrib.abortable import AbortableTask

    import latency
    from bench_app import ABORT_POLL_SECONDS, abortable_poll

    assert isinstance(abortable_poll, AbortableTask)
    assert ABORT_POLL_SECONDS == 0.1
    sample = latency.one_abortable_sample(bench_worker, redis_client, phase=0.05)
    # Noticed at the next poll: within one period (plus a backend round trip).
    assert 0 < sample["to_noticed"] < 1000 * ABORT_POLL_SECONDS + 50
    assert sample["to_final_state"] >= sample["to_noticed"] - 5


def test_abortable_task_polls_until_is_aborted(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench.abortable_poll calls is_aborted() at each poll and stops at the first True."""
    from celery.contrib.abortable import AbortableTask

    import bench_app

    answers = iter([False, False, True])
    monkeypatch.setattr(AbortableTask, "is_aborted", lambda self, **kw: next(answers))
    monkeypatch.setattr(bench_app, "ABORT_POLL_SECONDS", 0.001)
    # The task's own client, on the tests' Redis (not the module's default URL).
    monkeypatch.setattr(bench_app, "REDIS_URL", REDIS_URL)
    monkeypatch.setattr(bench_app, "_client", None)
    key = "cancellable-bench:test-abortable"
    try:
        assert bench_app.abortable_poll.run(key) == "aborted"
        assert int(redis_client.hget(key, "polls")) == 3
        assert float(redis_client.hget(key, "noticed")) >= float(redis_client.hget(key, "started"))
    finally:
        redis_client.delete(key)


def test_throughput_ratio_over_a_real_worker(bench_worker: Any) -> None:
    """Alternating plain/cancellable rounds give the rates and their per-pair ratio."""
    import throughput

    records = throughput.worker_records("smoke", bench_worker)
    assert set(records) == set(throughput.WORKER_NAMES)
    ratio = records["throughput.cancellable_to_plain_ratio"]
    assert ratio["unit"] == "x"
    plain = records["throughput.plain_tasks_per_s"]["median"]
    with_scope = records["throughput.cancellable_tasks_per_s"]["median"]
    assert ratio["median"] == pytest.approx(with_scope / plain)  # one pair in smoke mode
    assert statistics.median([plain, with_scope]) > 0


# --------------------------------------------------------------------------
# Bulk cancellation over a real worker.


def test_bulk_full_run_settings() -> None:
    """The full run cancels 1k, 10k and 100k queued ids per call, past a capped revoked set."""
    import bulk

    assert bulk.SIZES["full"] == (1000, 10000, 100000)
    assert bulk.REVOKES_MAX == 100
    assert bulk.SUSTAINED["full"][0] >= 10
    assert dict(bulk.SUSTAINED_KINDS) == {"single": 1, "batch100": 100}
    assert set(bulk.size_names(bulk.SIZES["full"])) <= set(bulk.NAMES)


def test_bulk_is_skipped_with_a_reason_in_smoke_mode(smoke_run: dict[str, Any]) -> None:
    """``run.py --smoke`` starts no worker: every bulk.* name is an explicit skip."""
    import bulk

    by_name = {r["name"]: r for r in smoke_run["doc"]["results"]}
    for name in bulk.NAMES:
        assert by_name[name]["skipped"] is True, name
        assert "smoke" in by_name[name]["reason"]


def test_bulk_smoke_run_over_a_real_worker(redis_client: Any) -> None:
    """100 queued ids, one cancel(): one ledger entry, 100 indexed, none ran, all REVOKED.

    The worker is the part's own (Celery's revoked set capped at 100), and
    the sustained loops lose nothing either.  A group of 100 cancelled three
    ways runs none of them; cancel(group_result) is one target.
    """
    import bulk

    records = bulk.run("smoke", None, REDIS_URL)
    by_name = {r["name"]: r for r in records}
    for suffix, unit in bulk.PER_SIZE:
        record = by_name[f"bulk.ids_100.{suffix}"]
        assert not record.get("skipped"), record
        assert record["unit"] == unit
    value = {name: r["median"] for name, r in by_name.items() if not r.get("skipped")}
    assert value["bulk.ids_100.tasks_run"] == 0
    assert value["bulk.ids_100.tasks_revoked"] == 100
    assert value["bulk.ids_100.ledger_entries"] == 1
    assert value["bulk.ids_100.index_targets_added"] == 100
    assert value["bulk.ids_100.broadcast_body_bytes"] > 100 * 36
    assert value["bulk.ids_100.broadcast_wire_bytes"] > value["bulk.ids_100.broadcast_body_bytes"]
    assert 0 < value["bulk.ids_100.cancel_ms"] < 10_000
    assert 40 < value["bulk.ids_100.index_bytes_per_entry"] < 1000
    for kind, _batch in bulk.SUSTAINED_KINDS:
        prefix = f"bulk.sustained.{kind}."
        assert value[prefix + "tasks_run"] == 0
        assert value[prefix + "ids_cancelled"] > 0
        assert value[prefix + "queued_ids_cancelled"] > 0
        assert value[prefix + "tasks_revoked"] == value[prefix + "queued_ids_cancelled"]
        assert value[prefix + "calls_per_s"] > 0
    for name in bulk.PARTS_NAMES:
        assert value[name] > 0
    for how in bulk.GROUP_HOWS:
        prefix = f"bulk.group_100.{how}."
        assert value[prefix + "tasks_run"] == 0
        assert value[prefix + "tasks_revoked"] == 100
        assert value[prefix + "broadcasts"] == 1
        assert value[prefix + "client_ms"] > 0
        assert value[prefix + "all_revoked_s"] > 0
    # One group target, against one per member id.
    assert value["bulk.group_100.group.ledger_entries"] == 1
    assert value["bulk.group_100.group.index_targets_added"] == 1
    assert value["bulk.group_100.ids.index_targets_added"] == 100
    assert (
        value["bulk.group_100.group.broadcast_wire_bytes"]
        < value["bulk.group_100.ids.broadcast_wire_bytes"] / 5
    )
    for name in (*bulk.size_names(bulk.SIZES["full"]), *bulk.group_names(bulk.SIZES["full"])):
        assert by_name[name]["skipped"]
        assert "smoke" in by_name[name]["reason"]


def test_hot_path_selection_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--hot-path`` runs the three checkpoint cases and the baselines; ``table`` prints a row.

    The row's ratios are computed from the same file: net of the harness
    loop and gross, against that run's empty call.
    """
    import micro

    names = [case.name for case in micro.select_cases(None, hot_path=True)]
    assert names == [
        case.name for case in cases.CASES if case.name in (*cases.BASELINES, *micro.HOT_PATH)
    ]
    assert set(micro.HOT_PATH) == {
        "checkpoint.live_scope",
        "checkpoint.outside_scope",
        "checkpoint.other_thread_cancelled",
        "checkpoint.other_thread_cleaning_up",
    }
    out = tmp_path / "hot.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "micro.py"), "--hot-path", "-o", str(out)]
        + micro.PYPERF_OPTIONS["smoke"]
        + ["--processes", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    import pyperf

    (row,) = micro.hot_path_rows([pyperf.BenchmarkSuite.load(str(out))])
    loop, empty = row["loop_ns"], row["empty_ns"]
    assert row["python"] == ".".join(map(str, sys.version_info[:3]))
    for short in (
        "live_scope",
        "outside_scope",
        "other_thread_cancelled",
        "other_thread_cleaning_up",
    ):
        assert row[f"{short}_net"] == pytest.approx((row[f"{short}_ns"] - loop) / (empty - loop))
        assert row[f"{short}_gross"] == pytest.approx(row[f"{short}_ns"] / empty)
    micro.print_table([str(out)])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3
    assert table[2].startswith(f"| {row['python']} |")


# --------------------------------------------------------------------------
# Instruction counts (valgrind).


def test_instructions_program_runs_a_case_with_its_setup() -> None:
    """``--one CASE LOOPS`` (what valgrind runs) sets the case up, loops and tears it down.

    The valgrind runs themselves take half a minute each on this machine,
    too long for the suite; the table in docs/performance.md comes from
    them.
    """
    import instructions

    assert set(instructions.CASES) <= set(cases.CASES_BY_NAME)
    assert set(instructions.BASELINES) <= set(cases.BASELINES)
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "instructions.py"),
            "--one",
            "checkpoint.other_thread_cancelled",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------
# The peers side by side.


def _wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_dramatiq_case_runs_in_a_registered_actor_thread(
    prepare: Callable[[str], Prepared],
) -> None:
    """``abort_requested()`` runs with this thread registered as a running actor's thread.

    Before an abort it answers None; a real ``abort(id, abort_timeout=60 s)``
    over Redis reaches dramatiq-abort's watcher thread, after which the same
    statement answers the milliseconds left before the forced abort.
    """
    import dramatiq
    from dramatiq_abort import Abortable

    prepared = prepare("peers.dramatiq_abort_requested")
    abortable, message = prepared.ns["_abortable"], prepared.ns["_message"]
    assert isinstance(abortable, Abortable)
    assert dramatiq.get_broker() is prepared.ns["_broker"]
    assert abortable in prepared.ns["_broker"].middleware
    assert abortable.manager.abortable_messages[message.message_id] is threading.current_thread()
    assert eval(prepared.case.stmt, prepared.ns) is None
    prepared.run(100)
    abortable.abort(message.message_id, abort_timeout=60_000)
    # The watcher re-reads the running messages once a second (BLPOP, 1 s).
    # Generous: under load the cycle stretches (seen over 5 s with the machine busy).
    _wait_until(lambda: eval(prepared.case.stmt, prepared.ns) is not None, 20, "the abort")
    left = eval(prepared.case.stmt, prepared.ns)
    assert 50_000 < left <= 60_000
    other = prepare("peers.dramatiq_abort_requested_middleware")
    assert "middleware=_abortable" in other.case.stmt


def test_temporal_case_runs_inside_an_activity(prepare: Callable[[str], Prepared]) -> None:
    """``activity.is_cancelled()`` is timed inside ``ActivityEnvironment.run``; it sees a cancel."""
    from temporalio import activity
    from temporalio.testing import ActivityEnvironment

    prepared = prepare("peers.temporal_is_cancelled")
    env = prepared.ns["_env"]
    assert isinstance(env, ActivityEnvironment)
    assert prepared.case.run_inside == "_run_inside"
    with pytest.raises(RuntimeError, match="Not in activity context"):
        activity.is_cancelled()  # outside env.run there is no activity
    assert prepared.run(100) > 0
    assert env.run(eval, prepared.case.stmt, prepared.ns) is False
    env.cancel()
    assert env.run(eval, prepared.case.stmt, prepared.ns) is True


def test_cancelscope_cases_check_a_live_scope(prepare: Callable[[str], Prepared]) -> None:
    """cancelscope's checkpoint() and is_cancelled() read the entered scope; cancelling it tells."""
    import cancelscope

    prepared = prepare("peers.cancelscope_checkpoint")
    scope = prepared.ns["_cs_scope"]
    assert cancelscope.current_scope() is scope
    prepared.run(100)
    checked = prepare("peers.cancelscope_is_cancelled")
    inner_scope = checked.ns["_cs_scope"]
    assert eval(checked.case.stmt, checked.ns) is False
    inner_scope.cancel("test")
    assert eval(checked.case.stmt, checked.ns) is True
    # The checkpoint case's statement now raises: this thread's scope is cancelled.
    with pytest.raises(cancelscope.Cancelled):
        prepared.run(1)
    # The outer scope of the first case is not cancelled (it is the parent).
    assert not scope.cancel_called


def test_peer_cases_need_their_packages_and_are_skipped_without() -> None:
    """Every peers.* case names the packages it imports; a missing one makes it skip."""
    import micro

    peer_cases = [case for case in cases.CASES if case.name.startswith("peers.")]
    assert len(peer_cases) == 5
    assert all(case.requires and not cases.missing(case) for case in peer_cases)
    absent = cases.Case("peers.probe", "probe", "pass", requires=("no_such_module_here",))
    assert cases.missing(absent) == ["no_such_module_here"]
    names = [case.name for case in micro.select_cases(None, peers=True)]
    assert names == [
        case.name for case in cases.CASES if case.name in {*cases.BASELINES, *micro.PEERS_TABLE}
    ]
    assert {"checkpoint.live_scope", "is_cancelled.live_scope"} <= set(names)
    assert {case.name for case in peer_cases} <= set(names)


def test_peers_table_from_pyperf_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``micro.py --peers`` times ours and the peers; ``peers.py table`` gives per-pass ratios."""
    import pyperf

    import micro
    import peers

    out = tmp_path / "peers-1.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "micro.py"), "--peers", "-o", str(out)]
        + micro.PYPERF_OPTIONS["smoke"]
        + ["--processes", "1", "--redis-url", REDIS_URL],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    suite = pyperf.BenchmarkSuite.load(str(out))
    benches = suite.get_benchmarks()
    medians = {b.get_name(): statistics.median(b.get_values()) * 1e9 for b in benches}
    assert set(medians) == {case.name for case in micro.select_cases(None, peers=True)}
    loop, empty = medians["baseline.timeit_loop"], medians["baseline.empty_call"]
    ours = medians["checkpoint.live_scope"]
    rows = peers.pass_ratios([suite, suite])  # the same pass twice: min == median == max
    assert set(rows) == set(medians)
    for name, row in rows.items():
        assert row["passes"] == 2, name
        net = medians[name] - loop
        assert (
            row["ratio"]
            == row["ratio_min"]
            == row["ratio_max"]
            == pytest.approx(net / (empty - loop))
        )
        assert row["to_ours"] == pytest.approx(net / (ours - loop))
    assert rows["baseline.empty_call"]["ratio"] == pytest.approx(1.0)
    peers.print_table([str(out)])
    table = capsys.readouterr().out
    for name in micro.PEERS_TABLE:
        assert f"| `{name}` |" in table


def test_peers_latency_is_skipped_with_a_reason_in_smoke_mode(smoke_run: dict[str, Any]) -> None:
    """``run.py --smoke`` starts no worker: the peers' latency is an explicit skip."""
    import peers

    by_name = {r["name"]: r for r in smoke_run["doc"]["results"]}
    for name in peers.NAMES:
        assert by_name[name]["skipped"] is True, name
        assert "smoke" in by_name[name]["reason"]
    for case in cases.CASES:
        if case.name.startswith("peers."):
            assert "ratio_to_empty_call" in by_name[case.name], case.name


def test_peers_latency_smoke_run_over_real_workers(bench_worker: Any, redis_client: Any) -> None:
    """Ours and dramatiq-abort's delivery, sampled in turns over real workers on the same Redis.

    A real ``dramatiq peers_app`` worker runs the actor, and `Abort` reaches
    it, both when aborted 100 ms after it started and once the watcher waits
    on it (1.2 s after start); our revoke reaches the checkpoint.  Every
    sample is recorded; how long each took is the benchmark's to report.
    """
    import peers

    records = peers.run("smoke", None, REDIS_URL, bench_worker)
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == set(peers.NAMES)
    rounds, settled_every = peers.SAMPLES["smoke"]
    counts = {
        peers.OURS: rounds,
        peers.DRAMATIQ: rounds,
        peers.DRAMATIQ_SETTLED: rounds // settled_every,
    }
    for name, count in counts.items():
        assert by_name[name]["unit"] == "ms"
        assert by_name[name]["runs"] == count == len(peers.RAW[name]), name
        assert all(0 < value < peers.STEP_TIMEOUT * 1000 for value in peers.RAW[name]), name
    # How long each took is for the benchmark to report, not for this test
    # to bound: on a loaded machine dramatiq-abort's 1 s watcher cycle
    # stretches.  Each arrived within the step timeout (asserted above).
    # Nothing is left behind in Redis by the samples.
    assert not list(redis_client.scan_iter("cancellable-bench:peers:*"))


def test_ladder_table_says_when_a_task_was_not_stopped() -> None:
    """``ladder.table``: one row per case; a missing median reads "not stopped"."""
    import ladder

    records = [
        {"name": "ladder.gil.grace_1.revoked_s", "median": 2.06},
        {"name": "ladder.gil.grace_1.stopped_s", "median": 2.06},
        {"name": "ladder.gil.grace_1.full_strength_s", "median": 2.16},
        {"name": "ladder.gil.terminate_SIGTERM.revoked_s", "median": 0.01},
        {"name": "ladder.gil.terminate_SIGTERM.stopped_s", "median": None},
        {"name": "ladder.gil.terminate_SIGTERM.full_strength_s", "median": 8.35},
    ]

    rows = ladder.table(records).splitlines()[2:]

    assert ["| gil | `cancel(grace=1)` | 2.06 | 2.06 | 2.16 |",
            "| gil | `revoke(terminate=True, signal=SIGTERM)` | 0.01 | not stopped | 8.35 |",
            ] == rows  # fmt: skip
    assert ladder._median([1.0, None]) is None
    assert 2.0 == ladder._median([1.0, 2.0, 3.0])
