"""nox sessions: the core suite on every CPython, the Celery integration on every Celery minor.

``core-3.X``
    The core test suite in a venv made with ``pip install .[core-tests]``:
    no Celery (a test asserts it cannot be imported there).  ``make test``
    runs it on the interpreters other than the one it uses itself::

        python -m nox -s core-3.10 core-3.12 core-3.13

``celery-5.X``
    The integration's unit tests (``tests/test_celery_*.py``, which include
    the contract tests on the Celery internals it relies on; the two slowest
    left out) against the newest patch release of one Celery minor, on
    CPython 3.11.  ``make test`` runs them for every minor the package claims
    (``celery>=5.3``) but the newest, which ``.venv`` has.

``integration-5.X``
    The same plus the integration suite (``tests/integration``: real
    workers on Redis and RabbitMQ), about as long as ``make unit``'s
    integration half; run it by hand, one at a time::

        python -m nox -s integration-5.3

    The integration suite's Redis and database come from the environment
    (``CANCELLABLE_TEST_REDIS``, ``CANCELLABLE_TEST_INTEGRATION_DB``; see
    ``tests/redis_dbs.py``).

On a CI machine (``CI`` set) a missing interpreter is an error, never a
silent skip.
"""

from __future__ import annotations

import glob

import nox

nox.options.default_venv_backend = "uv|venv"
nox.options.sessions = ["core"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

#: The Celery minors ``pyproject.toml`` claims (``celery>=5.3``), oldest first.
CELERY_MINORS = ["5.3", "5.4", "5.5", "5.6", "5.7"]

#: The interpreter the Celery sessions use (every claimed minor supports it).
CELERY_PYTHON = "3.11"

#: Test modules that need Celery, workers, a broker or the benchmarks.
NOT_CORE = ("tests/test_celery_", "tests/test_benchmarks.py", "tests/test_demo.py")


def core_tests() -> list[str]:
    """The core suite's test modules."""
    return sorted(path for path in glob.glob("tests/test_*.py") if not path.startswith(NOT_CORE))


def celery_unit_tests() -> list[str]:
    """The Celery integration's unit and contract test modules (no workers)."""
    return sorted(glob.glob("tests/test_celery_*.py"))


PYTEST = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider")

#: The slowest of those tests (20 embedded workers; a Redis client's retries;
#: the SQL ledger's races between writer processes), which depend little on
#: Celery's version: the ``celery-*`` sessions of ``make test`` leave them out
#: (``integration-*`` and ``.venv`` run them).
SLOW_UNIT_TESTS = (
    "test_twenty_embedded_workers_leave_no_poller or test_redis_down_raises"
    " or test_concurrent_writers_against_a_reader"
    " or test_tables_are_created_by_many_processes_at_once"
)


@nox.session(python=PYTHONS)
def core(session: nox.Session) -> None:
    """The core suite on one interpreter, installed as a user would: no Celery."""
    session.install(".[core-tests]")
    session.run(*PYTEST, *core_tests(), *session.posargs, env={"CANCELLABLE_TEST_NO_CELERY": "1"})


def install_celery(session: nox.Session, minor: str) -> None:
    """Install the package with the integration, Celery held at ``minor``'s newest patch."""
    session.install(
        ".[celery,redis,sql-tests,core-tests,otel,monitoring-tests]", f"celery~={minor}.0"
    )
    session.run("python", "-c", "import celery; print('celery', celery.__version__)")


def celery_session(minor: str) -> None:
    """Define the ``celery-<minor>`` session."""

    @nox.session(name=f"celery-{minor}", python=CELERY_PYTHON)
    def celery(session: nox.Session) -> None:
        """The integration's unit and contract tests on one Celery minor."""
        install_celery(session, minor)
        session.run(
            *PYTEST, *celery_unit_tests(), "-k", f"not ({SLOW_UNIT_TESTS})", *session.posargs
        )


def integration_session(minor: str) -> None:
    """Define the ``integration-<minor>`` session."""

    @nox.session(name=f"integration-{minor}", python=CELERY_PYTHON)
    def integration(session: nox.Session) -> None:
        """The integration's unit tests and its integration suite on one Celery minor."""
        install_celery(session, minor)
        session.install(".[otel,monitoring-tests,django-tests]", f"celery~={minor}.0")
        session.run(*PYTEST, *celery_unit_tests(), "tests/integration", *session.posargs)


for _minor in CELERY_MINORS:
    celery_session(_minor)
    integration_session(_minor)
