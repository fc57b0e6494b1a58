# mlpe: `make run` (the main job) and `make test` (all tests) work from nothing.
# Installs go to .venv/ (git-ignored) and a per-user cache (~/.cache/mlpe, ~/.cache/uv);
# nothing is installed system-wide. The stack keeps its data in $MLPE_STATE_DIR (default
# ~/.local/state/mlpe: one per user, like its ports).

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
MLPE := $(BIN)/mlpe
PROTOS := $(wildcard proto/mlpe/v1/*.proto)

.PHONY: help setup install run up down status test test-fast test-unit lint proto proto-check lock clean \
	gpu-wheels gpu-check

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

PACKAGED := deploy/kafka/pom.xml deploy/kafka/log4j2.xml deploy/influxdb/build-influxd.sh \
	deploy/rules/default.yaml deploy/prices/default.yaml

$(VENV)/.mlpe-installed: requirements.lock pyproject.toml deploy/setup-python.sh $(PACKAGED)
	@deploy/setup-python.sh

setup: $(VENV)/.mlpe-installed  ## the pinned Python environment in .venv

install: setup  ## setup + Kafka jars, influxd, Redis into the per-user cache
	@$(MLPE) stack install

up: install  ## start Kafka, InfluxDB and Redis (harmless if running)
	@$(MLPE) stack up

down: setup  ## stop what `make up` started
	@$(MLPE) stack down

status: setup  ## each component's state, version and address
	@$(MLPE) stack status

run: install  ## the main job: a watched fleet, alerts, a planned, crashed and recovered job, a report
	@$(MLPE) run $(RUN_ARGS)

lint: setup  ## ruff, and import-linter: dependencies point down (docs/architecture.md)
	@$(BIN)/ruff check .
	@$(BIN)/lint-imports --no-cache --no-logo

proto: setup  ## regenerate Python from proto/
	@$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto $(PROTOS)

proto-check: setup  ## fail if the generated code is not what proto/ generates
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp $(PROTOS) && \
	diff -r -x __pycache__ -x '*.proto' $$tmp/mlpe/v1 proto/mlpe/v1 \
	|| { echo "generated code is stale: run 'make proto' and commit" >&2; exit 1; }

# The stack is started once for the whole run (pytest's workers share it) and stopped
# afterwards if it was not running before.
PYTEST_WORKERS ?= 4
test: install lint proto-check  ## all tests (pytest workers side by side); starts the stack if needed, stops it after
	@down=$$($(MLPE) stack status --json | $(BIN)/python -c 'import json, sys; \
		print(",".join(s["name"] for s in json.load(sys.stdin) if s["state"] != "up"))'); \
	$(MLPE) stack up || exit 1; \
	$(MLPE) stack prune || exit 1; \
	MLPE_TEST_KEEP_STACK=1 $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=30 $(PYTEST_ARGS); rc=$$?; \
	if [ -n "$$down" ]; then $(MLPE) stack down --only "$$down"; fi; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: setup  ## unit tests without the slow ones (no stack needed)
	@$(BIN)/pytest tests/unit -n 2 -m "not slow" $(PYTEST_ARGS)

test-unit: setup  ## unit tests only (no stack)
	@$(BIN)/pytest tests/unit -n 2 $(PYTEST_ARGS)

lock:  ## re-pin requirements.lock (dev) and requirements-runtime.lock (images) from pyproject.toml
	@$(HOME)/.cache/mlpe/uv-0.13.8/bin/uv pip compile pyproject.toml --extra dev \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock
	@$(HOME)/.cache/mlpe/uv-0.13.8/bin/uv pip compile pyproject.toml -c requirements.lock \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements-runtime.lock

# The GPU machine reaches no registry: `make gpu-wheels` here, then carry .gpu-wheels/ there
# and run `make gpu-check` (or python3 tests/gpu/check.py) with that machine's own Python.
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_PYTHONS ?= 3.10 3.11 3.12
gpu-wheels:  ## download the GPU check's wheels (Liger-Kernel, transformers, ...) into .gpu-wheels/
	@$(GPU_PY) tests/gpu/check.py --download-wheels --pythons "$(GPU_PYTHONS)" \
		--uv $(HOME)/.cache/mlpe/uv-0.13.8/bin/uv

gpu-check:  ## GPU tests, kernel bench, planner calibration, NVML, FSDP2 in <= 6 min; no GPU: says so
	@$(GPU_PY) tests/gpu/check.py $(GPU_CHECK_ARGS)

clean:  ## stop the stack and remove .venv; the stack's data ($$MLPE_STATE_DIR) and the per-user cache stay
	@$(MLPE) stack down 2>/dev/null || true
	rm -rf $(VENV)
