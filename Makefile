# kdcli: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdcli-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/quickstart.sh

test: $(STAMP)
	$(VENV)/bin/ruff check kdcli tests examples benchmarks
	$(PY) -m pytest -n auto --maxprocesses=4

lint: $(STAMP)
	$(VENV)/bin/ruff check kdcli tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf runs .pytest_cache
