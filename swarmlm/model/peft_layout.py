"""peft LoRA adapters trained on a transformers model, brought to the fused layout swarmlm's layers use.

A model built by transformers has separate q_proj, k_proj, v_proj and gate_proj, up_proj; `LlamaSpan`
holds each group as one fused matrix (model/checkpoint.py). An adapter of the parts becomes one adapter
of the fused matrix, exactly: A stacks the parts' A (its rank is the sum of theirs) and B puts each
part's B in that part's rows and its own columns, zero elsewhere, so B·A is the parts' B·A stacked, with
zero rows for a part the adapter leaves alone (peft's default targets q_proj and v_proj only). The scale
(lora_alpha / r) is shared by all of peft's modules unless per-module patterns are set, which are refused.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from swarmlm.model.checkpoint import FUSED_PROJECTIONS, fused_part_rows
from swarmlm.model.model_config import ModelConfig

# A peft name under transformers' model (`model.layers.3.self_attn.q_proj.lora_A`, "model." stripped by
# the caller along with peft's "base_model.model." prefix) or already under ours.
_PART = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])")
_FUSED_OF = {part: fused for fused, parts in FUSED_PROJECTIONS.items() for part in parts}


class LayoutError(ValueError):
    """An adapter whose tensors cannot be brought to the model's layout."""


def fuse_adapter(named: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """`named`: {"layers.N.<module>.lora_A|B": tensor}, with transformers' unfused module names or ours.
    Returns the same adapter over the fused matrices; tensors of other modules pass unchanged."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[int, str], dict[str, tuple[Tensor, Tensor]]] = {}  # (layer, fused) -> part -> (A, B)
    for name, tensor in named.items():
        match = _PART.fullmatch(name)
        if match is None or match[2] not in _FUSED_OF:
            out[name] = tensor
            continue
        if match[3] == "B":
            continue  # taken with its A
        b = named.get(name[:-1] + "B")
        if b is None:
            raise LayoutError(f"adapter {name} comes without its lora_B")
        parts.setdefault((int(match[1]), _FUSED_OF[match[2]]), {})[match[2]] = (tensor, b)
    rows = fused_part_rows(cfg)
    for (layer, fused), pairs in parts.items():
        out[f"layers.{layer}.{fused}.lora_A"], out[f"layers.{layer}.{fused}.lora_B"] = _stack(
            f"layer {layer}", FUSED_PROJECTIONS[fused], rows[fused], pairs
        )
    return out


def _stack(
    where: str, order: tuple[str, ...], rows: list[int], pairs: dict[str, tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """One (A, B) for a fused matrix from its parts' pairs (`order`: its parts, `rows`: their heights)."""
    for part, (a, b) in pairs.items():
        height = rows[order.index(part)]
        if a.ndim != 2 or b.ndim != 2 or b.shape != (height, a.shape[0]):
            raise LayoutError(
                f"adapter {part} of {where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"its {height} output rows"
            )
    a = torch.cat([pairs[p][0] for p in order if p in pairs])
    b = torch.zeros(sum(rows), a.shape[0], dtype=a.dtype)
    row = col = 0
    for part, height in zip(order, rows, strict=True):
        if part in pairs:
            rank = pairs[part][0].shape[0]
            b[row : row + height, col : col + rank] = pairs[part][1]
            col += rank
        row += height
    return a, b
