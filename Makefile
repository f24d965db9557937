# Two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint typecheck docs unit bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m cancellable demo

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

typecheck: $(VENV)/.installed
	$(PY) -m mypy

docs: $(VENV)/.installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

unit: $(VENV)/.installed
	$(PY) -m pytest

test: lint typecheck docs unit

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) docs/_build .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache
