"""Smoke tests of the benchmark harnesses in ``benchmarks/``.

One ``benchmarks/run.py --smoke`` run (tiny counts) drives both harnesses for
real: the per-call harness through pyperf, and the real-worker harness
through a real prefork worker (and a dramatiq worker) on Redis DB 14.  The
tests check that the results document has every expected name, the
documented shape, and values that make sense (the empty call is 1 empty
call, nothing cancelled ever ran, cleanup comes after the raise, ...); the
numbers themselves mean nothing at these counts.  The instruction counter
and the hot-path table, which the docs also cite, get a run each.

Redis (``CANCELLABLE_TEST_REDIS``, see ``tests/redis_dbs.py``) is required;
without it these tests fail, saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests import redis_dbs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import run  # noqa: E402

REDIS_URL = redis_dbs.url(_common.REDIS_DB)

#: Results a smoke run may skip, and the reason they must give.
MAY_SKIP = {
    "only in the full run": lambda name: name.startswith(("latency.", "ladder.")),
    "checkpoint() returns no context manager": lambda name: name == "checkpoint.with_block",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``run.py --smoke`` with every output, once for the module; its files and stdout."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(f"the benchmark tests need Redis at {REDIS_URL}: {exc}", pytrace=False)
    finally:
        client.close()
    out = tmp_path_factory.mktemp("bench")
    files = {name: out / name for name in ("results.json", "overhead.png", "cdf.png", "groups.png")}
    outputs = ("--json", "results.json", "--plot", "overhead.png", "--cdf", "cdf.png")
    outputs += ("--groups-plot", "groups.png")
    args = [str(files[a]) if a in files else a for a in outputs]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--redis-url", REDIS_URL, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"run.py --smoke failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    doc = json.loads(files["results.json"].read_text())
    return {
        "doc": doc,
        "by_name": {r["name"]: r for r in doc["results"]},
        "files": files,
        "stdout": proc.stdout,
    }


def test_the_document_has_every_name_and_the_documented_shape(smoke: dict[str, Any]) -> None:
    """Every name of a smoke run is there, once, as a valid record; skips say why."""
    doc = smoke["doc"]

    assert [] == _common.check_schema(doc, run.expected_names("smoke"))
    for record in doc["results"]:
        if record.get("skipped"):
            reasons = [r for r, applies in MAY_SKIP.items() if applies(record["name"])]
            assert any(r in record["reason"] for r in reasons), record
    assert doc["environment"]["versions"]["pyperf"]
    assert "checkpoint.live_scope" in smoke["stdout"]


def test_per_call_results_are_ratios_of_the_same_run(smoke: dict[str, Any]) -> None:
    """The baselines give 0 and 1, every case is timed, and a network call costs more."""
    by_name = smoke["by_name"]

    assert 0.0 == by_name["baseline.timeit_loop"]["ratio_to_empty_call"]
    assert 1.0 == pytest.approx(by_name["baseline.empty_call"]["ratio_to_empty_call"])
    for name in ("checkpoint.live_scope", "is_cancelled.live_scope", "peers.temporal_is_cancelled"):
        assert by_name[name]["median"] > 0
        assert {"ratio_to_empty_call", "ratio_to_checkpoint"} <= set(by_name[name])
    assert by_name["alt.redis_get"]["median"] > 10 * by_name["checkpoint.live_scope"]["median"]
    assert by_name["context.body_1us.overhead_pct"]["unit"] == "%"
    assert (
        by_name["context.body_100us.body_ns"]["median"]
        > by_name["context.body_100ns.body_ns"]["median"]
    )
    assert "ratio_to_empty_call" in by_name["celery.request_revoked"]


def test_real_worker_results_make_sense(smoke: dict[str, Any]) -> None:
    """Cleanup follows the raise, cancelled tasks never run, and every time is positive."""
    by_name = smoke["by_name"]

    raised = by_name["latency.revoke_to_checkpoint"]["median"]
    assert 0 < raised <= by_name["latency.revoke_to_cleanup"]["median"] < 15_000
    assert by_name["latency.terminate.to_process_death"]["median"] > 0
    assert by_name["peers.latency.dramatiq_abort.abort_to_raise"]["median"] > 0
    assert by_name["throughput.cancellable_to_plain_ratio"]["median"] > 0
    for name, record in by_name.items():
        if name.startswith("bulk.") and name.endswith(".tasks_run"):
            assert 0 == record["median"], name
    assert 100 == by_name["bulk.ids_100.tasks_revoked"]["median"]
    assert 50 == by_name["bulk.group_50.group.tasks_revoked"]["median"]
    assert by_name["ladder.sleep.grace_0.revoked_s"]["median"] < 5


def test_the_plots_and_the_latency_samples_are_written(smoke: dict[str, Any]) -> None:
    """``--plot``, ``--cdf`` and ``--groups-plot`` write PNGs; the samples go beside the CDF."""
    files = smoke["files"]

    for name in ("overhead.png", "cdf.png", "groups.png"):
        assert files[name].read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
    samples = json.loads(files["cdf.png"].with_suffix(".json").read_text())
    assert "ms" == samples["unit"]
    assert len(samples["samples"]["latency.revoke_to_checkpoint"]) >= 1


def test_hot_path_program_and_table(tmp_path: Path) -> None:
    """``per_call.py --hot-path`` times the hot-path cases; ``table`` prints one row for them."""
    out = tmp_path / "hot.json"
    tiny = ("--in-process", "-q", "--values", "1", "--warmups", "0", "--loops", "1")
    subprocess.run(
        [sys.executable, str(BENCH / "per_call.py"), "--hot-path", *tiny, "-o", str(out)],
        check=True,
        timeout=120,
    )
    table = subprocess.run(
        [sys.executable, str(BENCH / "per_call.py"), "table", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout

    rows = [line for line in table.splitlines() if line.startswith(f"| {sys.version_info[0]}.")]
    assert 1 == len(rows)
    assert 12 == rows[0].count("|") - 1  # python, loop, empty call, 4 cases x 2, values


def test_instructions_program_runs_a_case_with_its_setup() -> None:
    """``instructions.py --one CASE LOOPS``, what valgrind runs, sets up and runs a case."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "instructions.py"), "--one", "checkpoint.live_scope", "100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert 0 == proc.returncode, proc.stderr
