# Two commands for a newcomer:  make demo   and   make test
# Both create (or reuse) .venv and install what they need; a second run installs nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch: on a machine without CUDA install the CPU build. 2.13.0 lies on this machine kind's disk;
# elsewhere pass TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" (CPU) or
# TORCH_SPEC="torch==2.13.0" with the CUDA index of your cluster (see README).
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast test-durations lint format bench clean-venv help
LINTED := pipeline data_prep tests scripts benchmarks

help:
	@echo "make demo   - build a small dataset, train ArcFace iresnet on 2 processes, verify (CPU ok, <15 min)"
	@echo "make test   - ruff (lint + format check), then every tier: unit, integration, cluster, gpu (CPU, <25 min on 2 cores; starts a local Slurm when root)"
	@echo "make test-fast - the unit tier alone (tests/unit: in-process, each test < 5 s; < 3 min)"
	@echo "make format - apply ruff's fixes and formatting"
	@echo "make bench  - the benchmark scripts (prints ratios; see BENCHMARKS.md)"
	@echo "make gpu-stage - stage the wheels a lent GPU machine lacks into .gpu_stage/ parts (docs/gpu-check.md)"
	@echo "make gpu-check - ON THE LENT GPU MACHINE ONLY, after receive.sh got every part (docs/gpu-check.md)"
	@echo "variables: DATA=<image folder> VAL=<.bin> for the demo on your own faces"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline.demo $(if $(DATA),--data $(DATA)) $(if $(VAL),--val $(VAL)) $(if $(OUT),--out $(OUT))

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

test: lint
	$(PY) -m pytest -q

# the unit tier: in-process tests, each under 5 s (tests/unit/conftest.py), < 3 min on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# re-measure the unit tier and commit tests/unit/durations.txt
test-durations: $(STAMP)
	LOWQ_RECORD_DURATIONS=tests/unit/durations.txt $(PY) -m pytest -q tests/unit

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do m=$$(basename $$b .py); echo "== benchmarks.$$m"; $(PY) -m benchmarks.$$m || exit 1; done

clean-venv:
	rm -rf $(VENV)

# ---- GPU check on a lent single-GPU machine (docs/gpu-check.md); never part of make test / CI ----
.PHONY: gpu-stage gpu-commands gpu-check
GPU_STAGE_ARGS ?=
gpu-stage: $(STAMP)
	$(PY) scripts/gpu_check/stage.py $(GPU_STAGE_ARGS)

gpu-commands:
	@$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/gpu_check/stage.py --print-commands

# Runs on the GPU machine under its own python3 (no .venv there): no dependency on $(STAMP).
gpu-check:
	@bash scripts/gpu_check/gpu_check.sh
