"""Training runs of real `swarmlm train` processes for the test modules (a pytest plugin, named in
conftest.py): the shared data fixture, starting a run's peers, waiting for them and reading their reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swarmlm.launch.peers import stop_all
from swarmlm.launch.trainers import TrainerProcess, start_run
from swarmlm.train.data import default_corpus_files, prepare

# --linger 2: every peer of a test run ends together; the default linger (for late joiners) is tested apart.
FAST = ("--inner-steps", "10", "--batch-size", "8", "--matchmaking-time", "1.5", "--inner-lr", "3e-3", "--linger", "2")
SHORT = ("--inner-steps", "10")  # the defaults but for the run's length: a tiny model, 10 steps a round


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four plays, a 512-token BPE trained on them, 64-token blocks."""
    out = tmp_path_factory.mktemp("data")
    prepare(default_corpus_files()[:4], out, train_tokenizer=512, block_size=64)
    return out


def start_trainers(
    data: Path,
    root: Path,
    n: int,
    rounds: int,
    extra: tuple[str, ...] = (),
    per_peer: dict[int, tuple[str, ...]] | None = None,
) -> list[TrainerProcess]:
    """n peers of one run. Rounds wait for all n (--min-group-size n) unless `extra` says otherwise, so
    every averaged round has the same group."""
    args = ("--rounds", str(rounds), *FAST, "--target-group-size", str(n), "--min-group-size", str(n), *extra)
    return start_run(data, root, n, args, per_peer)


def averaged(peer: TrainerProcess) -> list[dict[str, Any]]:
    return [r for r in peer.rounds() if r["averaged"]]


def finish(peers: list[TrainerProcess], timeout: float = 300) -> None:
    try:
        for p in peers:
            assert p.finish(timeout) == 0, p.log.read_text()[-3000:]
    finally:
        stop_all(peers)


def wait_for(cond: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
