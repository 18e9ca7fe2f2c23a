"""Shared fixtures (the real embedded model, loaded once per test session; a server; the training data of
tests/training_runs.py), the orphan check, and how the suite runs on two pytest-xdist workers."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swarmlm.launch.random_model import Shape, write_random_model
from swarmlm.launch.servers import ServerProcess
from swarmlm.model.loading import LoadedModel, default_model_path, load_model
from swarmlm.model.lora import random_adapter, save_adapter

pytest_plugins = ("tests.training_runs",)

# Peers keep their ledger copies under $SWARMLM_HOME: the suite's go to a temporary folder, not ~/.swarmlm.
os.environ.setdefault("SWARMLM_HOME", tempfile.mkdtemp(prefix="swarmlm-test-home-"))


# Every process this test session starts inherits this tag (p2pd too: hivemind copies the environment), so
# the orphan check below counts only our own, not those of a parallel worker (pytest-xdist) or another run.
SESSION_TAG = f"SWARMLM_TEST_SESSION={os.getpid()}-{time.monotonic_ns()}"
os.environ["SWARMLM_TEST_SESSION"] = SESSION_TAG.split("=", 1)[1]


def pytest_configure(config: pytest.Config) -> None:
    """Two workers share the machine's cores with the processes they start. Each worker computes on one
    thread (torch would start one per core), and the servers and peers they start let an idle OpenMP thread
    give its core up after a short spin (GOMP_SPINCOUNT, as bench/swarm_bench.py's peers): with libgomp's
    default spin, a server whose threads waited on each other while the other worker computed answered a
    test's few dozen tokens in 68 s (under 19 s with the machine to itself)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")


# `make test` runs two pytest-xdist workers, each handed whole modules in collection order (--dist loadfile).
# The longest modules (minutes each on 2 cores) go first, so that no worker is left with one at the end
# while the other idles; the rest keep their order.
LONGEST_FIRST = (
    "test_containers",
    "test_train_elastic",
    "test_train",
    "test_swarm",
    "test_demo",
    "test_swarm_training",
    "test_pipeline_training",
    "test_python_api",
    "test_lm_eval",
    "test_engine",
    "test_model_families",
    "test_model_families_gguf",
    "test_gateway",
    "test_model",
    "test_api",
    "test_private_swarm",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def swarm_processes() -> set[int]:
    """Running peers, servers and libp2p daemons that this test session started."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not (any(a.endswith(b"p2pd") for a in argv[:1]) or b"swarmlm.cli" in argv):
                continue
            if SESSION_TAG.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def dead_hivemind_sockets(since: float) -> list[Path]:
    """hivemind's unix sockets in /tmp made after `since` (and over 10 s ago) that nothing listens on:
    those of the peers a test killed with SIGKILL, which cannot remove their own (about 100 a suite)."""
    dead = []
    for path in Path("/tmp").glob("hivemind-p2p*.sock"):
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            if not since < path.stat().st_mtime < time.time() - 10:
                continue
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                dead.append(path)
    return dead


@pytest.fixture(scope="session", autouse=True)
def no_orphans() -> Iterator[None]:
    """The suite leaves no peer, server or p2pd daemon behind, nor the sockets of those it killed."""
    start = time.time()
    yield
    deadline = time.monotonic() + 15
    while (left := swarm_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for path in dead_hivemind_sockets(start):
        path.unlink(missing_ok=True)
    assert not left, f"processes left running after the suite: {sorted(left)}"


@pytest.fixture(scope="session")
def model() -> LoadedModel:
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Llama with seeded random weights and SmolLM2's tokenizer: for tests of how peers find,
    join and replace each other, whose peers should start in a second, not load the 135M model."""
    out = tmp_path_factory.mktemp("tiny-llama") / "model"
    write_random_model(out, Shape(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128))
    return out


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def lora_adapter(model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A peft LoRA adapter folder for the embedded model (rank 4, random A and B: it changes the text)."""
    out = tmp_path_factory.mktemp("adapter") / "tuned"
    save_adapter(out, random_adapter(model.config, rank=4, seed=3), alpha=8.0, base_model=model.model_id)
    return out


@pytest.fixture(scope="session")
def server(lora_adapter: Path) -> Iterator[ServerProcess]:
    """One server for the API tests; a small batch so queueing and cancellation are observable; the LoRA
    adapter `tuned` (tests/test_adapters.py)."""
    srv = ServerProcess("--max-batch-seqs", "8", "--adapters", f"tuned={lora_adapter}")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
