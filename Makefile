# The two commands of the README: `make dev` runs the full local stack,
# `make test` runs every check CI runs. Both install what they need first.
VENV ?= .venv
BIN := $(VENV)/bin
STATE_DIR ?= .keybroker/dev
PYTEST_ARGS ?=

.PHONY: setup dev test lint unit integration bench clean

setup:
	@VENV=$(VENV) scripts/setup.sh

dev: setup
	$(BIN)/keybroker dev --state-dir $(STATE_DIR)

lint: setup
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
