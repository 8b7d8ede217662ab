# `make demo` and `make test` each set themselves up from nothing:
# a .venv with pip, the package with its extras, the cached model and corpus.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Tests run in two pytest-xdist workers (one per core), whole files per worker (module fixtures load once).
export PYTHONUNBUFFERED := 1

# Ahead-of-time compile of the Pallas kernels for real TPU and GPU chips, on CPU.
# A separate env: libtpu, the CUDA compiler plugins and ptxas (~1.3 GB download, ~1.9 GB installed).
KVENV   := .venv-kernels
KPY     := $(KVENV)/bin/python
KSTAMP  := $(KVENV)/.installed

.PHONY: setup assets demo demo-full test bench clean kernels-env kernels-check

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet -e '.[test,notebooks]'
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(VPY) -m lqx.assets

demo: assets
	$(VPY) experiments/demo.py

demo-full: assets
	$(VPY) experiments/demo.py --full

# kernels-env: tests/test_pallas_aot.py compiles the Pallas kernels for real TPU/GPU chips with it.
test: assets kernels-env
	$(VPY) -m pytest -q -n 2 --dist loadfile tests

bench: assets
	$(VPY) experiments/bench_forward.py

clean:
	rm -rf $(VENV) $(KVENV) *.egg-info .pytest_cache

$(KSTAMP): requirements-kernels.txt
	$(PY) -m venv $(KVENV)
	$(KPY) -m pip install --quiet --upgrade pip
	$(KPY) -m pip install --quiet -r requirements-kernels.txt
	touch $(KSTAMP)

kernels-env: $(KSTAMP)

# e.g. make kernels-check AOT_ARGS="--targets v5e h100 --json results/tmp/aot.json"
kernels-check: kernels-env
	JAX_PLATFORMS=cpu PYTHONPATH=$(CURDIR) $(KPY) -m pallas_kernels.aot $(AOT_ARGS)
