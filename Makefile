# Two commands: `make demo` (the main job) and `make test` (the whole suite, as CI runs it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo toy test quick lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps clean-fid==0.1.35  # its resize only: plain clean-fid pulls torchvision
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fdistill demo --out runs/demo

toy: $(VENV)/.installed
	$(VENV)/bin/fdistill toy --divergence js --out runs/toy-js

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

quick: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
