"""`swarmlm status`: what the swarm looks like from the DHT right now."""

from __future__ import annotations

import time

from hivemind.utils import get_dht_time
from rich.console import Console
from rich.table import Table

from swarmlm.core.sizes import format_size
from swarmlm.swarm.records import SpanRecord
from swarmlm.swarm.routing import coverage, format_layers, peers_per_layer, uncovered_layers


def peer_table(records: list[SpanRecord], ttl: float) -> Table:
    table = Table(title="peers")
    columns = ("peer", "layers", "device", "memory", "tok/s", "sessions", "queue", "free KV tokens", "state")
    for col in (*columns, "last seen", "api"):
        table.add_column(col)
    now = get_dht_time()
    for r in records:
        seen = now - (r.expires - ttl)  # a record is stored with expiry = refresh time + ttl
        table.add_row(
            r.peer_id[:16] + "…",
            f"{r.start}:{r.end}" if r.num_layers else "none",
            r.device or "-",
            format_size(r.memory_budget) if r.memory_budget else "-",
            f"{r.throughput:.1f}",
            str(r.sessions),
            str(r.queue),
            str(r.free_kv_tokens),
            r.state,
            f"{max(0.0, seen):.0f}s ago",
            r.api or "-",
        )
    return table


def coverage_line(records: list[SpanRecord], num_layers: int) -> str:
    """One character per layer: the number of live peers serving it (0-9, + for more)."""
    return "".join(str(c) if c < 10 else "+" for c in peers_per_layer(records, num_layers))


def print_status(records: list[SpanRecord], model_id: str, num_layers: int, ttl: float) -> int:
    """Print the peers and per-layer coverage; return the exit code (1 when some layer has no live peer)."""
    console = Console()
    online = [r for r in records if r.state == "online"]
    console.print(peer_table(records, ttl))
    per_layer = coverage(online, num_layers)
    console.print(f"{model_id}: {len(online)} live peers; peers per layer (layers 0:{num_layers}):")
    console.print("  " + coverage_line(online, num_layers))
    console.print(f"  slowest layer serves {min(per_layer):.1f} tok/s in total ({time.strftime('%H:%M:%S')})")
    missing = uncovered_layers(online, 0, num_layers)
    if missing:
        console.print(f"[red]layers without a live peer: {format_layers(missing)}[/red]")
        return 1
    return 0
