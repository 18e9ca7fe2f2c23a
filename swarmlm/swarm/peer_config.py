"""The settings of `swarmlm peer`, apart from peer.py (which imports PyTorch and hivemind): the command
line reads them to build its options, and `swarmlm -h` must stay quick."""

from __future__ import annotations

from dataclasses import dataclass

from swarmlm.core.network_config import NetworkConfig
from swarmlm.core.settings import ADAPTERS_HELP, internal, setting, size_setting
from swarmlm.core.sizes import KV_RESERVE_TOKENS, MAX_MEMORY_HELP

DEFAULT_TTL = 15.0  # seconds a peer's DHT record lives unless refreshed (every ttl / 3)


@dataclass
class PeerConfig(NetworkConfig):
    model: str | None = setting(None, help="A .gguf file or HF model directory (default: embedded SmolLM2)")
    layers: str = setting(
        "auto",
        help="auto (as many layers as --max-memory holds, where least served), START:END (END excluded), or none",
    )
    num_layers: int | None = setting(None, help="At most this many layers for --layers auto (default: all that fit)")
    max_memory: int | None = size_setting(help=MAX_MEMORY_HELP)
    dtype: str = setting("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    device: str = setting("auto", help="auto, cpu or cuda (cuda:N): where the span runs")
    quant: str = setting("none", help="Weight-only quantization on CPU: none, int8 or int4")
    adapters: list[str] = setting(
        help=ADAPTERS_HELP + "; this peer holds their tensors for its layers", factory=list, metavar="NAME=PATH"
    )
    kv_budget: int | None = size_setting(
        help=f"KV cache budget, e.g. 1GiB, taken out of --max-memory (default: {KV_RESERVE_TOKENS} tokens through "
        "each served layer)"
    )
    scheduler: str = setting("mlfq", help="mlfq or fcfs: the order sessions' steps run in", choices=("mlfq", "fcfs"))
    ttl: float = internal(DEFAULT_TTL, why="the record lifetime every peer and client of a swarm assumes")
    rebalance_period: float = setting(
        60.0, help="With --layers auto: seconds between checks whether another span needs us more (0: never move)"
    )
    threads: int | None = setting(
        None, help="CPU threads for compute (default: all cores; 1 when peers share a machine)"
    )
    ledger: str | None = setting(None, help="This peer's copy of the ledger (default: ~/.swarmlm/ledger/PEER_ID.jsonl)")
    no_gradients: bool = setting(
        False, help="Refuse fine-tuning clients' forward and backward passes through our layers (inference only)"
    )
    perturb_outputs: float = setting(
        0.0, help="Fault injection for attack tests: add noise of this relative size to outputs"
    )


def parse_layers(layers: str, total: int) -> tuple[int, int] | None:
    """'a:b' -> (a, b), END excluded; 'none' -> None. Raises ValueError with a message for the user."""
    if layers == "none":
        return None
    try:
        a, b = (int(x) for x in layers.split(":"))
    except ValueError:
        raise ValueError(f"--layers must be auto, none or START:END (e.g. 0:{total}), not {layers!r}") from None
    model = f"the model has layers 0:{total} ({total} layers)"
    if a >= b:
        raise ValueError(f"--layers {layers}: START must be below END; {model}")
    if a < 0 or b > total:
        raise ValueError(f"--layers {layers}: outside the model; {model}")
    return a, b
