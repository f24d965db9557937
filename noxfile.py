"""nox sessions: the core test suite on every CPython the package supports.

``make test`` runs ``core`` on the interpreters other than the one it uses
itself (that one runs the whole suite, integration tests included)::

    python -m nox -s core-3.10 core-3.12 core-3.13

The core suite is every test module except those that need Celery workers,
brokers or the benchmark machinery.  On a CI machine (``CI`` set) a missing
interpreter is an error, never a silent skip.
"""

from __future__ import annotations

import glob

import nox

nox.options.default_venv_backend = "uv|venv"
nox.options.sessions = ["core"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

#: Test modules that need workers, a broker or the benchmarks: 3.11 only (make test).
NOT_CORE = ("tests/test_celery_", "tests/test_benchmarks.py", "tests/test_demo.py")


def core_tests() -> list[str]:
    """The core suite's test modules."""
    return sorted(path for path in glob.glob("tests/test_*.py") if not path.startswith(NOT_CORE))


@nox.session(python=PYTHONS)
def core(session: nox.Session) -> None:
    """The core suite on one interpreter."""
    session.install("-e", ".[core-tests]")
    session.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *core_tests(), *session.posargs
    )
