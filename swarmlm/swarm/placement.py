"""Work placed by capability: how many layers a peer takes, and what it announces about its machine.

A peer's memory budget (`--max-memory`, else free memory less headroom) must hold its span's weights, in
the dtype and quantization it serves, plus its KV budget (`--kv-budget`, else the KV reservation of
`model/memory.py`: room for 8192 tokens through each layer). `--layers auto` takes as many layers as that
holds (at most `--num-layers`); which layers, `routing.choose_span` decides. All of it is settled before
the peer joins the DHT, so a peer that cannot serve says so at once.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

from swarmlm.model.loading import resolve_device, resolve_dtype
from swarmlm.model.memory import MemoryBudget, MemoryNeed, device_label, kv_reservation, layer_weight_bytes, span_need
from swarmlm.model.model_config import ModelConfig
from swarmlm.swarm.peer_config import PeerConfig


@dataclass(frozen=True)
class Placement:
    device: str  # announced: "cpu", "cuda:0 (NVIDIA H200)"
    dtype: str  # resolved: fp32, bf16 or fp16
    budget: MemoryBudget
    span_layers: int  # the size of its span (an `auto` peer keeps it when it moves); 0 for --layers none
    kv_budget: int  # KV cache bytes for a span of that size


def place(cfg: PeerConfig, model: ModelConfig, span: tuple[int, int] | None) -> Placement:
    """Where the peer runs and how many layers it takes (`span`: from a fixed --layers). Raises ValueError
    for a --device this machine lacks, and MemoryShortError (one line) when a fixed span does not fit the
    budget, or when an `auto` peer's budget holds not even one layer."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    budget = MemoryBudget.of(cfg.max_memory, device)

    def kv(layers: int) -> int:
        return cfg.kv_budget or kv_reservation(model, layers, dtype)

    if cfg.layers == "auto":
        weights = max(layer_weight_bytes(model, dtype, cfg.quant))  # per layer: the largest
        one = MemoryNeed(weights, kv(1))
        budget.check("one layer needs", one, "this peer cannot serve; use --dtype bf16 or --quant int8/int4")
        # A fixed --kv-budget is paid once, whatever the span's size; the reservation, per layer.
        fit = (budget.size - cfg.kv_budget) // weights if cfg.kv_budget else budget.size // one.total
        layers = min(fit, cfg.num_layers or model.num_layers, model.num_layers)
    elif span is not None:
        layers = span[1] - span[0]
        need = span_need(model, *span, False, dtype, cfg.quant, cfg.kv_budget)
        budget.check(f"layers {span[0]}:{span[1]} need", need, "take fewer layers, or --layers auto")
    else:
        layers = 0
    return Placement(device_label(device), dtype, budget, layers, kv(layers) if layers else 0)


def host_fingerprint() -> str:
    """Names this machine without saying which it is: peers announcing the same value share its cores (a
    gateway does not pipeline micro-batches through them, see remote_executor.py). Network namespaces and
    containers on one machine share its boot id, so they count as one machine, as they should."""
    for source in (Path("/proc/sys/kernel/random/boot_id"), Path("/etc/machine-id")):
        try:
            ident = source.read_text().strip()
        except OSError:
            continue
        if ident:
            return hashlib.sha256(ident.encode()).hexdigest()[:16]
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:16]
