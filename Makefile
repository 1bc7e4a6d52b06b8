# The two Quick start commands: `make demo` and `make test` (each sets up .venv first).
# TORCH picks the torch requirement: the CPU default is pinned; GPU/NPU users pass their own
# (e.g. `make test TORCH=torch` after installing a CUDA build, or TORCH= to keep the installed one).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest worker processes (pytest-xdist), one intra-op thread each: 2 fits a 2-core CI machine;
# TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH) -e '.[test]'
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/python scripts/demo.py

test: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests $(PYTEST_ARGS)
