"""Validation loss of a model, and what a finished run gives back: `swarmlm eval` and `swarmlm export`.

A run's checkpoints hold the trained tensors and, in their record, what is needed to rebuild the model
(size or base checkpoint, LoRA rank, the model config, the data folder whose tokenizer it uses). The
export folds LoRA adapters into the weights and writes an HF directory with the data's tokenizer, which
`swarmlm serve` and `swarmlm peer` load like any other checkpoint: a model trained by the swarm is
served by the swarm.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from swarmlm.model.loading import resolve_model
from swarmlm.train.checkpointer import best_round, load_checkpoint
from swarmlm.train.data import TokenShards, load_data_tokenizer
from swarmlm.train.model import TrainableModel, build_model
from swarmlm.train.train_config import TrainConfig


@torch.no_grad()
def evaluate(model: TrainableModel, blocks: Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over validation blocks [N, L], `batch_size` blocks at a time (a trainer passes
    its training batch size: the logits of a batch over a large vocabulary are the peak of its memory)."""
    was_training = model.module.training
    model.module.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        total += float(model.loss(batch)) * len(batch)
        count += len(batch)
    model.module.train(was_training)
    return total / max(count, 1)


def run_identity(cfg: TrainConfig, model: TrainableModel) -> dict[str, Any]:
    """What a checkpoint records for `load_run_model` to rebuild its model."""
    return {
        "size": cfg.size,
        "base_model": cfg.model,
        "lora_rank": cfg.lora_rank,
        "seed": cfg.seed,
        "config": model.config.to_hf(),
        "data": str(cfg.data),
        "pipeline_stages": cfg.pipeline_stages,
    }


def _round_file(checkpoint: Path) -> Path:
    folder = checkpoint / "checkpoints" if (checkpoint / "checkpoints").is_dir() else checkpoint
    if not folder.is_dir():
        return checkpoint
    best = best_round(folder)
    if best is not None:
        return folder / f"round-{best[0]:06d}.json"
    found = sorted(folder.glob("round-*.json"))
    if not found:
        raise ValueError(f"{checkpoint}: no training checkpoint found")
    return found[-1]


def load_run_model(checkpoint: Path) -> tuple[TrainableModel, dict[str, Any]]:
    """Rebuild a trained model from a run folder (its best round), a checkpoints folder or a round file."""
    marker = _round_file(Path(checkpoint))
    tensors, meta = load_checkpoint(marker)
    ident = meta["model"]
    if ident.get("pipeline_stages"):
        raise ValueError(
            f"{checkpoint}: a pipeline peer's checkpoint holds one stage of {ident['pipeline_stages']}, not the model"
        )
    cfg = TrainConfig(
        data=Path(ident["data"]),
        run_dir=marker.parent,
        size=ident["size"],
        model=ident["base_model"],
        lora_rank=ident["lora_rank"],
        seed=ident["seed"],
    )
    mc = ident["config"]
    eos = mc["eos_token_id"][0] if mc.get("eos_token_id") else None
    model = build_model(cfg, mc["vocab_size"], mc["max_position_embeddings"], eos)
    with torch.no_grad():
        for i, p in enumerate(model.params):
            p.copy_(tensors[f"global.{i}"])
    return model, meta


def evaluate_checkpoint(checkpoint: Path, data: Path, blocks: int = 256) -> int:
    """`swarmlm eval`: print a checkpoint's validation loss and perplexity on a prepared data folder."""
    model, meta = load_run_model(checkpoint)
    val = TokenShards.open(data, "val")
    if val.vocab_size > model.config.vocab_size:
        raise ValueError(f"{data}: its vocabulary ({val.vocab_size}) is not this model's ({model.config.vocab_size})")
    loss = evaluate(model, val.blocks(range(min(blocks, len(val)))))
    print(
        f"round {meta['round']}: val_loss={loss:.4f} perplexity={math.exp(loss):.2f} ({min(blocks, len(val))} blocks)"
    )
    return 0


def export_checkpoint(checkpoint: Path, out: Path, adapter: bool = False) -> int:
    """`swarmlm export`: the run's best round as an HF directory (config, safetensors, tokenizer), or with
    `adapter` (a LoRA run) its adapters alone as a peft adapter folder."""
    model, meta = load_run_model(checkpoint)
    if adapter:
        base = meta["model"]["base_model"]
        model.export_adapter(out, resolve_model(base)[0] if base else "")
    else:
        model.export_hf(out, load_data_tokenizer(Path(meta["model"]["data"])))
    what = "adapters" if adapter else "model"
    print(f"exported the {what} of round {meta['round']} (val loss {meta['val_loss']:.4f}) to {out}")
    return 0
