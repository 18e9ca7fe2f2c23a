"""Pipeline-parallel training: real `swarmlm train --pipeline-stages` peers, each holding one stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from swarmlm.launch.trainers import TrainerProcess, start_run
from swarmlm.train.checkpointer import load_checkpoint
from swarmlm.train.pipeline_trainer import FINAL_EVAL
from tests.test_cli_errors import USAGE, assert_error, swarmlm
from tests.training_runs import averaged, finish, wait_for

pytestmark = pytest.mark.slow

PIPE = ("--pipeline-stages", "3", "--inner-steps", "6", "--batch-size", "4", "--matchmaking-time", "1.5")
PIPE += ("--linger", "2")
PIPE += ("--eval-blocks", "8", "--min-group-size", "2", "--target-group-size", "2", "--inner-lr", "3e-3")


def stage_of(peer: TrainerProcess) -> tuple[int, str]:
    m = re.search(r"pipeline stage (\d+) of 3 \(layers (\d+:\d+)\)", peer.log.read_text())
    assert m is not None, peer.log.read_text()[-2000:]
    return int(m.group(1)), m.group(2)


def test_three_stages_of_two_peers_train_together_through_a_crash(data: Path, tmp_path: Path) -> None:
    """Six peers started at once deal themselves two to a stage; the tiny model's 4 layers split 1/2/1. A
    stage-1 peer is killed after its first round and restarted: it takes its stage back from its run folder
    and the run ends with every stage's two peers holding the same weights, the loss lower than at start,
    and every peer's evaluation of the end state made while every stage was still served."""
    peers = start_run(data, tmp_path, 6, ("--rounds", "3", "--min-peers", "2", *PIPE))
    try:
        stages = [stage_of(p) for p in peers]
        assert sorted(s for s, _ in stages) == [0, 0, 1, 1, 2, 2]
        assert {layers for _, layers in stages} == {"0:1", "1:3", "3:4"}
        victim = next(i for i, (s, _) in enumerate(stages) if s == 1)
        wait_for(lambda: len(averaged(peers[victim])) >= 1)
        peers[victim].crash()
        peers[victim] = peers[victim].restart(peers[0].maddr if victim else peers[1].maddr)
        assert stage_of(peers[victim].wait_ready())[0] == 1  # its run folder says which stage it held
    finally:
        finish(peers)
    for stage in range(3):
        mates = [p for p, (s, _) in zip(peers, stages, strict=True) if s == stage]
        finals = [json.loads((p.run_dir / "checkpoints" / "round-000003.json").read_text()) for p in mates]
        assert len({f["digest"] for f in finals}) == 1, f"stage {stage}'s peers ended apart"
    for peer in peers:
        reports = peer.rounds()
        assert reports[-1]["val_loss"] < reports[0]["val_loss"]
        # Once nobody trained, each peer evaluated the whole pipeline's end state, every stage still served.
        final = json.loads((peer.run_dir / FINAL_EVAL).read_text())
        assert final["round"] == 3 and final["val_loss"] < reports[0]["val_loss"]
    # A peer's checkpoint holds its stage only: the first stage, its embeddings and one layer.
    first = next(p for p, (s, _) in zip(peers, stages, strict=True) if s == 0)
    _, meta = load_checkpoint(first.run_dir / "checkpoints" / "round-000003.json")
    assert meta["model"]["pipeline_stages"] == 3
    assert all(not n.startswith("layers.") or n.startswith("layers.0.") for n in meta["names"])
    assert "lm_head.weight" not in meta["names"] and "embed_tokens.weight" in meta["names"]
    # `swarmlm export` needs the whole model: a stage's checkpoint says so.
    done = swarmlm("export", str(first.run_dir), "--out", str(tmp_path / "out"))
    assert_error(done, USAGE, "holds one stage of 3, not the model")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ("--pipeline-stages", "2", "--lora-rank", "4", "--model", "SmolLM2-135M-Instruct"),
            "trains a model from scratch",
        ),
        (("--pipeline-stages", "-1"), "must not be negative"),
        (("--pipeline-stages", "9", "--min-peers", "1"), "9 pipeline stages for a model of 4 layers: give 1 to 4"),
    ],
)
def test_a_stage_plan_that_cannot_work_is_refused(
    data: Path, tmp_path: Path, args: tuple[str, ...], words: str
) -> None:
    assert_error(swarmlm("train", "--data", str(data), "--run-dir", str(tmp_path / "run"), *args), USAGE, words)
