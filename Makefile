# qgen-ray: the two commands a new user types are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) studies/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check qgen_ray studies tests analysis benchmarks
	$(VENV)/bin/ruff format --check qgen_ray studies tests analysis benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format qgen_ray studies tests analysis benchmarks
	$(VENV)/bin/ruff check --fix qgen_ray studies tests analysis benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/measures_fast_vs_faithful.py

clean:
	rm -rf results .pytest_cache
