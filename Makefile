# mlplab: `make help` lists the targets.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the exact releases `make install` installs, each file's hash checked (`make lock` writes them)
LOCK   := requirements/dev.lock
TOOLS  := requirements/tools.lock
# Playwright for `make ui-check`, which drives this Chromium
UI_LOCK := requirements/ui.lock
CHROMIUM ?= /usr/bin/chromium
# `make lock` leaves out releases younger than this (uv's --exclude-newer)
COOLDOWN ?= 3 days
CONFIG ?= configs/xor.yaml
# test processes (pytest-xdist, one file each): most tests wait on one-thread subprocesses
JOBS   ?= 2
STORE  ?= sqlite:///mlruns/mlflow.db
# what an offline GPU machine needs (`make gpu-carry`); `make gpu-check` installs from it
CARRY  ?= .gpu

.DEFAULT_GOAL := help
.PHONY: help install lock lock-upgrade audit train test test-all slurm-check gpu-carry gpu-check \
	reproduce bench bench-stack examples lint ui ui-check server clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-13s %s\n", $$1, $$2}'

# stops in one line when the lock is not pyproject.toml's or a download is not the locked file
$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(BIN)/python scripts/lock.py install
	touch $(STAMP)

install: $(STAMP) ## create .venv/ and install mlplab with its dev tools from requirements/dev.lock

lock: ## write requirements/*.lock again from pyproject.toml (uv; releases >= COOLDOWN old)
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python scripts/lock.py lock --cooldown '$(COOLDOWN)'

lock-upgrade: ## the same, every package at its newest release at least COOLDOWN (3 days) old
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python scripts/lock.py lock --upgrade --cooldown '$(COOLDOWN)'

audit: $(STAMP) ## the locked releases against the public advisory database (pip-audit)
	$(BIN)/python scripts/audit.py --ignore requirements/audit-ignore.txt $(LOCK) $(TOOLS) $(UI_LOCK)

train: $(STAMP) ## train CONFIG (default configs/xor.yaml) into the MLflow store under mlruns/
	$(BIN)/mlplab fit --config $(CONFIG)

test: $(STAMP) ## run the test suite, without the slow real-data runs (JOBS=2 processes)
	$(BIN)/python -m pytest -m "not slow" -n $(JOBS) --dist loadfile

test-all: $(STAMP) ## run every test, the slow real-data runs too
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile

slurm-check: $(STAMP) ## the SLURM batch script on a one-node SLURM started here (apt installs it if missing)
	scripts/slurm/local_cluster.sh available || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge)
	$(BIN)/python -m pytest -m slow tests/test_slurm.py

gpu-carry: $(STAMP) ## wheels and gzipped datasets for an offline GPU machine, in .gpu/ (needs network)
	$(BIN)/python scripts/gpu/carry.py --to $(CARRY)

gpu-check: ## on a CUDA machine: the gpu tests, the GPU benchmark, the seeds timed (into gpu-figures/)
	@if [ -d $(CARRY)/wheels ]; then scripts/gpu/check.sh python3 --carry $(CARRY); \
	else $(MAKE) install && scripts/gpu/check.sh $(BIN)/python; fi

reproduce: $(STAMP) ## run every seed experiment (about an hour on 2 cores) and write docs/RESULTS.md
	$(BIN)/mlplab reproduce --experiments my_project.experiments

bench: $(STAMP) ## time mlplab against a plain PyTorch loop and the usual Lightning idiom
	$(BIN)/python bench/bench.py

bench-stack: $(STAMP) ## stacked sweeps and searches (--stack) against the same trials one by one
	$(BIN)/python bench/stacked.py

examples: $(STAMP) ## write the data of configs/examples/ (from scikit-learn) under data/examples/
	$(BIN)/python -m mlplab.data.examples .

lint: $(STAMP) ## ruff over the sources, tests and benchmark
	$(BIN)/ruff check src tests bench scripts

ui: $(STAMP) ## the MLflow UI on the project's store, at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri $(STORE) --host 127.0.0.1 --port 5000

ui-check: $(STAMP) ## the MLflow UI in headless Chromium over a store it builds; screenshots in docs/ui/
	test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/python scripts/lock.py install-ui
	$(BIN)/python scripts/ui/check.py --chromium $(CHROMIUM) --out docs/ui

server: $(STAMP) ## a tracking server as clusters run one (PostgreSQL if installed, else SQLite), port 5000
	$(BIN)/mlplab server --port 5000

clean: ## remove the venv and caches (the runs in mlruns/ stay)
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
