"""LoRA adapters held apart from the model: named tensors that a forward pass applies to a `LlamaSpan`.

Fine-tuning through a swarm keeps the adapters on the client and sends each peer those of its layers with
every forward and backward request (`swarm/span_gradients.py`); the peer applies them to its frozen span.
The arithmetic is peft's LoRA layer on an `nn.Linear`, `base(x) + B(A(x)) * scale` in the same order, and
the names are peft's (`layers.3.self_attn.qkv_proj.lora_A`), so a run here and the same run with peft in
one process give the same numbers, and the adapters save as a peft adapter.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.model_config import ModelConfig

# Module paths inside a block, by peft's target name (`swarmlm train --lora` targets the same four).
LORA_TARGETS = {
    "qkv_proj": "self_attn.qkv_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up_proj": "mlp.gate_up_proj",
    "down_proj": "mlp.down_proj",
}
_NAME = re.compile(r"layers\.(\d+)\.(" + "|".join(re.escape(p) for p in LORA_TARGETS.values()) + r")\.lora_([AB])")


class LoraError(ValueError):
    """Adapters that do not fit the model or the layers they are applied to."""


def lora_layout(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable linear layer of block `layer` (a mixture of experts has no
    single MLP: only its attention projections are adapted)."""
    q_kv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {
        "self_attn.qkv_proj": (cfg.hidden_size, q_kv),
        "self_attn.o_proj": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
    }
    if not cfg.num_experts:
        shapes["mlp.gate_up_proj"] = (cfg.hidden_size, 2 * cfg.intermediate_size)
        shapes["mlp.down_proj"] = (cfg.intermediate_size, cfg.hidden_size)
    return shapes


def init_lora(cfg: ModelConfig, layers: range, rank: int, seed: int = 0) -> dict[str, Tensor]:
    """New adapters for `layers`, initialised as peft does (A Kaiming-uniform, B zero: the model starts
    unchanged), from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for layer in layers:
        for path, (fan_in, fan_out) in lora_layout(cfg, layer).items():
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5) on a [rank, fan_in] weight
            a = torch.rand(rank, fan_in, generator=gen) * 2 * bound - bound
            adapters[f"layers.{layer}.{path}.lora_A"] = a
            adapters[f"layers.{layer}.{path}.lora_B"] = torch.zeros(fan_out, rank)
    return adapters


def check_adapters(cfg: ModelConfig, adapters: dict[str, Tensor], start: int, end: int) -> int:
    """Raise LoraError unless `adapters` are whole A/B pairs of one rank for adaptable layers in
    [start, end), shaped for this model; returns the rank (0 for none)."""
    ranks = set()
    for name, tensor in adapters.items():
        match = _NAME.fullmatch(name)
        if match is None:
            raise LoraError(f"{name!r} is not a LoRA tensor name like layers.0.self_attn.qkv_proj.lora_A")
        layer, path, which = int(match[1]), match[2], match[3]
        if not start <= layer < end:
            raise LoraError(f"adapter {name} is for layer {layer}, outside layers {start}:{end}")
        shapes = lora_layout(cfg, layer)
        if path not in shapes:
            raise LoraError(f"adapter {name}: this model's layer {layer} has no {path}")
        fan_in, fan_out = shapes[path]
        other = name[:-1] + ("B" if which == "A" else "A")
        if other not in adapters:
            raise LoraError(f"adapter {name} comes without its {other}")
        rank = (tensor.shape[0] if which == "A" else tensor.shape[1]) if tensor.ndim == 2 else 0
        want = (rank, fan_in) if which == "A" else (fan_out, rank)
        if rank < 1 or tuple(tensor.shape) != want:
            raise LoraError(
                f"adapter {name} has shape {tuple(tensor.shape)}; layer {layer} needs [rank, {fan_in}] for A "
                f"and [{fan_out}, rank] for B"
            )
        if not tensor.is_floating_point():
            raise LoraError(f"adapter {name} is not a floating-point tensor")
        ranks.add(rank)
    if len(ranks) > 1:
        raise LoraError(f"adapters of several ranks ({sorted(ranks)}) in one request")
    return ranks.pop() if ranks else 0


@contextmanager
def lora_applied(span: nn.Module, first_layer: int, adapters: dict[str, Tensor], scale: float) -> Iterator[None]:
    """Within the block, forward passes of `span` (whose block 0 is model layer `first_layer`) *made by
    this thread* add the adapters' `B(A(x)) * scale` to their layers' outputs. Other threads are not
    affected: a peer's inference engine runs the same modules meanwhile."""
    owner = threading.get_ident()

    def hook(a: Tensor, b: Tensor) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
        def add_lora(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if threading.get_ident() != owner:
                return None
            return out + F.linear(F.linear(args[0], a.to(out.dtype)), b.to(out.dtype)) * scale

        return add_lora

    handles = []
    try:
        for name, a in adapters.items():
            if not name.endswith(".lora_A"):
                continue
            match = _NAME.fullmatch(name)
            assert match is not None  # check_adapters ran
            module = span.get_submodule(f"layers.{int(match[1]) - first_layer}.{match[2]}")
            handles.append(module.register_forward_hook(hook(a, adapters[name[:-1] + "B"])))
        yield
    finally:
        for handle in handles:
            handle.remove()
