# `make run` and `make test` create .venv on first use (or when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tf]'
	touch $(STAMP)

# Trains the default Switch decoder on tiny shakespeare (resumes runs/switch_tiny if it exists).
run: $(STAMP)
	$(VENV)/bin/moejax train --config experiments/configs/switch_tiny.py --workdir runs/switch_tiny

# Two workers (one per core of the reference machine), tests grouped by xdist_group marks, the 15
# slowest listed at the end. The JAX compilation cache is per session (tests/conftest.py).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test: $(STAMP)
	$(PYTEST)

# The edit-test loop: everything not marked slow.
test-fast: $(STAMP)
	$(PYTEST) -m 'not slow'

# Layer vs FLOP-matched dense FFN (writes benchmarks/results/layer.json and its table into
# benchmarks/RESULTS.md), train step vs dense twin, expert-parallel all-to-all volume and overhead.
bench: $(STAMP)
	$(PY) benchmarks/layer.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/comm_volume.py

clean:
	rm -rf $(VENV) .pytest_cache
