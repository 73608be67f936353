# Two commands for a newcomer: `make demo` (the layer's main job, end to end) and
# `make test` (the whole suite on real PostgreSQL). Without DATABASE_URL, the demo
# runs on an embedded PostgreSQL.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
.PHONY: install test test-pgbouncer test-citus lint typecheck check demo bench bench-citus clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/pytest

# The isolation, rate-limit, unit-of-work and fault tests again, through PgBouncer in
# transaction pooling mode (Debian: apt-get install pgbouncer). Tests marked
# not_through_pgbouncer say why they cannot run that way, and are deselected here.
PGBOUNCER_TESTS := tests/test_isolation.py tests/test_audit_and_rate_limits.py \
	tests/test_unit_of_work.py tests/test_concurrency.py tests/test_faults.py \
	tests/test_audit_integrity.py tests/test_pgbouncer.py tests/test_bounds.py \
	tests/test_claim_leases.py tests/test_client_timeouts.py tests/test_runner.py \
	tests/test_slack_store.py tests/test_slack_token_rotation.py tests/security/test_claims.py \
	tests/test_audit_chain.py tests/test_erasure.py
test-pgbouncer: install
	SFDB_TEST_PGBOUNCER=1 $(BIN)/pytest -m "not not_through_pgbouncer" $(PGBOUNCER_TESTS)

# The whole suite on a throwaway Citus cluster (a coordinator and one worker started from
# the local PostgreSQL binaries), its database distributed by tenant. Citus is installed
# first by CITUS_INSTALL unless the local PostgreSQL already has it. Tests marked
# not_on_citus say why they cannot run there, and are deselected here.
CITUS_INSTALL ?= ../shared/citus/install.sh
CITUS_LIBRARY := $(wildcard $(shell pg_config --pkglibdir 2>/dev/null)/citus.so \
	/usr/lib/postgresql/*/lib/citus.so)
test-citus: install
ifeq ($(CITUS_LIBRARY),)
	$(CITUS_INSTALL)
endif
	SFDB_TEST_CITUS=1 $(BIN)/pytest -m "not not_on_citus"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy --strict slack_fathom_db tests bench examples

check: lint typecheck test

demo: install
	$(BIN)/sfdb demo

# Creates its own databases on the server of DATABASE_URL, drops them after; writes docs/benchmarks.md.
bench: install
	$(BIN)/python -m bench

# The layer on a throwaway Citus cluster (coordinator + 1 worker) next to a throwaway plain
# server, both from the local PostgreSQL binaries (Citus installed); writes docs/benchmarks-citus.md.
bench-citus: install
	$(BIN)/python -m bench.topology

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
