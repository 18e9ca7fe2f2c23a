"""Storing peers' records in the DHT, and how anyone reads the swarm's current state.

Every peer stores one record under its model's key (subkey: its peer id) and refreshes it every
`ttl / 3` seconds. A peer that stops refreshing disappears from every view when its record expires.
"""

from __future__ import annotations

import dataclasses

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarmlm.core.dht import DHT_TIMEOUT
from swarmlm.core.keys import model_key
from swarmlm.swarm.peer_config import DEFAULT_TTL
from swarmlm.swarm.span_record import SpanRecord


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
