# Quick start: `make demo` (capture sample traffic on a throwaway PostgreSQL) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PURE := $(filter 1,$(strip $(CDC_NO_EXTENSION)))

.PHONY: install demo test test-unit test-integration test-faults lint format typecheck bench clean system-deps check-deploy

$(STAMP): pyproject.toml setup.py cdc/capture/_core.pyx $(wildcard cdc/capture/_core_*.pxi)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The distribution was named "cdc" before (a name another project has on PyPI).
	@$(BIN)/pip uninstall --quiet --yes cdc 2>/dev/null || true
	$(BIN)/pip install --quiet -e '.[dev]'
	$(if $(PURE),touch,rm -f) $(VENV)/.installed-pure
	touch $(STAMP)

# CDC_NO_EXTENSION=1 (the pure-Python core only) installs again unless the last install was
# one; back to the compiled core: make clean install.
ifneq ($(PURE),)
ifeq ($(wildcard $(VENV)/.installed-pure),)
.PHONY: $(STAMP)
endif
endif

install: $(STAMP)

# Debian packages the tests use: PostgreSQL 15 (the second server the integration tests
# run on), Chromium (the page test), PgBouncer (the pooler test) and promtool (alert rule
# checks). Installed when root.
system-deps:
	@missing=""; \
	[ -x /usr/lib/postgresql/15/bin/postgres ] || missing="$$missing postgresql-15"; \
	command -v chromium >/dev/null || missing="$$missing chromium fonts-liberation"; \
	[ -x /usr/sbin/pgbouncer ] || missing="$$missing pgbouncer"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (apt-get install$$missing)"; fi; \
	fi

# KEEP=1 leaves the demo's server running and prints what to try next.
demo: $(STAMP)
	$(BIN)/cdc demo $(if $(KEEP),--keep)

test: $(STAMP) system-deps
	$(BIN)/pytest -q -m "not faults"

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test-integration: $(STAMP) system-deps
	$(BIN)/pytest -q tests/integration

test-faults: $(STAMP) system-deps
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

bench: $(STAMP) system-deps
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info build
	rm -f cdc/capture/_core.c cdc/capture/_core.*.so

YAMLLINT_CONFIG := {extends: default, rules: {line-length: {max: 120}, document-start: disable}}
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard deploy/kubernetes/*.yaml))

# The deploy/ files checked with their ecosystems' tools (also run by tests/unit/test_deploy.py
# and, for the alert rules, tests/unit/test_alerts.py).
check-deploy: $(STAMP) system-deps
	$(BIN)/yamllint --strict -d '$(YAMLLINT_CONFIG)' deploy/
	$(BIN)/hadolint deploy/docker/Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/docker/compose.yaml
	$(BIN)/kubernetes-validate --strict --quiet $(K8S_MANIFESTS)
	promtool check rules deploy/prometheus/alerts.yaml
	promtool check config --syntax-only deploy/prometheus/prometheus.yml
	$(BIN)/pytest -q tests/unit/test_deploy.py tests/unit/test_alerts.py
