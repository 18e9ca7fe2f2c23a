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


def swarm_processes() -> set[int]:
    """Running peers, servers and libp2p daemons of swarmlm on this machine."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"p2pd") for a in argv[:1]) or b"swarmlm.cli" in argv:
            found.add(int(cmdline.parent.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphans() -> Iterator[None]:
    """The suite leaves no peer, server or p2pd daemon behind."""
    before = swarm_processes()
    yield
    deadline = time.monotonic() + 15
    while (left := swarm_processes() - before) and time.monotonic() < deadline:
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
