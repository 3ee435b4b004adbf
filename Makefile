# mlplab: `make help` lists the targets.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/xor.yaml
# test processes (pytest-xdist, one file each): most tests wait on one-thread subprocesses
JOBS   ?= 2
STORE  ?= sqlite:///mlruns/mlflow.db
# what an offline GPU machine needs (`make gpu-carry`); `make gpu-check` installs from it
CARRY  ?= .gpu

.DEFAULT_GOAL := help
.PHONY: help install train test test-all slurm-check gpu-carry gpu-check reproduce bench examples lint ui \
	server clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv/ and install mlplab into it (with the dev tools)

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
	$(BIN)/mlplab reproduce

bench: $(STAMP) ## time mlplab against a plain PyTorch loop and the usual Lightning idiom
	$(BIN)/python bench/bench.py

examples: $(STAMP) ## write the data of configs/examples/ (from scikit-learn) under data/examples/
	$(BIN)/python -m mlplab.data.examples .

lint: $(STAMP) ## ruff over the sources, tests and benchmark
	$(BIN)/ruff check src tests bench scripts

ui: $(STAMP) ## the MLflow UI on the project's store, at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri $(STORE) --host 127.0.0.1 --port 5000

server: $(STAMP) ## a tracking server as clusters run one (PostgreSQL if installed, else SQLite), port 5000
	$(BIN)/mlplab server --port 5000

clean: ## remove the venv and caches (the runs in mlruns/ stay)
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
