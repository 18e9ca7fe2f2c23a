"""What a serving peer announces about itself: one `SpanRecord` per peer, stored under its model's key.

Kept apart from records.py (which stores and reads them through hivemind's DHT) so that whoever only shows
records, e.g. `swarmlm status --gateway`, starts without importing hivemind and torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpanRecord:
    peer_id: str
    model_id: str
    start: int
    end: int  # layers [start, end); start == end for a peer that serves no layers (gateway, bootstrap)
    model_layers: int = 0  # how many layers the whole model has (0: an older peer that does not say)
    digest: str = ""
    dtype: str = "fp32"
    throughput: float = 0.0  # tokens/s one session decodes through this span, measured at start
    device: str = ""  # what it computes on: "cpu", "cuda:0 (NVIDIA H200)"; "": an older peer that does not say
    host: str = ""  # a fingerprint of its machine (placement.host_fingerprint); "": not announced
    memory_budget: int = 0  # bytes it may use for weights and KV cache (--max-memory); 0: not announced
    free_kv_tokens: int = 0
    queue: int = 0  # sessions waiting for a step
    sessions: int = 0
    version: str = ""
    gradients: bool = True  # answers fine-tuning clients' forward and backward passes (rpc_train)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters it holds: name -> digest of its file
    api: str | None = None  # host:port of its OpenAI-compatible API, if it runs one
    state: str = "online"  # "offline" once it withdraws
    expires: float = field(default=0.0, compare=False)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "expires"}

    @classmethod
    def from_wire(cls, value: Any, expires: float) -> SpanRecord | None:
        """A record from the DHT, or None if it is malformed (a buggy or hostile peer)."""
        if not isinstance(value, dict):
            return None
        try:
            known = {f.name for f in dataclasses.fields(cls)} - {"expires"}
            record = cls(**{k: v for k, v in value.items() if k in known}, expires=expires)
            ints = ("start", "end", "model_layers", "free_kv_tokens", "queue", "memory_budget")
            types_ok = (
                all(isinstance(getattr(record, k), int) for k in ints)
                and isinstance(record.device, str)
                and isinstance(record.host, str)
                and isinstance(record.adapters, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in record.adapters.items())
            )
            if not types_ok or not 0 <= record.start <= record.end or not isinstance(record.peer_id, str):
                return None
            return record
        except TypeError:
            return None
