"""Training runs whose peers come and go, with real `swarmlm train` processes on loopback: a peer joins
mid-run, one crashes and resumes, one comes after the last round, two are started by hand a few seconds
apart; and a LoRA fine-tune of the embedded model over two peers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swarmlm.launch.peers import stop_all
from swarmlm.launch.trainers import TrainerProcess
from swarmlm.model.loading import LoadedModel, load_model
from swarmlm.model.lora import load_adapter
from swarmlm.train.checkpointer import saved_rounds
from swarmlm.train.data import default_corpus_files, prepare
from tests.training_runs import FAST, SHORT, averaged, finish, start_trainers, wait_for

pytestmark = pytest.mark.slow


def test_join_crash_resume_and_a_corrupt_checkpoint(data: Path, tmp_path: Path) -> None:
    """Two peers train; a third joins mid-run (downloads the state); one crashes (kill -9) and restarts
    from its checkpoints, the newest of which was corrupted meanwhile: it resumes from the one before
    and catches up. All end with the same weights."""
    rounds = 16  # enough that the others are still training when the crashed peer is back
    peers = start_trainers(
        data, tmp_path, 2, rounds=rounds, extra=("--target-group-size", "3", "--min-group-size", "2")
    )
    try:
        wait_for(lambda: len(averaged(peers[1])) >= 2)
        args = ("--data", str(data), "--data-part", "2/3", "--rounds", str(rounds), *FAST, "--min-group-size", "2")
        joiner = TrainerProcess(*args, "--target-group-size", "3", run_dir=tmp_path / "joiner", initial=peers[0].maddr)
        peers.append(joiner.wait_ready())
        wait_for(lambda: len(averaged(joiner)) >= 1)
        assert "caught up: downloaded round" in joiner.log.read_text()
        wait_for(lambda: len(averaged(peers[1])) >= 6)
        peers[1].crash()
        # A checkpoint is complete once its record (.json) is written: a kill between the tensors and the
        # record leaves tensors that a restart ignores, so the one to corrupt is the newest with a record.
        folder = peers[1].run_dir / "checkpoints"
        checkpoints = [folder / f"round-{r:06d}.safetensors" for r in saved_rounds(folder)]
        newest = checkpoints[-1]
        newest.write_bytes(newest.read_bytes()[:-10] + b"corrupted!")
        restarted = peers[1].restart(initial=peers[0].maddr)
        peers[1] = restarted.wait_ready(timeout=120)
        finish(peers)
    finally:
        stop_all(peers)
    log = restarted.log.read_text()
    assert f"skipping corrupt checkpoint: {newest}: checksum mismatch" in log
    assert f"resumed from {restarted.run_dir / 'checkpoints'} at round {int(checkpoints[-2].stem[-6:])}" in log
    assert "caught up: downloaded round" in log
    # The round each peer ends holding is its newest checkpoint: a peer that was still behind when the
    # others finished (on a loaded machine, the restarted one) takes the last rounds by download, which
    # writes a checkpoint but no round report of its own.
    assert {p.checkpointed_round() for p in peers} == {rounds}
    final = [json.loads((p.run_dir / "checkpoints" / f"round-{rounds:06d}.json").read_text()) for p in peers]
    assert len({f["digest"] for f in final}) == 1


def test_lora_fine_tune_of_the_embedded_model(model: LoadedModel, tmp_path: Path) -> None:
    """Two peers fine-tune SmolLM2 with LoRA: only the adapters travel, both end with the same adapters,
    and the export folds them into a plain checkpoint that the serving stack loads."""
    data = tmp_path / "data"
    prepare(default_corpus_files()[:1], data, block_size=32)  # the embedded model's own tokenizer
    extra = ("--model", "SmolLM2-135M-Instruct", "--lora-rank", "4", "--inner-steps", "3", "--batch-size", "2")
    extra += ("--warmup-steps", "1", "--inner-lr", "1e-3", "--matchmaking-time", "2", "--linger", "2")
    extra += ("--eval-blocks", "8")  # validation of the 135M model is most of a round's time on 2 cores
    peers = start_trainers(data, tmp_path / "run", 2, rounds=1, extra=extra)
    finish(peers)
    reports = [averaged(p) for p in peers]
    assert [r["round"] for r in reports[0]] == [1]
    assert reports[0][-1]["digest"] == reports[1][-1]["digest"]
    # rank-4 adapters on 30 layers: about 1.6 M values, where the whole model has 135 M
    assert 0 < reports[0][-1]["bytes_sent"] < 20e6
    export = tmp_path / "exported"
    out = subprocess.run([sys.executable, "-m", "swarmlm.cli", "export", str(peers[0].run_dir), "--out", str(export)])
    assert out.returncode == 0
    merged = load_model(str(export))
    tuned, base = merged.span.state_dict(), model.span.state_dict()
    assert tuned.keys() == base.keys()  # adapters folded in: no LoRA tensors left
    changed = {name for name in base if not torch.equal(tuned[name], base[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed)  # only adapted layers moved
    # The adapters alone, as `--adapters` loads them: over the base weights they give the merged model's logits.
    adapter = tmp_path / "adapter"
    cli = [sys.executable, "-m", "swarmlm.cli", "export", str(peers[0].run_dir), "--out", str(adapter), "--adapter"]
    assert subprocess.run(cli).returncode == 0
    lora = load_adapter(adapter, model.config, range(model.config.num_layers))
    ids = torch.tensor([model.tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        want = merged.span(ids, torch.arange(ids.shape[1]))
        got = model.span(ids, torch.arange(ids.shape[1]), lora=lora)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


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
        assert averaged(peer) and all(r["group_size"] == 2 for r in averaged(peer))
    assert "waiting up to 60 s for 2 peers" in first.log.read_text()


def test_a_late_joiner_keeps_the_round_it_downloaded(data: Path, tmp_path: Path) -> None:
    """A peer that arrives after the run's last round takes it by download, and writes it as its own
    checkpoint: its run folder is not left empty."""
    args = ("--data", str(data), "--rounds", "1", *SHORT)
    # --matchmaking-time 5: the first peer lingers 22 s after its last round, while the late one starts.
    first = TrainerProcess(*args, "--min-peers", "1", "--matchmaking-time", "5", run_dir=tmp_path / "first")
    peers = [first.wait_ready()]
    try:
        wait_for(lambda: first.checkpointed_round() >= 1)
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
