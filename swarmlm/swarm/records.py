"""What a serving peer announces in the DHT, and how anyone reads the swarm's current state.

Every peer stores one record under its model's key (subkey: its peer id) and refreshes it every
`ttl / 3` seconds. A peer that stops refreshing disappears from every view when its record expires.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarmlm.core.dht import DHT_TIMEOUT
from swarmlm.core.keys import model_key
from swarmlm.swarm.peer_config import DEFAULT_TTL

log = logging.getLogger(__name__)


@dataclass
class SpanRecord:
    peer_id: str
    model_id: str
    start: int
    end: int  # layers [start, end); start == end for a peer that serves no layers (gateway, bootstrap)
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
            ints = ("start", "end", "free_kv_tokens", "queue", "memory_budget")
            types_ok = (
                all(isinstance(getattr(record, k), int) for k in ints)
                and isinstance(record.device, str)
                and isinstance(record.host, str)
            )
            if not types_ok or not 0 <= record.start <= record.end or not isinstance(record.peer_id, str):
                return None
            return record
        except TypeError:
            return None


def _store(dht: DHT, record: SpanRecord, expires: float) -> bool:
    future = dht.store(model_key(record.model_id), record.to_wire(), expires, subkey=record.peer_id, return_future=True)
    return bool(future.result(timeout=DHT_TIMEOUT))


def announce(dht: DHT, record: SpanRecord, ttl: float = DEFAULT_TTL) -> bool:
    record.expires = get_dht_time() + ttl  # remembered so that `withdraw` can supersede this entry
    return _store(dht, record, record.expires)


def withdraw(dht: DHT, record: SpanRecord) -> None:
    """Replace our record with an "offline" one (DHT entries cannot be deleted). The DHT keeps whichever
    entry expires last, so the offline one must expire after the last one we announced."""
    _store(dht, dataclasses.replace(record, state="offline"), max(get_dht_time() + 5.0, record.expires + 1.0))


def fetch_records(dht: DHT, model_id: str, online_only: bool = True) -> list[SpanRecord]:
    """Every unexpired record of the model's swarm, sorted by span."""
    found = dht.get(model_key(model_id), latest=True, return_future=True).result(timeout=DHT_TIMEOUT)
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    records = []
    for entry in found.value.values():
        record = SpanRecord.from_wire(entry.value, entry.expiration_time)
        if record is None or record.expires < now or (online_only and record.state != "online"):
            continue
        records.append(record)
    return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))
