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


PARTS = ("a", "b", "c")


def test_the_integration_parts_run_every_integration_file_once() -> None:
    """``make unit`` runs the integration tests in three parts side by side and a
    list run on its own afterwards, which together name every
    ``tests/integration/test_*.py`` exactly once: a new file cannot be skipped."""
    makefile = (ROOT / "Makefile").read_text()
    alone = _make_list(makefile, "INTEGRATION_ALONE")
    parts = {part: _make_list(makefile, f"INTEGRATION_{part.upper()}") for part in PARTS}
    named = alone + [path for part in PARTS for path in parts[part]]
    files = sorted(
        path.relative_to(ROOT).as_posix() for path in (ROOT / "tests/integration").glob("test_*.py")
    )

    assert files == sorted(named)
    assert len(named) == len(set(named))
    unit = _recipe(makefile, "unit")
    assert "unit-integration-alone" in unit
    assert "$(INTEGRATION_ALONE)" in _recipe(makefile, "unit-integration-alone")
    dbs = []
    for part in PARTS:
        assert f"unit-integration-{part}" in unit
        recipe = _recipe(makefile, f"unit-integration-{part}")
        assert f"$(INTEGRATION_{part.upper()})" in recipe
        db = re.search(r"CANCELLABLE_TEST_INTEGRATION_DB=(\d+)", recipe)
        assert db is not None
        dbs.append(db.group(1))
    # Each part has a database of its own (its own session lock and data),
    # none of the unit tests' (12).
    assert len(PARTS) == len(set(dbs))
    assert "12" not in dbs
    # Django is set up once per process: the two modules that set it up with
    # different settings run in different parts.
    django = [
        part
        for part in PARTS
        for path in parts[part]
        if path.endswith(("/test_sql_ledger.py", "/test_django_admin.py"))
    ]
    assert 2 == len(set(django))


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
    """``make celery-minors`` runs one nox session per minor side by side, and may run
    beside ``make unit``: each minor's unit tests use a database of their own, none of
    the unit tests' (12) nor the integration parts'."""
    makefile = (ROOT / "Makefile").read_text()
    older = re.search(r"^OLDER_CELERY_MINORS \?= (.*)$", makefile, re.MULTILINE)
    assert older is not None
    assert "CANCELLABLE_TEST_UNIT_DB=$(or $(CELERY_UNIT_DB_$*)" in _recipe(
        makefile, "celery-minor-%"
    )
    dbs = []
    for minor in older.group(1).split():
        db = re.search(rf"^CELERY_UNIT_DB_{re.escape(minor)} := (\d+)$", makefile, re.MULTILINE)
        assert db is not None, f"no Redis database for Celery {minor}"
        dbs.append(db.group(1))
    integration = re.findall(r"CANCELLABLE_TEST_INTEGRATION_DB=(\d+)", makefile)

    assert len(dbs) == len(set(dbs))
    assert not set(dbs) & {"12", *integration}
