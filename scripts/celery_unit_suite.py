#!/usr/bin/env python3
"""Run Celery's own unit tests with and without `cancellable` imported, and compare.

Importing `cancellable.celery` must not change how Celery behaves in a process
that only builds workers, requests and tasks (as Celery's unit tests do).  This
script takes Celery's test suite from the release's source distribution (the
wheel has no tests), installs it with its test requirements and this checkout
in a virtual environment of its own, and runs the same test files three times:

``plain``
    Celery's tests as Celery's CI runs them.
``integration``
    with ``cancellable.celery`` imported before the tests start (a pytest
    plugin, ``scripts/celery_unit_suite_plugins/cancellable_imported.py``).
``task-module``
    with a module that defines a ``@cancellable`` task imported (as a
    project's tasks module would be; ``cancellable_task_module.py``).

It then compares every test's outcome with the plain run and prints the tests
that fail or error only with `cancellable` imported.  It exits 0 when there
are none, 1 when there are, 2 when a run could not be made.

Usage (from the repository root; needs network access to PyPI the first time)::

    python3 scripts/celery_unit_suite.py            # Celery 5.7.0, python3
    python3 scripts/celery_unit_suite.py --celery 5.6.3 --python python3.12

Everything it downloads and builds lives in ``.celery-suite/`` (ignored by
git); delete that folder to start from scratch.  The checkout is installed
in editable mode, so a re-run tests the code as it is now.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "celery_unit_suite_plugins"

#: The parts of Celery's suite that build workers, requests, tasks and pools.
TEST_PATHS = (
    "t/unit/worker",
    "t/unit/tasks",
    "t/unit/app/test_control.py",
    "t/unit/concurrency/test_prefork.py",
    "t/unit/contrib",
)

#: Run name -> the pytest plugin module loaded with ``-p`` (None: none).
RUNS = {
    "plain": None,
    "integration": "cancellable_imported",
    "task-module": "cancellable_task_module",
}

#: The requirements of Celery's ``requirements/test.txt`` these tests use;
#: the rest (pytest-celery's Docker machinery, moto, boto3, mypy, pre-commit
#: and the result-backend extras) serve other parts of the suite.
TEST_REQUIREMENT_PREFIXES = (
    "pytest==",
    "pytest-rerunfailures",
    "pytest-subtests",
    "pytest-timeout",
    "pytest-click",
    "pytest-order",
    "freezegun",
)

BAD = ("failed", "error")


def sh(*cmd: str | Path, cwd: Path | None = None) -> None:
    """Run a command, echoing it; stop the script if it fails."""
    print("$", " ".join(str(part) for part in cmd), flush=True)
    subprocess.run([str(part) for part in cmd], cwd=cwd, check=True)


def fetch_sources(version: str, work: Path) -> Path:
    """Download and unpack Celery's sdist (with its ``t/`` tests); return its folder."""
    source = work / f"celery-{version}"
    if (source / "t" / "unit").is_dir():
        return source
    archive = work / f"celery-{version}.tar.gz"
    if not archive.exists():
        sh(
            sys.executable, "-m", "pip", "download", f"celery=={version}",
            "--no-binary", ":all:", "--no-deps", "--quiet", "-d", work,
        )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return source


def test_requirements(source: Path) -> list[str]:
    """The lines of Celery's test requirements this script installs."""
    lines = (source / "requirements" / "test.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith(TEST_REQUIREMENT_PREFIXES)]


def make_venv(python: str, version: str, source: Path, work: Path) -> Path:
    """A venv with this Celery, its test requirements and this checkout; return its python."""
    venv = work / f"venv-{version}-{Path(python).name}"
    py = venv / "bin" / "python"
    if not py.exists():
        sh(python, "-m", "venv", venv)
        sh(py, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        sh(py, "-m", "pip", "install", "--quiet", source, *test_requirements(source))
    # Every run: the checkout's current dependencies, Celery held at the version under test.
    constraints = work / f"constraints-{version}.txt"
    constraints.write_text(f"celery=={version}\n")
    sh(py, "-m", "pip", "install", "--quiet", "-c", constraints, "-e", f"{REPO}[celery]")
    return py


def run_suite(py: Path, source: Path, results: Path, name: str, plugin: str | None) -> float:
    """Run the test files once; write JUnit XML to ``results/<name>.xml``; return seconds."""
    cmd = [str(py), "-m", "pytest", *TEST_PATHS, "-q", "-p", "no:cacheprovider"]
    cmd += ["--timeout=120", f"--junitxml={results / f'{name}.xml'}", "-o", "junit_logging=no"]
    if plugin is not None:
        cmd += ["-p", plugin]
    env = {**os.environ, "PYTHONPATH": str(PLUGINS), "PYTHONDONTWRITEBYTECODE": "1"}
    log = results / f"{name}.log"
    print(f"$ {' '.join(cmd)}  > {log}", flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        subprocess.run(cmd, cwd=source, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    return time.monotonic() - started


def outcomes(junit: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Test id -> passed / failed / error / skipped, and test id -> why it failed.

    From a JUnit XML report, where a test whose call failed and whose teardown
    errored has two entries.  A test with an error in any phase counts as
    ``error``.  The reason is the call's failure message if there is one, else
    the error's, with numbers and addresses blanked so that one cause reads
    the same in every test.
    """
    kinds: dict[str, set[str]] = {}
    messages: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds.setdefault(test_id, set()).update(child.tag for child in case)
        for child in case:
            if child.tag in ("error", "failure"):
                message = re.sub(r"0x[0-9a-f]+|\d+", "N", child.get("message") or "")
                messages.setdefault(test_id, {})[child.tag] = " ".join(message.split())[:160]
    found: dict[str, str] = {}
    for test_id, tags in kinds.items():
        if "error" in tags:
            found[test_id] = "error"
        elif "failure" in tags:
            found[test_id] = "failed"
        elif "skipped" in tags:
            found[test_id] = "skipped"
        else:
            found[test_id] = "passed"
    why = {
        test_id: by_tag.get("failure") or by_tag["error"] for test_id, by_tag in messages.items()
    }
    return found, why


def test_files(source: Path) -> list[str]:
    """The test modules under `TEST_PATHS` (pytest's default ``test_*.py`` pattern)."""
    files: set[str] = set()
    for path in map(source.joinpath, TEST_PATHS):
        found = [path] if path.is_file() else path.rglob("test_*.py")
        files.update(str(file.relative_to(source)) for file in found)
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    """Download, install, run three times, compare; print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celery", default="5.7.0", help="the Celery release (default 5.7.0)")
    parser.add_argument("--python", default="python3", help="the interpreter for the venv")
    parser.add_argument("--work", type=Path, default=REPO / ".celery-suite", help="work folder")
    parser.add_argument("--show", type=int, default=20, help="new failures listed per run")
    parser.add_argument(
        "--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs to make"
    )
    parser.add_argument(
        "--no-run", action="store_true", help="only compare the reports of the last runs"
    )
    parser.add_argument(
        "--reuse-plain",
        action="store_true",
        help="keep the last plain run's report (it does not depend on cancellable's code)",
    )
    args = parser.parse_args(argv)
    if "plain" not in args.runs:
        parser.error("the plain run is the baseline: include it")
    if shutil.which(args.python) is None and not Path(args.python).exists():
        parser.error(f"no interpreter {args.python!r}")

    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = fetch_sources(args.celery, work)
    py = make_venv(args.python, args.celery, source, work) if not args.no_run else None
    results = work / f"results-{args.celery}"
    results.mkdir(exist_ok=True)

    seconds: dict[str, float] = {}
    found: dict[str, dict[str, str]] = {}
    why: dict[str, dict[str, str]] = {}
    for name in args.runs:
        reuse = name == "plain" and args.reuse_plain and (results / "plain.xml").exists()
        if py is not None and not reuse:
            seconds[name] = run_suite(py, source, results, name, RUNS[name])
        junit = results / f"{name}.xml"
        if not junit.exists():
            print(f"the {name} run wrote no report; see {results / f'{name}.log'}")
            return 2
        found[name], why[name] = outcomes(junit)

    tested_at = results / "tested-at.txt"
    if py is not None:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        tested_at.write_text(commit or "no git")
    commit = tested_at.read_text() if tested_at.exists() else "unknown"
    files = test_files(source)
    print()
    print(f"Celery {args.celery} unit suite, cancellable at {commit}")
    print(f"{len(files)} test modules from {', '.join(TEST_PATHS)}:")
    print(textwrap.fill(" ".join(files), width=100, initial_indent="  ", subsequent_indent="  "))
    header = ("tests", 6), ("passed", 7), ("failed", 7), ("errors", 7), ("skipped", 8), ("s", 6)
    print(f"{'run':<12}" + "".join(f" {title:>{width}}" for title, width in header))
    for name in args.runs:
        counts = Counter(found[name].values())
        print(
            f"{name:<12} {len(found[name]):>6} {counts['passed']:>7} {counts['failed']:>7} "
            f"{counts['error']:>7} {counts['skipped']:>8} "
            + (f"{seconds[name]:>6.0f}" if name in seconds else f"{'-':>6}")
        )

    baseline = found["plain"]
    new_total = 0
    for name in args.runs:
        if name == "plain":
            continue
        new = sorted(
            test_id
            for test_id, outcome in found[name].items()
            if outcome in BAD and baseline.get(test_id) not in BAD
        )
        missing = sorted(set(baseline) - set(found[name]))
        new_total += len(new) + len(missing)
        listing = results / f"new-{name}.txt"
        listing.write_text("".join(f"{found[name][t]} {t}\n" for t in new))
        print(f"\n{name}: {len(new)} new failures/errors, {len(missing)} tests missing")
        print(f"  (all listed in {listing})")
        causes = Counter(why[name].get(test_id, "") for test_id in new)
        for cause, count in causes.most_common(5):
            print(f"  {count:>5} x {cause}")
        for test_id in new[: args.show]:
            print(f"  {found[name][test_id]:<7} {test_id}")
        if len(new) > args.show:
            print(f"  ... and {len(new) - args.show} more")
        for test_id in missing[: args.show]:
            print(f"  missing {test_id}")
    print(f"\nRESULT: {new_total} new failures/errors/missing tests with cancellable imported")
    return 1 if new_total else 0


if __name__ == "__main__":
    sys.exit(main())
