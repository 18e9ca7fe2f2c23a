"""The model a training peer trains: a preset size from scratch, or a checkpoint, optionally with LoRA.

`TrainableModel` names the tensors that train (and travel between peers): all weights from scratch, the
LoRA adapters alone when fine-tuning with `lora_rank > 0`. Everything else stays frozen and identical
on every peer because it comes from the same checkpoint.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.checkpoint import save_hf_checkpoint
from swarmlm.model.llama import LlamaSpan
from swarmlm.model.loading import DTYPES
from swarmlm.model.lora import LORA_ALPHA_PER_RANK, LORA_TARGETS, save_adapter
from swarmlm.model.model_config import ModelConfig
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.train.train_config import TrainConfig, preset_config


@dataclass
class TrainableModel:
    module: nn.Module  # a LlamaSpan, or peft's wrapper around one
    config: ModelConfig
    names: list[str]  # the trained parameters, in a fixed order shared by every peer
    params: list[nn.Parameter]

    def loss(self, blocks: Tensor) -> Tensor:
        """Next-token cross-entropy over a batch of token blocks [B, L]."""
        inputs, targets = blocks[:, :-1], blocks[:, 1:]
        logits = self.module(inputs, torch.arange(inputs.shape[1]))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def merged_state(self) -> dict[str, Tensor]:
        """The whole model's weights with any LoRA adapters folded in (for export and serving)."""
        module = self.module
        if hasattr(module, "merge_and_unload"):  # peft: merge into a copy, keep training the adapters
            import copy

            module = copy.deepcopy(module).merge_and_unload()
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def export_adapter(self, out_dir: Path, base_model: str) -> None:
        """The LoRA adapters alone, as a peft adapter folder that `--adapters NAME=FOLDER` serves beside
        the base model. ValueError for a run that trained every weight."""
        if not hasattr(self.module, "merge_and_unload"):
            raise ValueError("this run trained every weight, not LoRA adapters: export it whole (without --adapter)")
        adapters = {
            n.removeprefix("base_model.model.").removesuffix(".default.weight"): p
            for n, p in zip(self.names, self.params, strict=True)
        }
        rank = next(p.shape[0] for n, p in adapters.items() if n.endswith("lora_A"))
        save_adapter(out_dir, adapters, LORA_ALPHA_PER_RANK * rank, base_model)

    def export_hf(self, out_dir: Path, tokenizer: Tokenizer) -> None:
        """An HF directory (config, safetensors, tokenizer) that `swarmlm serve` and `swarmlm peer` load."""
        save_hf_checkpoint(self.merged_state(), self.config, out_dir)
        tokenizer.hf.save_pretrained(str(out_dir))


def init_weights_by_name(span: LlamaSpan, seed: int) -> None:
    """GPT-2 style init (normal, std 0.02) with one generator per tensor, seeded by `seed` and the tensor's
    name in the whole model: a pipeline stage (a span of layers) starts from exactly the values that the
    whole model, initialised the same way, holds for those layers."""
    for name, p in span.named_parameters():
        whole = re.sub(r"^layers\.(\d+)", lambda m: f"layers.{int(m[1]) + span.start}", name)
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
            continue
        key = int.from_bytes(hashlib.sha256(f"{seed}:{whole}".encode()).digest()[:8], "little")
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(key)) * 0.02)


def _init_weights(span: LlamaSpan, seed: int) -> None:
    """GPT-2 style init (normal, std 0.02), seeded: peers of one run start from identical weights."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(span.named_parameters()):
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build_model(cfg: TrainConfig, vocab_size: int, context: int, eos_token_id: int | None) -> TrainableModel:
    if cfg.model is None:
        model_cfg = preset_config(cfg.size, vocab_size, context, eos_token_id)
        span = LlamaSpan(model_cfg)
        _init_weights(span, cfg.seed)
    else:
        from swarmlm.model.loading import load_model

        loaded = load_model(cfg.model, dtype="fp32", device="cpu")
        model_cfg, span = loaded.config, loaded.span
        if model_cfg.vocab_size < vocab_size:
            raise ValueError(f"the data's vocabulary ({vocab_size}) exceeds the model's ({model_cfg.vocab_size})")
    span.to(DTYPES[cfg.dtype]).train()
    module: nn.Module = span
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        span.requires_grad_(False)
        targets = list(LORA_TARGETS)
        alpha = LORA_ALPHA_PER_RANK * cfg.lora_rank
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        torch.manual_seed(cfg.seed)  # adapters' A matrices are random: identical on every peer
        module = get_peft_model(span, lora)
    else:
        span.requires_grad_(True)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return TrainableModel(module, model_cfg, [n for n, _ in named], [p for _, p in named])
