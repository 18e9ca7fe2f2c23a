"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmlm.launch.servers import ServerProcess
from swarmlm.model.loading import LoadedModel, default_model_path, load_model

# Peers keep their ledger copies under $SWARMLM_HOME: the suite's go to a temporary folder, not ~/.swarmlm.
os.environ.setdefault("SWARMLM_HOME", tempfile.mkdtemp(prefix="swarmlm-test-home-"))


# Every process this test session starts inherits this tag (p2pd too: hivemind copies the environment), so
# the orphan check below counts only our own, not those of a parallel worker (pytest-xdist) or another run.
SESSION_TAG = f"SWARMLM_TEST_SESSION={os.getpid()}-{time.monotonic_ns()}"
os.environ["SWARMLM_TEST_SESSION"] = SESSION_TAG.split("=", 1)[1]


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


@pytest.fixture(scope="session", autouse=True)
def no_orphans() -> Iterator[None]:
    """The suite leaves no peer, server or p2pd daemon behind."""
    yield
    deadline = time.monotonic() + 15
    while (left := swarm_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running after the suite: {sorted(left)}"


@pytest.fixture(scope="session")
def model() -> LoadedModel:
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One server for the API tests; a small batch so queueing and cancellation are observable."""
    srv = ServerProcess("--max-batch-seqs", "8")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
