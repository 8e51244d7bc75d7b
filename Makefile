# Two commands on a fresh machine:
#   make demo   runs the main job (set-up included)
#   make test   runs the tests (set-up included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= data,train,dev

.PHONY: install demo test lint gpu-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch is on the local disk; installing it first keeps the `train`
	# extra's torch range from pulling a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/multiface demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check shards services trainer tests bench
	$(VENV)/bin/ruff format --check shards services trainer tests bench

gpu-test: install
	REQUIRE_GPU=1 $(PY) -m pytest -q -m "gpu or multigpu"

clean:
	rm -rf $(VENV) demo-output
