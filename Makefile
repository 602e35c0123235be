# The two commands of the README: `make dev` runs the full local stack,
# `make test` runs every check CI runs. Both install what they need first.
VENV ?= .venv
BIN := $(VENV)/bin
STATE_DIR ?= .keybroker/dev
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup setup-test dev test lint unit integration bench bench-envelope bench-scale clean

setup:
	@VENV=$(VENV) scripts/setup.sh

setup-test:
	@VENV=$(VENV) scripts/setup.sh --with-test-tools

dev: setup
	$(BIN)/keybroker dev --state-dir $(STATE_DIR)

lint: setup
	$(BIN)/ruff check broker tests bench deploy
	$(BIN)/ruff format --check broker tests bench deploy
	$(BIN)/mypy

test: setup-test lint
	$(BIN)/pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: setup-test
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

# The Go toolchain (bench/loadgen) is installed for this target only, never for dev or test.
bench: setup
	@VENV=$(VENV) scripts/setup.sh --with-bench
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# kbe1 envelopes vs the AWS Encryption SDK and cat (1 MiB, 64 MiB, 1 GiB; caching).
bench-envelope: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.envelope $(BENCH_ARGS)

# Scale of state (policy, keys list, audit verify at 1M records) and serve --workers 1 vs 2.
bench-scale: setup
	@VENV=$(VENV) scripts/setup.sh --with-bench
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
