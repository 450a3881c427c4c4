# qgen-ray: the two commands a new user types are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-random test-stats mutate lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,tensorboard]"
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

# The suite in its file order (pytest-randomly is installed but off here) ...
test: $(STAMP) lint
	$(PY) -m pytest -q -p no:randomly

# ... and in a random order: every test builds what it needs. pytest-randomly prints its
# seed; `make test-random SEED=N` replays that order.
SEED ?=
test-random: $(STAMP)
	$(PY) -m pytest -p randomly $(if $(SEED),--randomly-seed=$(SEED))

# Every statistical test under five more seeds and 1 and 2 torch threads (~30 min on 2 cores):
# a verdict must not depend on the seed or the summation order CI happens to use.
STAT_SEEDS ?= 1 2 3 4 5
STAT_THREADS ?= 1 2
test-stats: $(STAMP)
	@for seed in $(STAT_SEEDS); do for threads in $(STAT_THREADS); do \
		echo "== QGEN_TEST_SEED=$$seed QGEN_TEST_THREADS=$$threads"; \
		QGEN_TEST_SEED=$$seed QGEN_TEST_THREADS=$$threads $(PY) -m pytest -q -m statistical \
			|| exit 1; \
	done; done

# Mutation testing of the science's core ([tool.mutmut] in pyproject.toml; not part of
# `make test`, ~40 min from scratch): prints the score per module, counting out the
# equivalent mutants docs/mutation.md lists (with --survivors: any survivor it does not).
mutate: $(STAMP)
	$(PY) -m pip install --quiet "mutmut==3.8.1"
	$(VENV)/bin/mutmut run --max-children 2 || true
	$(PY) benchmarks/mutation_score.py

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/measures_fast_vs_faithful.py

clean:
	rm -rf results .pytest_cache
