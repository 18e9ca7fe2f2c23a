"""`swarmlm.DistributedModel`: a peer in this process trains with a real `swarmlm train` process, then
evaluates, generates with the serving engine and saves a model that loads and generates the same."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from swarmlm import DistributedModel
from swarmlm.engine.engine import Engine
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.launch.trainers import TrainerProcess
from swarmlm.model.loading import load_model
from swarmlm.train.data import DataError, TokenShards, default_corpus_files, prepare

pytestmark = pytest.mark.slow

OPTIONS = {"inner_steps": 10, "batch_size": 8, "matchmaking_time": 1.5, "inner_lr": 3e-3, "linger": 2.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two plays, a 512-token BPE trained on them, 64-token blocks."""
    out = tmp_path_factory.mktemp("data")
    prepare(default_corpus_files()[:2], out, train_tokenizer=512, block_size=64)
    return out


def test_fit_with_a_cli_peer_then_evaluate_generate_save(data: Path, tmp_path: Path) -> None:
    run_id = "python-api-test"
    group = {"min_group_size": 2, "target_group_size": 2}
    model = DistributedModel(
        "tiny", run_id=run_id, run_dir=tmp_path / "me", data=data, data_part=(0, 2), **OPTIONS, **group
    )
    other = None
    try:
        before = model.evaluate()  # the initial weights: the data is known, nothing trained yet
        args = ("--data", str(data), "--data-part", "1/2", "--rounds", "3", "--run-id", run_id)
        args += ("--min-group-size", "2", "--target-group-size", "2", "--inner-steps", "10", "--batch-size", "8")
        args += ("--matchmaking-time", "1.5", "--inner-lr", "3e-3", "--linger", "2")
        other = TrainerProcess(*args, run_dir=tmp_path / "other", initial=model.maddrs[0]).wait_ready()
        history = model.fit(rounds=3)
        assert other.finish(timeout=120) == 0, other.log.read_text()[-3000:]

        trained = [r for r in history if r.tokens > 0]
        assert [r.round for r in trained] == [1, 2, 3] and model.round == 3
        assert all(r.averaged and r.group_size == 2 for r in trained)
        theirs = [r for r in other.rounds() if r["averaged"]]
        assert [r["group_size"] for r in theirs] == [2, 2, 2]
        assert trained[-1].digest == theirs[-1]["digest"]  # one swarm, one set of weights

        after = model.evaluate()
        assert after["val_loss"] < before["val_loss"] < math.log(512) + 0.5
        assert after["perplexity"] == pytest.approx(math.exp(after["val_loss"]))
        assert after["blocks"] > 0

        text = model.generate("ROMEO:", max_tokens=16, temperature=0.0)
        assert text  # 30 steps of training: mostly line breaks, but the model's own
        assert model.generate("ROMEO:", max_tokens=16, temperature=0.0) == text

        out = tmp_path / "exported"
        model.save(out)
        loaded = load_model(str(out), device="cpu")
        assert loaded.config.vocab_size == TokenShards.open(data).vocab_size
        # What `swarmlm serve --model exported/` runs gives what generate() gave.
        engine = Engine(loaded, make_scheduler("fcfs"))
        (seq,) = engine.add(loaded.tokenizer.encode("ROMEO:"), SamplingParams(max_tokens=16, temperature=0.0))
        while engine.has_work:
            engine.step()
        assert seq.text == text

        with pytest.raises(ValueError, match="between fits only"):
            model.fit(rounds=4, data_part=(1, 2))  # a connected peer keeps its slice of the data
    finally:
        if other is not None:
            other.stop()
        model.close()


def test_bad_inputs_are_clear_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'huge'.*tiny, small, base"):
        DistributedModel("huge")
    with pytest.raises(ValueError, match="not-there"):
        DistributedModel("./not-there.gguf")
    with pytest.raises(ValueError, match="mode must be diloco or ddp"):
        DistributedModel("tiny", mode="sgd")
    with DistributedModel("tiny", run_dir=tmp_path / "run") as model:
        with pytest.raises(ValueError, match="no tokenizer"):
            model.generate("ROMEO:")
        with pytest.raises(ValueError, match="no dataset"):
            model.evaluate()
        with pytest.raises(ValueError, match="not in a swarm"):
            _ = model.maddrs
        with pytest.raises(DataError):
            model.evaluate(tmp_path)  # not a prepared folder
        # Before any fit, a dataset is enough to build the model (not connected): evaluate and generate work.
        assert model.evaluate(data)["val_loss"] > 0
        assert isinstance(model.generate("ROMEO:", max_tokens=4, seed=1), str)


def test_fit_one_stage_of_a_pipeline_with_a_cli_peer_holding_the_other(data: Path, tmp_path: Path) -> None:
    """`pipeline_stages=2`: this process trains the stage the swarm lacks, a `swarmlm train` peer the other;
    the loss falls for both, and generating or saving needs the whole model."""
    run_id = "python-api-pipeline"
    options = {**OPTIONS, "inner_steps": 6, "min_peers": 1, "pipeline_stages": 2}
    args = ("--data", str(data), "--rounds", "2", "--run-id", run_id, "--pipeline-stages", "2", "--min-peers", "1")
    args += ("--inner-steps", "6", "--batch-size", "8", "--matchmaking-time", "1.5", "--inner-lr", "3e-3")
    args += ("--linger", "2")
    other = TrainerProcess(*args, run_dir=tmp_path / "other").wait_ready()
    try:
        with DistributedModel("tiny", other.maddr, run_id=run_id, run_dir=tmp_path / "me", **options) as model:
            history = model.fit(data, rounds=2)
            assert [r.round for r in history if r.tokens > 0] == [1, 2]
            assert history[-1].val_loss < history[0].val_loss  # the whole model, through both stages
            with pytest.raises(ValueError, match="one stage of a pipeline-trained model"):
                model.generate("ROMEO:", max_tokens=4)
            # Connected until closed, this process still serves its stage to the other peer's last steps.
            assert other.finish(timeout=120) == 0, other.log.read_text()[-3000:]
        assert "pipeline stage 0 of 2" in other.log.read_text()  # first there, so this process took stage 1
    finally:
        other.stop()
