"""The randomized soak (short mode in the normal suite; long mode by environment).

    CANCELLABLE_SOAK=long CANCELLABLE_SOAK_SEED=3 CANCELLABLE_SOAK_MINUTES=8 \\
        .venv/bin/python -m pytest tests/soak -m soak -s

``CANCELLABLE_SOAK_LEDGER=postgresql`` runs it against a PostgreSQL ledger (a
database the soak creates on the server of ``tests/sql_dbs.py`` and drops).

Fails (never skips) when redis-server is missing.  The seed and the run
directory (event files, worker and Redis logs, records.json, report.txt) are
printed, so a run can be repeated and its evidence read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .driver import Soak, code_version
from .harness import RedisServer
from .plan import ENV_DIR, make_plan, mode_from_env

MODE = mode_from_env()
#: pytest-timeout bound: the schedule, the drain, start-up and slack.
TIMEOUT = int(MODE.duration + MODE.drain_timeout + MODE.visibility_timeout + 240)


@pytest.fixture(name="run_dir")
def run_dir_fixture(tmp_path: Path) -> Path:
    base = os.environ.get(ENV_DIR)
    if base:
        path = Path(base) / f"soak-{MODE.name}-seed{MODE.seed}-{int(time.time())}"
        path.mkdir(parents=True)
        return path
    return tmp_path


@pytest.mark.soak
@pytest.mark.timeout(TIMEOUT)
def test_soak(run_dir: Path) -> None:
    """Every promise of docs/reliability.md holds over a seeded run with faults."""
    if RedisServer.binary() is None:
        pytest.fail("the soak needs redis-server (e.g. apt-get install redis-server); not found")
    header = f"soak {MODE.describe()} code={code_version()} run_dir={run_dir}"
    print(f"\n{header}", flush=True)
    began = time.monotonic()
    soak = Soak(make_plan(MODE), run_dir)
    report = soak.run()
    wall = time.monotonic() - began
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in soak.timings.items())
    hangs = ", ".join(f"{ended - began:.1f}s" for began, ended in soak.hangs)
    cuts = ", ".join(f"{ended - began:.1f}s" for began, ended in soak.cuts)
    summary = report.summary(
        f"{header}\nwall {wall:.1f}s ({timings}); redis restarts {soak.redis.restarts}; "
        f"redis hangs (SIGSTOP) {len(soak.hangs)} ({hangs}); "
        f"connection cuts {len(soak.cuts)} ({cuts}), cancel() during them "
        f"{soak.cut_cancels['during']}, right after {soak.cut_cancels['after']}"
    )
    (run_dir / "report.txt").write_text(summary + "\n")
    print(summary, flush=True)

    violations = report.violations
    assert not violations, (
        f"{len(violations)} violation(s); repeat with CANCELLABLE_SOAK={MODE.name} "
        f"CANCELLABLE_SOAK_SEED={MODE.seed}; evidence in {run_dir}\n{summary}"
    )
