"""Work placed by capability, in-process: a span's memory estimate against the real loaded span, sizes as
flags take them, the memory budget's verdict, and how many layers a peer takes. (The commands that refuse
a budget too small are in test_cli_errors.py; a real `auto` peer sized by its budget, in test_swarm.py.)"""

from __future__ import annotations

import pytest
import torch

from swarmlm.core.sizes import KV_RESERVE_TOKENS, format_size, parse_size
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.loading import load_model, resolve_device, resolve_model
from swarmlm.model.memory import (
    MemoryBudget,
    MemoryNeed,
    MemoryShortError,
    device_label,
    kv_bytes_per_token,
    layer_weight_bytes,
    span_need,
    span_weight_bytes,
)
from swarmlm.model.model_config import ModelConfig
from swarmlm.swarm.peer_config import PeerConfig
from swarmlm.swarm.placement import place
from swarmlm.swarm.span_record import SpanRecord


@pytest.fixture(scope="module")
def smollm2() -> ModelConfig:
    return open_checkpoint(resolve_model(None)[1]).config


def allocated_bytes(module: torch.nn.Module) -> int:
    """What the loaded module's tensors occupy: each storage once (a tied head shares the embedding's)."""
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize(
    ("layers", "dtype", "quant", "edges"),
    [((0, 30), "fp32", "none", True), ((3, 9), "bf16", "none", False), ((0, 4), "fp32", "int8", True)],
)
def test_the_estimate_is_what_loading_allocates(
    smollm2: ModelConfig, layers: tuple[int, int], dtype: str, quant: str, edges: bool
) -> None:
    loaded = load_model(layers=layers, dtype=dtype, quant=quant, edges=edges, device="cpu")
    real = allocated_bytes(loaded.span)
    assert span_weight_bytes(smollm2, *layers, edges, dtype, quant) == pytest.approx(real, rel=0.02)


def test_what_a_layer_and_the_kv_cost(smollm2: ModelConfig) -> None:
    # SmolLM2-135M: hidden 576, MLP 1536, 9 query heads and 3 KV heads of 64: 3,540,096 weights a layer.
    assert layer_weight_bytes(smollm2, "fp32", "none") == [3_540_096 * 4] * 30
    # int4: half a byte a weight, a bf16 scale and zero per 32 of them; the norms stay bf16.
    linear = 3_540_096 - 2 * 576
    assert set(layer_weight_bytes(smollm2, "bf16", "int4")) == {linear // 2 + linear // 32 * 4 + 2 * 576 * 2}
    assert kv_bytes_per_token(smollm2, 10, "bf16") == 2 * 3 * 64 * 2 * 10
    need = span_need(smollm2, 0, 2, False, "fp32", "none", None)
    assert need == MemoryNeed(2 * 3_540_096 * 4, KV_RESERVE_TOKENS * 2 * 3 * 64 * 4 * 2)
    assert span_need(smollm2, 0, 2, False, "fp32", "none", 5 << 20).kv == 5 << 20  # --kv-budget replaces it


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GiB", 2 << 30), ("1.5GB", 1_500_000_000), ("800MB", 800_000_000), ("123456", 123456), ("64 kib", 65536)],
)
def test_sizes_as_flags_take_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2XB", "GB", "-5", "1e9", "0", ""])
def test_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_budget_says_by_how_much_it_is_short() -> None:
    assert format_size(6_900_000_000) == "6.9 GB" and format_size(999) == "999 B"
    need = MemoryNeed(6_800_000_000, 100_000_000)
    MemoryBudget(6_900_000_000, given=True).check("model needs", need, "never raised")
    with pytest.raises(MemoryShortError) as short:
        MemoryBudget(2_000_000_000, given=True).check("model needs", need, "run it on a swarm")
    assert str(short.value) == (
        "model needs 6.9 GB (weights 6.8 GB + KV 100.0 MB), --max-memory is 2.0 GB: short by 4.9 GB; run it on a swarm"
    )
    assert "free memory less headroom" in str(MemoryBudget.of(None, torch.device("cpu")))


def test_an_auto_peer_takes_what_its_budget_holds(smollm2: ModelConfig) -> None:
    per_layer = 3_540_096 * 4 + KV_RESERVE_TOKENS * 2 * 3 * 64 * 4  # fp32 weights + the KV reservation
    placed = place(PeerConfig(max_memory=7 * per_layer + per_layer // 2), smollm2, None)
    assert placed.span_layers == 7 and placed.kv_budget == 7 * KV_RESERVE_TOKENS * 2 * 3 * 64 * 4
    assert placed.device == device_label(resolve_device("auto"))
    assert place(PeerConfig(max_memory=7 * per_layer, num_layers=3), smollm2, None).span_layers == 3
    assert place(PeerConfig(max_memory=10**12), smollm2, None).span_layers == 30  # never more than the model
    # A fixed --kv-budget is paid once: the rest holds layers of weights alone.
    fixed = place(PeerConfig(max_memory=100 << 20, kv_budget=30 << 20), smollm2, None)
    assert (fixed.span_layers, fixed.kv_budget) == ((70 << 20) // (3_540_096 * 4), 30 << 20)


def test_a_peer_whose_budget_is_short(smollm2: ModelConfig) -> None:
    with pytest.raises(MemoryShortError, match=r"^one layer needs 26\.7 MB .* --max-memory is 20\.0 MB: short by 6\.7"):
        place(PeerConfig(max_memory=20_000_000), smollm2, None)
    with pytest.raises(MemoryShortError, match=r"^layers 0:10 need 267\.4 MB .* short by 67\.4 MB; take fewer layers"):
        place(PeerConfig(layers="0:10", max_memory=200_000_000), smollm2, (0, 10))
    fixed = place(PeerConfig(layers="0:10", max_memory=300_000_000), smollm2, (0, 10))
    assert (fixed.span_layers, fixed.kv_budget) == (10, 10 * KV_RESERVE_TOKENS * 2 * 3 * 64 * 4)
    assert place(PeerConfig(layers="none", max_memory=1), smollm2, None).span_layers == 0  # serves nothing


def test_records_of_older_peers_still_parse() -> None:
    new = SpanRecord("p", "m", 0, 10, throughput=3.0, device="cuda:0 (NVIDIA H200)", memory_budget=8 << 30)
    wire = new.to_wire()
    assert SpanRecord.from_wire(wire, 1.0) == new
    old = {k: v for k, v in wire.items() if k not in ("device", "memory_budget")}
    parsed = SpanRecord.from_wire(old, 1.0)
    assert parsed is not None and (parsed.device, parsed.memory_budget, parsed.throughput) == ("", 0, 3.0)
    assert SpanRecord.from_wire({**wire, "memory_budget": "lots"}, 1.0) is None
    assert SpanRecord.from_wire({**wire, "device": 7}, 1.0) is None
