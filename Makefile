# Two commands do everything on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# pip picks the build of TORCH_SPEC (README, "Which torch"); TORCH_INDEX=<url> installs it from that
# index only, e.g. https://download.pytorch.org/whl/cpu (CPU) or .../whl/cu126 (CUDA 12.6).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
# The full retention suite is ~26k generations: hours on a 2-core CPU, so `make run` scores the
# first 100 items of each task; RUN_ARGS= runs it whole.
RUN_ARGS ?= retention.limit=100
# pytest-xdist workers, one per core (each at one torch thread, tests/conftest.py); TEST_WORKERS=0 runs serially
TEST_WORKERS ?= auto

.PHONY: setup run quick test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup          ## the main job: ELDER, SmolLM2, ZsRE, 1000 edits (override with ARGS="dataset=counterfact ...")
	$(PY) run.py $(RUN_ARGS) $(ARGS)

quick: setup        ## a run of a few minutes
	$(PY) run.py experiment=quick $(ARGS)

test: setup         ## the default test suite (fast, CPU)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

test-all: setup     ## also the slow tests (real model, longer streams)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "slow or not slow" $(ARGS)

bench: setup        ## editing-speed benchmark (options through ARGS)
	$(PY) -m benchmarks.bench_editing $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
