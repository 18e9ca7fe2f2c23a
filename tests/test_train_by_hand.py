"""`swarmlm train` as a person runs it: default flags, peers started by hand a few seconds apart.

Each peer ends with a checkpoint that `swarmlm eval` reads (a late joiner too, when all it did was take
the final round by download), prints a summary line, and keeps hivemind's own log lines (tracebacks of
failed matchmaking included) in its run folder instead of its output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmlm.launch.trainers import TrainerProcess
from swarmlm.train.data import default_corpus_files, prepare

pytestmark = pytest.mark.slow

SHORT = ("--inner-steps", "10")  # the defaults but for the run's length: a tiny model, 10 steps a round


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(default_corpus_files()[:2], out, train_tokenizer=512, block_size=64)
    return out


def finish(peers: list[TrainerProcess], timeout: float = 300) -> None:
    try:
        for p in peers:
            assert p.finish(timeout) == 0, p.log.read_text()[-3000:]
    finally:
        for p in peers:
            p.stop()


def assert_ends_well(peer: TrainerProcess, data: Path, rounds: int) -> None:
    """A checkpoint of the final round that `swarmlm eval` reads, a summary naming it, a clean output."""
    assert peer.checkpointed_round() == rounds
    out = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "eval", str(peer.run_dir), "--data", str(data)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "val_loss=" in out.stdout
    log = peer.log.read_text()
    checkpoint = peer.run_dir / "checkpoints" / f"round-{rounds:06d}.json"
    assert f"swarmlm train: done: round {rounds}/{rounds} (" in log and f"checkpoint {checkpoint}" in log
    assert "Traceback" not in log
    assert (peer.run_dir / "hivemind.log").exists()


def test_two_peers_started_apart_train_together(data: Path, tmp_path: Path) -> None:
    """The first peer waits at round 1 for a second (--min-peers 2 by default): the two average from
    round 1, where the first used to train every round alone before the second was up."""
    args = ("--data", str(data), "--rounds", "2", *SHORT)
    first = TrainerProcess(*args, run_dir=tmp_path / "first").wait_ready()
    peers = [first]
    try:
        time.sleep(5)  # a person starting the second peer by hand
        peers.append(TrainerProcess(*args, run_dir=tmp_path / "second", initial=first.maddr).wait_ready())
    finally:
        finish(peers)
    for peer in peers:
        assert_ends_well(peer, data, 2)
        averaged = [r for r in peer.rounds() if r["averaged"]]
        assert averaged and all(r["group_size"] == 2 for r in averaged)
    assert "waiting up to 60 s for 2 peers" in first.log.read_text()


def test_a_late_joiner_keeps_the_round_it_downloaded(data: Path, tmp_path: Path) -> None:
    """A peer that arrives after the run's last round takes it by download, and writes it as its own
    checkpoint: its run folder is not left empty."""
    args = ("--data", str(data), "--rounds", "1", *SHORT)
    # --matchmaking-time 5: the first peer lingers 22 s after its last round, while the late one starts.
    first = TrainerProcess(*args, "--min-peers", "1", "--matchmaking-time", "5", run_dir=tmp_path / "first")
    peers = [first.wait_ready()]
    try:
        deadline = time.monotonic() + 180
        while first.checkpointed_round() < 1:
            assert time.monotonic() < deadline and first.proc.poll() is None, first.log.read_text()[-3000:]
            time.sleep(0.5)
        peers.append(TrainerProcess(*args, run_dir=tmp_path / "late", initial=first.maddr).wait_ready())
    finally:
        finish(peers)
    late = peers[1]
    assert "caught up: downloaded round 1" in late.log.read_text()
    assert late.rounds() == []  # it trained nothing itself
    assert_ends_well(late, data, 1)
    assert_ends_well(first, data, 1)
    records = [json.loads((p.run_dir / "checkpoints" / "round-000001.json").read_text()) for p in peers]
    assert records[0]["digest"] == records[1]["digest"]
