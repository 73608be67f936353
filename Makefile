# Two commands for a newcomer: `make demo` (migrate a database and show what the
# layer is connected to) and `make test` (the whole suite on real PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/slack_fathom_db
export DATABASE_URL

.PHONY: install test lint typecheck check demo clean

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

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy --strict slack_fathom_db

check: lint typecheck test

demo: install
	$(BIN)/sfdb migrate
	$(BIN)/sfdb info

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
