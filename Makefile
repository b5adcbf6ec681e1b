# Quick start: `make demo` (capture sample traffic on a throwaway PostgreSQL) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration test-faults lint format typecheck bench clean postgres

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The system PostgreSQL 15 is the second server the tests run on (Debian's postgresql-15).
postgres:
	@if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null; \
	  else echo "PostgreSQL 15 missing: apt-get install postgresql-15 (tests then run on PG18 only)"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/cdc demo

test: $(STAMP) postgres
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test-integration: $(STAMP) postgres
	$(BIN)/pytest -q tests/integration

test-faults: $(STAMP) postgres
	$(BIN)/pytest -q -m faults tests

lint: $(STAMP)
	$(BIN)/ruff check cdc tests bench
	$(BIN)/ruff format --check cdc tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format cdc tests bench
	$(BIN)/ruff check --fix cdc tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP) postgres
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
