"""The way ``make unit`` runs the suite: no integration test is left out."""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _make_list(text: str, name: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    match = re.search(rf"^{name} := (.*)$", joined, re.MULTILINE)
    assert match is not None, f"{name} is not defined in the Makefile"
    return match.group(1).split()


def test_the_two_integration_halves_run_every_integration_file_once() -> None:
    """``make unit`` runs the integration tests in two halves and a list run on
    its own afterwards, which together name every ``tests/integration/test_*.py``
    exactly once: a new file cannot be skipped."""
    makefile = (ROOT / "Makefile").read_text()
    alone = _make_list(makefile, "INTEGRATION_ALONE")
    first = _make_list(makefile, "INTEGRATION_A") + alone
    second = _make_list(makefile, "INTEGRATION_B")
    files = sorted(
        path.relative_to(ROOT).as_posix() for path in (ROOT / "tests/integration").glob("test_*.py")
    )

    assert files == sorted(first + second)
    assert len(first + second) == len(set(first + second))
    assert "unit-integration-a unit-integration-b" in _recipe(makefile, "unit")
    assert "unit-integration-alone" in _recipe(makefile, "unit")
    assert "$(INTEGRATION_ALONE)" in _recipe(makefile, "unit-integration-alone")
    recipe_a = _recipe(makefile, "unit-integration-a")
    recipe_b = _recipe(makefile, "unit-integration-b")
    assert "$(INTEGRATION_A)" in recipe_a
    assert "$(INTEGRATION_B)" in recipe_b
    # Each half has a database of its own (its own session lock and data).
    db_a = re.search(r"CANCELLABLE_TEST_INTEGRATION_DB=(\d+)", recipe_a)
    db_b = re.search(r"CANCELLABLE_TEST_INTEGRATION_DB=(\d+)", recipe_b)
    assert db_a is not None
    assert db_b is not None
    assert db_a.group(1) != db_b.group(1)


def _recipe(makefile: str, target: str) -> str:
    # The target's line and its recipe, up to the next blank line.
    match = re.search(rf"^{re.escape(target)}:.*?(?=\n\n|\Z)", makefile, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no target {target} in the Makefile"
    return match.group(0)


def test_every_claimed_celery_minor_is_tested() -> None:
    """The oldest Celery ``pyproject.toml`` accepts is the oldest nox tests, every minor from
    there on has a session, and ``make test`` runs all but the newest (``.venv`` has that one)."""
    claim = re.search(
        r'^celery = \["celery>=(\d+)\.(\d+)"\]', (ROOT / "pyproject.toml").read_text(), re.M
    )
    noxfile = (ROOT / "noxfile.py").read_text()
    minors = re.search(r"^CELERY_MINORS = \[(.*)\]$", noxfile, re.MULTILINE)
    makefile = (ROOT / "Makefile").read_text()
    assert claim is not None
    assert minors is not None
    tested = [tuple(map(int, m.split("."))) for m in re.findall(r'"(\d+\.\d+)"', minors.group(1))]
    oldest = (int(claim.group(1)), int(claim.group(2)))

    assert oldest == tested[0]
    assert [(5, minor) for minor in range(oldest[1], tested[-1][1] + 1)] == tested
    older = re.search(r"^OLDER_CELERY_MINORS \?= (.*)$", makefile, re.MULTILINE)
    assert older is not None
    assert [f"{a}.{b}" for a, b in tested[:-1]] == older.group(1).split()
    assert "celery-minors" in _recipe(makefile, "test")


def test_the_celery_minors_have_a_database_of_their_own() -> None:
    """``make celery-minors`` runs beside ``make unit``: its unit tests use another database."""
    recipe = _recipe((ROOT / "Makefile").read_text(), "celery-minors")
    db = re.search(r"CANCELLABLE_TEST_UNIT_DB=(\d+)", recipe)

    assert db is not None
    assert "12" != db.group(1)
