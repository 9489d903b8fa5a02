# awt: every target installs what it needs first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.awt-installed
# A CPU build of torch on this project's machines; override with the pip requirement of a
# GPU build (or create .venv with one first: an importable torch is kept).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install verify test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,plot,ray,slurm]"
	# test-only reference attacks; their declared torchvision dependency does not import beside a CPU torch
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1 pyautoattack==0.2.0
	touch $(STAMP)

verify: install
	$(VENV)/bin/awt verify

test: install
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info awt-report
