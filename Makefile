# Two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment in .venv on first use.
#
#   make demo   dispatch real tasks to a real prefork worker (no server needed)
#               and cancel them
#   make test   lint, type check, docs build (warnings are errors), the whole
#               pytest suite with coverage, the core suite without Celery on
#               the other supported CPythons, and the Celery integration's
#               unit tests on the older Celery minors (nox); the integration
#               tests need Redis on 127.0.0.1:6379 and RabbitMQ on
#               127.0.0.1:5672, the SQL-ledger tests PostgreSQL on :5432 and
#               MariaDB on :3306 (.ci/run starts them if they are not running)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV_PIP := $(PY) -m uv pip install --quiet --python $(PY)

# Lint only the source folders that exist (git does not keep empty ones).
LINT_PATHS := $(wildcard src tests benchmarks scripts docs/conf.py noxfile.py)

.PHONY: demo test lint typecheck docs unit unit-main unit-integration unit-integration-a unit-integration-b unit-integration-c unit-integration-alone unit-soak core-pythons celery-minors bench clean

# The demo needs the package and its Celery integration; the test tools come
# with `make test`.
$(VENV)/.base: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo "cancellable needs Python 3.10 or newer; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." >&2; \
	  echo "Run 'make PYTHON=python3.11 ...' (or another 3.10+ interpreter)." >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(UV_PIP) -e '.[celery]'
	touch $@

# dev: the test and docs tools; bench: the peers the benchmarks (and their
# smoke tests) measure beside cancellable.  uv (from PyPI, also in the dev
# extra, where nox finds it for its venvs) installs the same versions as pip
# in a tenth of the time: 8 s instead of 33 s for both steps.
$(VENV)/.installed: $(VENV)/.base
	$(UV_PIP) -e '.[dev,bench]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m cancellable demo

lint: $(VENV)/.installed
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

typecheck: $(VENV)/.installed
	$(PY) -m mypy

# -E re-reads every page, so warnings from unchanged pages are not hidden by
# a cached environment.
docs: $(VENV)/.installed
	$(PY) -m sphinx -W --keep-going -E -q -b html docs docs/_build/html

# pytest exits 5 when it collected no tests; make treats that as a failure.
# The soak (its own Redis server and workers) runs beside the rest of the
# suite, and the integration tests (real workers) beside the other tests
# (database 12 and others), in three parts: on Redis databases 13, 15 and 5
# (tests/redis_dbs.py).  They share no database, and the integration tests
# spend much of their time waiting on workers (in two halves, the longer one
# took 700 s of a 760-s `make unit`; the three parts are balanced by their
# measured durations, about 400-450 s each beside the other runs).  Django
# is set up once per process, so the two modules that set it up with
# different settings (test_sql_ledger's django-db case, test_django_admin's
# project) run in different parts.  Each run
# writes its own coverage data, combined for the one gate; each prints its
# 15 slowest tests (--durations), to see where the time goes.
COV := --cov=cancellable --cov-branch --cov-report= --durations=15
INTEGRATION_A := tests/integration/test_async.py tests/integration/test_before_start.py \
	tests/integration/test_faults.py tests/integration/test_harness.py \
	tests/integration/test_running.py tests/integration/test_sizes.py \
	tests/integration/test_sql_ledger.py tests/integration/test_directed.py \
	tests/integration/test_crash.py tests/integration/test_shutdown.py
INTEGRATION_B := tests/integration/test_connection_loss.py \
	tests/integration/test_logging.py tests/integration/test_monitoring.py \
	tests/integration/test_skew.py tests/integration/test_workflows.py \
	tests/integration/test_receipt.py tests/integration/test_redis_spellings.py \
	tests/integration/test_django_admin.py
INTEGRATION_C := tests/integration/test_store_bounds.py tests/integration/test_pools.py \
	tests/integration/test_plain_and_eta.py tests/integration/test_scale.py \
	tests/integration/test_cancel_bounds.py tests/integration/test_interrupt_locks.py \
	tests/integration/test_hung_ledger.py tests/integration/test_large_ledger.py
# The ladder's tests time interrupts against tasks of 10-50 ms: beside the
# other runs on two cores their cancellations arrived after the tasks had
# ended, so they run on their own once the others have finished.
INTEGRATION_ALONE := tests/integration/test_ladder.py
unit: $(VENV)/.installed
	rm -f .coverage .coverage.*
	$(MAKE) --no-print-directory --output-sync=target -j5 unit-main unit-integration-a \
		unit-integration-b unit-integration-c unit-soak
	$(MAKE) --no-print-directory unit-integration-alone
	$(PY) -m coverage combine .coverage.main .coverage.integration-a .coverage.integration-b \
		.coverage.integration-c .coverage.soak .coverage.integration-alone
	$(PY) -m coverage report --fail-under=95

unit-main: $(VENV)/.installed
	COVERAGE_FILE=.coverage.main $(PY) -m pytest --ignore=tests/soak --ignore=tests/integration $(COV)

# The whole integration suite in one run (database 13), for working on it.
unit-integration: $(VENV)/.installed
	COVERAGE_FILE=.coverage.integration $(PY) -m pytest tests/integration $(COV)

# Each half names its database, whatever the caller's environment says.
unit-integration-a: $(VENV)/.installed
	CANCELLABLE_TEST_INTEGRATION_DB=13 CIT_REDIS_URL= COVERAGE_FILE=.coverage.integration-a \
		$(PY) -m pytest $(INTEGRATION_A) $(COV)

unit-integration-alone: $(VENV)/.installed
	CANCELLABLE_TEST_INTEGRATION_DB=13 CIT_REDIS_URL= COVERAGE_FILE=.coverage.integration-alone \
		$(PY) -m pytest $(INTEGRATION_ALONE) $(COV)

unit-integration-b: $(VENV)/.installed
	CANCELLABLE_TEST_INTEGRATION_DB=15 CIT_REDIS_URL= COVERAGE_FILE=.coverage.integration-b \
		$(PY) -m pytest $(INTEGRATION_B) $(COV)

unit-integration-c: $(VENV)/.installed
	CANCELLABLE_TEST_INTEGRATION_DB=5 CIT_REDIS_URL= COVERAGE_FILE=.coverage.integration-c \
		$(PY) -m pytest $(INTEGRATION_C) $(COV)

unit-soak: $(VENV)/.installed
	COVERAGE_FILE=.coverage.soak $(PY) -m pytest tests/soak $(COV)

# The core suite on the supported CPythons other than this venv's (3.11 runs
# everything in `unit`), each in a venv made with `pip install .[core-tests]`:
# no Celery there, and a test checks it.  pyenv's interpreters are made
# visible by name; on a CI machine (CI set) a missing interpreter fails the
# run instead of skipping.
PYENV_ROOT ?= $(HOME)/.pyenv
PYENV_PYTHONS := $(shell ls $(PYENV_ROOT)/versions 2>/dev/null | grep -E '^3\.1[0-3]\.[0-9]+$$' | tr '\n' ':')
OTHER_PYTHONS ?= 3.10 3.12 3.13
NOX := PATH="$(abspath $(VENV))/bin:$$PATH" PYENV_VERSION="$(PYENV_PYTHONS)$${PYENV_VERSION:-}" \
	$(PY) -m nox

core-pythons: $(VENV)/.installed
	$(NOX) -s $(addprefix core-,$(OTHER_PYTHONS))

# The Celery integration's unit and contract tests (tests/test_celery_*.py) on
# the older Celery minors pyproject.toml claims; .venv has the newest, where
# `unit` runs everything.  One nox run for each minor, each on a Redis
# database of its own (CELERY_UNIT_DB_<minor>, none of `unit`'s;
# tests/redis_dbs.py), so they can run side by side (`test` runs two at a
# time: all four at once missed time bounds on two cores).
# They spend most of their time waiting (subprocesses, sockets, timeouts):
# one took 150 s of wall time for 30 s of CPU.  The whole integration suite on
# one minor, by hand: `.venv/bin/python -m nox -s integration-5.3` (see
# noxfile.py).
OLDER_CELERY_MINORS ?= 5.3 5.4 5.5 5.6
CELERY_UNIT_DB_5.3 := 9
CELERY_UNIT_DB_5.4 := 8
CELERY_UNIT_DB_5.5 := 7
CELERY_UNIT_DB_5.6 := 6
celery-minors: $(addprefix celery-minor-,$(OLDER_CELERY_MINORS))

celery-minor-%: $(VENV)/.installed
	CANCELLABLE_TEST_UNIT_DB=$(or $(CELERY_UNIT_DB_$*),$(error no Redis database for Celery $*: set CELERY_UNIT_DB_$*)) \
		$(NOX) -s celery-$*

# The nox sessions run once the main suite has finished: beside it, on two
# cores, they starved the real workers of the timing-sensitive integration
# tests (the ladder's torture test, the solo pool's).  The core run and one
# run per Celery minor share no Redis database; two of them at a time (all
# four minors side by side timed out the 2-s broker bounds of
# test_celery_cancel_bounds); each one's output is printed when it has
# finished.
test: $(VENV)/.installed
	$(MAKE) --no-print-directory --output-sync=target -j3 lint typecheck docs
	$(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory --output-sync=target -j2 core-pythons celery-minors

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .nox docs/_build .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache
