# make demo: fresh machine -> .venv -> the local profile's demo matrix -> results/report.html
# make test: .venv + the whole test suite (starts the project's Slurm test cluster when it can)
# make test-unit: the unit tier (tests/tiers.py: one process, no cluster), a few minutes
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# pytest-xdist workers: 2 for the unit tier and the whole suite (tests/conftest.py keeps the
# Slurm tests on one of them; SUITE_WORKERS=0 runs the suite in one process: 32 min on 2 cores)
WORKERS ?= 2
SUITE_WORKERS ?= 2

.PHONY: venv demo test test-unit test-fast plan clean cluster-up cluster-down

venv: $(STAMP)

# torch first, its CPU build (the lock's torch==2.13.0+cpu): from a wheel pip can find (this
# kind of machine has one on its local disk), else from PyTorch's CPU index. A bare `torch`
# (fairscale asks for one) would pull a multi-GB CUDA build, which the lock then refuses.
$(STAMP): pyproject.toml requirements/lock-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23" setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==$${TORCH_VERSION:-2.13.0}+cpu" 2>/dev/null \
	  || $(BIN)/pip install -q "torch==$${TORCH_VERSION:-2.13.0}" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q --no-build-isolation "fairscale==0.4.13"
	$(BIN)/pip install -q -e ".[test,hf]" -c requirements/lock-cpu.txt  # the versions the suite passed with; hf: transformers (no torch requirement)
	touch $(STAMP)

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --profile profiles/local
	@echo "report: $(CURDIR)/results/report.html"

plan: venv
	$(BIN)/llmenergy plan --config config.yaml

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(SUITE_WORKERS) tests

test-unit: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" LLMENERGY_NO_CLUSTER=1 $(BIN)/python -m pytest -q -n $(WORKERS) -m unit tests

test-fast: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" LLMENERGY_NO_CLUSTER=1 $(BIN)/python -m pytest -q -n $(WORKERS) -m "not slurm and not slow" tests

cluster-up:
	bash tests/slurm/cluster.sh up

cluster-down:
	bash tests/slurm/cluster.sh down

clean:
	rm -rf results .snakemake
