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

# The main job runs every check and reports; a check whose claim does not hold is a result (FAIL in the table
# and in awt-report/report.md, exit status 1 from `awt verify` itself), so only a run that could not be made
# (bad arguments, an interruption, a crash) fails this target.
verify: install
	@$(VENV)/bin/awt verify; rc=$$?; \
	if [ $$rc -eq 1 ]; then echo "make verify: the checks ran; some claims FAILED (see the table above and awt-report/report.md)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi

test: install
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info awt-report
