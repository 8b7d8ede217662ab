# `make demo` and `make test` each set themselves up from nothing:
# a .venv with pip, the package with its extras, the cached model and corpus.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Keep BLAS/XLA from oversubscribing the two cores when pytest forks.
export PYTHONUNBUFFERED := 1

.PHONY: setup assets demo demo-full test bench clean

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

test: assets
	$(VPY) -m pytest -q tests

bench: assets
	$(VPY) experiments/bench_forward.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
