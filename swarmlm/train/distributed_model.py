"""`DistributedModel`: a Keras-like Python API over one training peer.

    model = DistributedModel("tiny", swarm=["/ip4/.../p2p/..."], run_dir="runs/me", inner_lr=3e-3)
    history = model.fit("data/shakespeare", rounds=5)     # DiLoCo rounds with the swarm
    model.evaluate()                                       # {"val_loss": ..., "perplexity": ..., "blocks": ...}
    model.generate("ROMEO:", max_tokens=40)                # the serving engine on the current weights
    model.save("exported/")                                # what `swarmlm serve --model exported/` loads
    model.close()

`fit(data, pipeline_stages=3)` (or the constructor's `pipeline_stages=3`) makes this peer one stage of a
pipeline-trained model instead (pipeline_trainer.py): `fit` and `evaluate` run through every stage's
peers; `generate` and `save` need the whole model and refuse.

It composes the pieces `swarmlm train` is made of, in this process: a `Trainer` (trainer.py) built from a
`TrainConfig`, connected to the swarm once and kept connected between `fit` calls (so the other peers can
keep finding it and download its state), and the inference `Engine` that `swarmlm serve` runs.

A from-scratch model takes its vocabulary from its data's tokenizer, so it exists only once a dataset is
known: the peer is built, and joins the swarm, when it is given `data=` or at its first `fit`. Pass
`data=` to the constructor to learn `maddrs` before training (fit blocks, and the other peers need an
address to join).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from swarmlm.model.loading import LoadedModel
from swarmlm.train.pipeline_trainer import make_trainer
from swarmlm.train.progress import TrainMetrics, TrainProgress
from swarmlm.train.round_report import RoundReport
from swarmlm.train.train_config import PRESETS, TrainConfig
from swarmlm.train.trainer import Trainer

# What a connected peer may change between two fits: read afresh by every round of `Trainer.run`.
# Everything else (data, model, optimizers' shape, the averager's settings) is fixed once the peer
# is in the swarm.
LIVE_OPTIONS = frozenset(
    {
        "rounds",
        "inner_steps",
        "batch_size",
        "inner_lr",
        "warmup_steps",
        "min_lr_ratio",
        "keep_checkpoints",
        "byzantine",
        "byzantine_scale",
    }
)
# Set by the constructor's own arguments, not by **train_options.
_OWN_ARGUMENTS = {
    "size": "the model argument",
    "model": "the model argument",
    "initial_peers": "swarm=",
    "run_dir": "run_dir=",
    "run_id": "run_id=",
    "data": "data= (constructor) or the dataset argument (fit)",
}


class DistributedModel:
    """One training peer of a swarm, driven from Python: fit, evaluate, generate, save.

    `model`: a preset size ("tiny", "small", "base") trained from scratch, or a .gguf file / HF directory
    to fine-tune (all weights, or LoRA adapters with `lora_rank=`). `swarm`: multiaddrs of any peers of the
    run; None or [] starts a new swarm with this peer as its first. `run_dir`: this peer's checkpoints and
    round log (an existing one is resumed); None uses a temporary folder removed by `close()`.
    `**train_options`: `TrainConfig` fields (inner_lr, aggregation, dp_noise, min_group_size, ...),
    checked by `TrainConfig` itself.
    """

    def __init__(
        self,
        model: str = "tiny",
        swarm: Sequence[str] | str | None = None,
        *,
        run_id: str = "swarmlm-train",
        run_dir: str | Path | None = None,
        data: str | Path | None = None,
        **train_options: Any,
    ) -> None:
        if clash := sorted(train_options.keys() & _OWN_ARGUMENTS.keys()):
            raise ValueError(f"{clash[0]!r} is set by {_OWN_ARGUMENTS[clash[0]]}, not as a training option")
        self.name, self._size, self._base = _resolve_model(model)
        self.swarm = [swarm] if isinstance(swarm, str) else list(swarm or [])
        self.run_id = run_id
        self._tmp = tempfile.TemporaryDirectory(prefix="swarmlm-run-") if run_dir is None else None
        self.run_dir = Path(run_dir) if self._tmp is None else Path(self._tmp.name)
        self._options = train_options
        self._config(Path(data or "."), {})  # a bad option fails here, not at the first fit
        self._trainer: Trainer | None = None
        self._connected = False
        self._closed = False
        self._metrics: TrainMetrics | None = None
        if data is not None:
            self._connect(self._trainer_for(self._config(_data_dir(data), {})))

    # ---- the peer --------------------------------------------------------------------------------

    @property
    def maddrs(self) -> list[str]:
        """Where this peer listens: give one to other peers (`swarmlm train --initial-peers`) to join."""
        if not self._connected:
            raise ValueError("this peer is not in a swarm yet: give it data= or call fit() first")
        assert self._trainer is not None
        return self._trainer.swarm.visible_maddrs()

    @property
    def round(self) -> int:
        """The global round this peer's weights are at (0 before any training)."""
        return self._trainer.round if self._trainer is not None else 0

    def close(self) -> None:
        """Leave the swarm (averager and DHT shut down). The weights stay: evaluate, generate and save work."""
        if self._connected and self._trainer is not None:
            self._trainer.close()
        self._connected, self._closed = False, True
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- training --------------------------------------------------------------------------------

    def fit(
        self, dataset: str | Path | None = None, rounds: int | None = None, **train_options: Any
    ) -> list[RoundReport]:
        """Train with the swarm until the global round reaches `rounds` (an absolute round, as
        `swarmlm train --rounds`: a second `fit(rounds=5)` after reaching 5 does nothing).

        `dataset`: a prepared data folder (`swarmlm data prepare`); default: the one given before.
        `train_options` update the constructor's (and stay for later fits). Once the peer is in the
        swarm only the per-round ones (`LIVE_OPTIONS`) may change: other data or averaging settings need
        a new DistributedModel (the same `run_dir` resumes from its checkpoints). Returns this fit's
        round reports; on a fresh run the first is round 0, the initial weights' validation loss."""
        if self._closed:
            raise ValueError("this DistributedModel is closed")
        if set(train_options) & _OWN_ARGUMENTS.keys():
            raise ValueError(f"fit() cannot change {sorted(set(train_options) & _OWN_ARGUMENTS.keys())}")
        overrides = {**train_options, **({"rounds": rounds} if rounds is not None else {})}
        cfg = self._config(self._dataset(dataset), overrides)
        trainer = self._trainer_for(cfg)
        self._options = {**self._options, **overrides}  # they stay, like the dataset: fit() again continues
        self._connect(trainer)
        if self._metrics is None:  # one registry (and metrics port) for the peer's whole life
            self._metrics = TrainMetrics(cfg.metrics_port)
        tokens_per_step = cfg.batch_size * (trainer.shards.block_size - 1)
        with TrainProgress(cfg.inner_steps, tokens_per_step, self._metrics) as progress:
            return trainer.run(progress)

    def evaluate(self, dataset: str | Path | None = None) -> dict[str, float]:
        """Validation loss and perplexity of the current weights on a dataset's val split (default: the
        one fitted on), over its first `eval_blocks` blocks like the round reports. Works before any
        fit: a from-scratch model is then built (not trained, not connected) for the dataset."""
        from swarmlm.train.data import TokenShards
        from swarmlm.train.evaluation import evaluate

        data = self._dataset(dataset)
        trainer = self._trainer if self._trainer is not None else self._trainer_for(self._config(data, {}))
        val = TokenShards.open(data, "val")
        if val.vocab_size > trainer.model.config.vocab_size:
            raise ValueError(f"{data}: its vocabulary ({val.vocab_size}) is not this model's")
        blocks = min(trainer.cfg.eval_blocks, len(val))
        loss = evaluate(trainer.model, val.blocks(range(blocks)))
        return {"val_loss": loss, "perplexity": math.exp(loss), "blocks": blocks}

    # ---- inference and export --------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_tokens: int = 64,
        temperature: float = 1.0,
        seed: int | None = None,
        **sampling: Any,
    ) -> str:
        """The completion of `prompt` by the current weights (LoRA merged), from the same `Engine` that
        `swarmlm serve` runs, so what you see here is what serving the saved model gives.
        `sampling`: any other `SamplingParams` field (top_p, top_k, stop, repetition_penalty, ...)."""
        from swarmlm.engine.engine import Engine
        from swarmlm.engine.sampling import SamplingParams
        from swarmlm.engine.scheduler import make_scheduler

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, **sampling)
        loaded = self._serving_model()
        engine = Engine(loaded, make_scheduler("fcfs"))
        (seq,) = engine.add(loaded.tokenizer.encode(prompt), params)
        text = []
        while engine.has_work:
            text.extend(out.text_delta for out in engine.step() if out.seq is seq)
        if seq.error is not None:
            raise RuntimeError(f"generation failed: {seq.error}")
        return "".join(text)

    def save(self, out_dir: str | Path) -> None:
        """Write the current weights (LoRA merged) and the tokenizer as an HF directory, the same as
        `swarmlm export`: `swarmlm serve --model OUT_DIR` and `swarmlm peer --model OUT_DIR` load it."""
        if self._trainer is not None and self._trainer.cfg.pipeline_stages:
            raise ValueError("this peer holds one stage of a pipeline-trained model: it cannot save the model alone")
        if self._trainer is not None:
            self._trainer.model.export_hf(Path(out_dir), self._trainer.tokenizer)
        else:
            self._serving_model().save_hf(Path(out_dir))

    # ---- internals -------------------------------------------------------------------------------

    def _config(self, data: Path, overrides: dict[str, Any]) -> TrainConfig:
        return TrainConfig(
            data=data,
            run_dir=self.run_dir,
            run_id=self.run_id,
            size=self._size,
            model=self._base,
            initial_peers=list(self.swarm),
            **{**self._options, **overrides},
        )

    def _dataset(self, dataset: str | Path | None) -> Path:
        if dataset is not None:
            return _data_dir(dataset)
        if self._trainer is None:
            raise ValueError("no dataset yet: give a prepared data folder (swarmlm data prepare)")
        return self._trainer.cfg.data

    def _trainer_for(self, cfg: TrainConfig) -> Trainer:
        """The trainer for `cfg`: the current one when only per-round options differ (their new values
        apply from the next round), else a new one resumed from the run folder (only before the peer
        joined the swarm: a connected peer keeps its data and averaging settings)."""
        old = self._trainer
        if old is not None and dataclasses.replace(cfg, **{k: getattr(old.cfg, k) for k in LIVE_OPTIONS}) == old.cfg:
            old.cfg = cfg
            return old
        if self._connected:
            assert old is not None
            fields = [f.name for f in dataclasses.fields(cfg) if f.name not in LIVE_OPTIONS]
            changed = [name for name in fields if getattr(cfg, name) != getattr(old.cfg, name)]
            raise ValueError(
                f"this peer is in the swarm with another {', '.join(changed)}: between fits only "
                f"{', '.join(sorted(LIVE_OPTIONS))} may change; close() it and make a new DistributedModel "
                "(the same run_dir resumes from its checkpoints)"
            )
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        trainer = make_trainer(cfg)
        trainer.restore()  # evaluate/generate/save see a resumed run's weights before any fit
        self._trainer = trainer
        return trainer

    def _connect(self, trainer: Trainer) -> None:
        if not self._connected:
            trainer.connect()
            self._connected = True

    def _serving_model(self) -> LoadedModel:
        """The current weights as an eval-mode `LoadedModel`, what the inference engine runs: LoRA merged,
        in a copy (training goes on with the adapters). A fine-tuned model never fitted is its checkpoint."""
        import torch

        from swarmlm.model.llama import LlamaSpan
        from swarmlm.model.loading import load_model, part_digests

        if self._trainer is None:
            if self._base is not None:
                return load_model(self._base, device="cpu")
            raise ValueError(
                f"{self.name!r} has no tokenizer yet: a from-scratch model takes its vocabulary from its data, "
                "so fit() or evaluate() it on a dataset (or pass data=) first"
            )
        trained = self._trainer.model
        if self._trainer.cfg.pipeline_stages:
            raise ValueError("this peer holds one stage of a pipeline-trained model: it cannot generate or save alone")
        span = LlamaSpan(trained.config)
        span.load_state_dict(trained.merged_state())
        span = span.eval().requires_grad_(False)
        with torch.no_grad():
            parts = part_digests(span)
        return LoadedModel(self.name, self.run_dir, trained.config, span, parts, self._trainer.tokenizer)


def _resolve_model(model: str) -> tuple[str, str, str | None]:
    """(name, preset size, checkpoint to fine-tune or None) for the `model` argument."""
    if model in PRESETS:
        return model, model, None
    from swarmlm.model.checkpoint import CheckpointError
    from swarmlm.model.loading import resolve_model

    try:
        name, path = resolve_model(model)
    except CheckpointError as e:
        raise ValueError(
            f"unknown model {model!r}: give a preset size ({', '.join(PRESETS)}) to train from scratch, "
            "or a .gguf file / HF model directory to fine-tune"
        ) from e
    return name, "tiny", str(path)


def _data_dir(dataset: str | Path) -> Path:
    """An absolute path: the checkpoints record it, and `swarmlm export` may run from another folder."""
    from swarmlm.train.data import Manifest

    path = Path(dataset).expanduser().resolve()
    Manifest.load(path)  # DataError (a ValueError) naming the problem if it is not a prepared folder
    return path
