"""How much memory a span of a model needs, and how much a device has to give.

A span's weights are measured, not modelled: the span is built on the meta device (no memory, no
checkpoint read), cast to the served dtype and quantized as `load_model` would (`quant.quantize_` runs on
meta tensors too), and its parameters and buffers are summed. So the estimate follows `LlamaSpan` and
`quant.py` for every family and format they support, with no second description of either.

The KV reservation is what a span needs beyond its weights: room for `KV_RESERVE_TOKENS` tokens through
each of its layers (one 8k context, or many shorter sessions), 2 × kv_heads × head_dim × dtype bytes per
token and layer; an explicit KV budget replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from torch import nn

from swarmlm.core.sizes import HEADROOM_FRACTION, HEADROOM_MIN, KV_RESERVE_TOKENS, format_size
from swarmlm.model.llama import LlamaSpan
from swarmlm.model.loading import DTYPES, meta_span
from swarmlm.model.model_config import ModelConfig
from swarmlm.model.quant import quantize_


class MemoryShortError(ValueError):
    """What was asked does not fit the memory budget; the message names the shortfall."""


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor once (a tied head)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _meta_span(cfg: ModelConfig, start: int, end: int, edges: bool, dtype: str, quant: str) -> LlamaSpan:
    span = meta_span(cfg, start, end, edges).to(DTYPES[dtype])
    quantize_(span, quant)
    return span


def span_weight_bytes(cfg: ModelConfig, start: int, end: int, edges: bool, dtype: str, quant: str) -> int:
    """Bytes the weights of layers [start, end) take once loaded (`load_model`'s arguments, same meaning)."""
    return module_bytes(_meta_span(cfg, start, end, edges, dtype, quant))


def layer_weight_bytes(cfg: ModelConfig, dtype: str, quant: str) -> list[int]:
    """Bytes of each layer's weights (no embeddings, no head: what a swarm peer holds per layer)."""
    span = _meta_span(cfg, 0, cfg.num_layers, False, dtype, quant)
    return [module_bytes(block) for block in span.layers]


def kv_bytes_per_token(cfg: ModelConfig, layers: int, dtype: str) -> int:
    """KV cache bytes one token takes through `layers` layers: a key and a value per KV head."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * DTYPES[dtype].itemsize * layers


def kv_reservation(cfg: ModelConfig, layers: int, dtype: str) -> int:
    return KV_RESERVE_TOKENS * kv_bytes_per_token(cfg, layers, dtype)


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv

    def __str__(self) -> str:
        return f"{format_size(self.total)} (weights {format_size(self.weights)} + KV {format_size(self.kv)})"


def span_need(
    cfg: ModelConfig, start: int, end: int, edges: bool, dtype: str, quant: str, kv_budget: int | None
) -> MemoryNeed:
    """Weights of layers [start, end) plus `kv_budget`, or the KV reservation for them when None."""
    weights = span_weight_bytes(cfg, start, end, edges, dtype, quant)
    return MemoryNeed(weights, kv_budget or kv_reservation(cfg, end - start, dtype))


def free_memory(device: torch.device) -> int:
    """Bytes free now where the weights would go: the accelerator's memory, else RAM that programs can
    still get without swapping (psutil's `available`, which counts reclaimable page cache)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemoryBudget:
    """What a process may use for weights and KV cache: `--max-memory`, or free memory less headroom."""

    size: int
    given: bool  # set by --max-memory (else the default)

    @classmethod
    def of(cls, max_memory: int | None, device: torch.device) -> MemoryBudget:
        if max_memory is not None:
            return cls(max_memory, True)
        free = free_memory(device)
        return cls(max(0, free - max(int(free * HEADROOM_FRACTION), HEADROOM_MIN)), False)

    def __str__(self) -> str:
        if self.given:
            return f"--max-memory is {format_size(self.size)}"
        return f"free memory less headroom is {format_size(self.size)} (--max-memory sets it)"

    def check(self, claim: str, need: MemoryNeed, hint: str) -> None:
        """Raise MemoryShortError unless `need` fits: '{claim} {need}, {self}: short by X; {hint}'."""
        if need.total > self.size:
            short = format_size(need.total - self.size)
            raise MemoryShortError(f"{claim} {need}, {self}: short by {short}; {hint}")


def device_label(device: torch.device) -> str:
    """'cpu', or an accelerator with its index and name, e.g. 'cuda:0 (NVIDIA H200)'."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
