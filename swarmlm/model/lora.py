"""LoRA adapters held apart from the model: named tensors that a forward pass applies to a `LlamaSpan`.

Fine-tuning through a swarm keeps the adapters on the client and sends each peer those of its layers with
every forward and backward request (`swarm/span_gradients.py`); serving loads adapters once (`--adapters
NAME=PATH`) and applies to each sequence of a batched step its own (`LoraRows`). The arithmetic is peft's
LoRA layer on an `nn.Linear`, `base(x) + B(A(x)) * scale` in the same order, and the names are peft's
(`layers.3.self_attn.qkv_proj.lora_A`), so a run here and the same run with peft in one process give the
same numbers, and adapters save and load as peft adapter folders.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from swarmlm.core.files import atomic_directory, sha256_file
from swarmlm.model.model_config import ModelConfig
from swarmlm.model.peft_layout import LayoutError, fuse_adapter

# Module paths inside a block, by peft's target name (`swarmlm train --lora` targets the same four).
LORA_TARGETS = {
    "qkv_proj": "self_attn.qkv_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up_proj": "mlp.gate_up_proj",
    "down_proj": "mlp.down_proj",
}
_NAME = re.compile(r"layers\.(\d+)\.(" + "|".join(re.escape(p) for p in LORA_TARGETS.values()) + r")\.lora_([AB])")


LORA_ALPHA_PER_RANK = 2  # lora_alpha = 2 x rank unless told: the scale swarmlm's fine-tuning uses
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]+")


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


def random_adapter(cfg: ModelConfig, rank: int, seed: int, std: float = 0.05) -> dict[str, Tensor]:
    """An adapter that changes the model (B drawn too, not zero), for tests and benches."""
    adapters = init_lora(cfg, range(cfg.num_layers), rank, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, tensor in adapters.items():
        if name.endswith("lora_B"):
            tensor.normal_(0, std, generator=gen)
    return adapters


def check_adapters(cfg: ModelConfig, adapters: dict[str, Tensor], start: int, end: int, one_rank: bool = True) -> int:
    """Raise LoraError unless `adapters` are whole A/B pairs (of one rank, unless not `one_rank`) for
    adaptable layers in [start, end), shaped for this model; returns the largest rank (0 for none)."""
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
        a = adapters[name[:-1] + "A"]
        rank = a.shape[0] if a.ndim == 2 else 0
        if which == "B" and tensor.ndim == 2 and tensor.shape[0] == fan_out and 0 < rank != tensor.shape[1]:
            raise LoraError(f"adapter {name} has rank {tensor.shape[1]}; its lora_A has rank {rank}")
        want = (rank, fan_in) if which == "A" else (fan_out, rank)
        if rank < 1 or tuple(tensor.shape) != want:
            raise LoraError(
                f"adapter {name} has shape {tuple(tensor.shape)}; layer {layer} needs [rank, {fan_in}] for A "
                f"and [{fan_out}, rank] for B"
            )
        if not tensor.is_floating_point():
            raise LoraError(f"adapter {name} is not a floating-point tensor")
        ranks.add(rank)
    if one_rank and len(ranks) > 1:
        raise LoraError(f"adapters of several ranks ({sorted(ranks)}) in one request")
    return max(ranks, default=0)


class LoraAdapter:
    """One adapter as a `LoraBackend` (model/llama.py) that adds itself to every row: A and B for each
    adapted linear layer, and the scale (lora_alpha / rank)."""

    def __init__(self, tensors: dict[str, Tensor], scale: float, digest: str = "") -> None:
        """`digest`: of the file it was loaded from (peers holding one adapter name announce it, so a
        route never mixes two different adapters of one name)."""
        self.tensors, self.scale, self.digest = tensors, scale, digest
        self.pairs = {n.removesuffix(".lora_A"): (a, tensors[n[:-1] + "B"]) for n, a in tensors.items() if n[-1] == "A"}

    def delta(self, name: str, x: Tensor) -> Tensor | None:
        """B(A(x)) * scale for linear layer `name`, or None if this adapter leaves it alone."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        a, b = pair
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale

    def add(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        delta = self.delta(name, x)
        return out if delta is None else out + delta

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
        return LoraAdapter({n: t.to(device, dtype) for n, t in self.tensors.items()}, self.scale, self.digest)


class LoraRows:
    """Several adapters in one batched inference step: each adapter adds itself to its rows only (rows of
    no group run the base model). Adds in place: no autograd."""

    def __init__(self, groups: list[tuple[LoraAdapter, Tensor]]) -> None:
        self.groups = groups  # (adapter, indices of its rows)

    def add(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        for adapter, rows in self.groups:
            delta = adapter.delta(name, x[rows])
            if delta is not None:
                out.index_add_(0, rows, delta)
        return out


def save_adapter(out_dir: str | Path, adapters: dict[str, Tensor], alpha: float, base_model: str) -> None:
    """`adapters` (all of one rank) as a peft LoRA adapter folder: adapter_config.json and
    adapter_model.safetensors, written whole or not at all."""
    rank = next(t.shape[0] for n, t in adapters.items() if n.endswith("lora_A"))
    tensors = {f"base_model.model.{n}.weight": t.detach().float().contiguous() for n, t in adapters.items()}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(LORA_TARGETS),
        "bias": "none",
        "task_type": None,
    }
    with atomic_directory(out_dir) as out:
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """`--adapters NAME=PATH ...` -> {name: folder}; ValueError with what is wrong."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path or _ADAPTER_NAME.fullmatch(name) is None:
            raise ValueError(f"--adapters {spec!r}: give NAME=PATH, NAME of letters, digits, '.', '_' or '-'")
        if name in out:
            raise ValueError(f"--adapters: {name!r} is given twice")
        out[name] = Path(path)
    return out


def load_adapters(
    specs: list[str], cfg: ModelConfig, layers: range, device: torch.device, dtype: torch.dtype
) -> dict[str, LoraAdapter]:
    """The adapters `--adapters` names, their tensors for `layers`, on the model's device and dtype."""
    return {
        name: load_adapter(path, cfg, layers).to(device, dtype) for name, path in parse_adapter_specs(specs).items()
    }


def load_adapter(path: str | Path, cfg: ModelConfig, layers: range) -> LoraAdapter:
    """A peft LoRA adapter folder, only its tensors for `layers`: as `RemoteCausalLM.save_adapter` or
    `swarmlm train --lora` write it, or as peft writes one trained on the transformers model (its separate
    q/k/v and gate/up adapters fused: model/peft_layout.py). LoraError, with what is wrong, for anything else."""
    folder = Path(path)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise LoraError(
            f"{folder} is not a readable peft adapter (adapter_config.json, adapter_model.safetensors): {e}"
        ) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LoraError(f"{folder}: adapter_config.json is not a LoRA adapter's (peft_type LORA)")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise LoraError(f"{folder}: adapter_config.json needs a rank r >= 1 and a lora_alpha")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraError(f"{folder}: per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported")
    # peft's prefix, then transformers' model prefix (an adapter trained on the transformers model)
    named = {
        k.removeprefix("base_model.model.").removeprefix("model.").removesuffix(".weight"): t
        for k, t in tensors.items()
    }
    if any(name.endswith(".lora_A") and (t.ndim != 2 or t.shape[0] != rank) for name, t in named.items()):
        raise LoraError(f"{folder}: its tensors do not have the rank r={rank} its config says")
    try:
        named = fuse_adapter({n: t.float() for n, t in named.items()}, cfg)
    except LayoutError as e:
        raise LoraError(f"{folder}: {e}") from None
    for name in named:
        if _NAME.fullmatch(name) is None:
            raise LoraError(f"{folder}: {name} is not a LoRA weight of this model's layers' projections")
    check_adapters(cfg, named, 0, cfg.num_layers, one_rank=False)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    ours = {n: t for n, t in named.items() if int(n.split(".")[1]) in layers}
    return LoraAdapter(ours, scale, f"{sha256_file(folder / 'adapter_model.safetensors')[:16]}/{scale:g}")
