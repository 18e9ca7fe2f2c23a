"""`swarmlm status`: what the swarm looks like right now, from the DHT or from a gateway's /dashboard/state.

Nothing here imports hivemind (nor, through it, torch): asked through a gateway, `swarmlm status` is a
small process (0.3 s on an idle machine; 1.8-2.1 s median while 34 processes saturate two cores, see
bench/RESULTS.md "churn"), against 4 s and 16-18 s through a DHT node of its own.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from swarmlm.core.sizes import format_size
from swarmlm.swarm.routing import coverage, format_layers, peers_per_layer, uncovered_layers
from swarmlm.swarm.span_record import SpanRecord


def peer_table(records: list[SpanRecord], ttl: float) -> Table:
    table = Table(title="peers")
    columns = ("peer", "layers", "device", "memory", "tok/s", "sessions", "queue", "free KV tokens", "state")
    for col in (*columns, "last seen", "api"):
        table.add_column(col)
    now = time.time()  # hivemind's DHT time is the wall clock
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


def records_from_state(state: dict[str, Any]) -> list[SpanRecord]:
    """The records in a gateway's /dashboard/state (peers carry `last_seen` instead of an expiry)."""
    now, ttl = time.time(), float(state["ttl"])
    records = (SpanRecord.from_wire(peer, now - float(peer["last_seen"]) + ttl) for peer in state["peers"])
    return [r for r in records if r is not None]


def model_layers(records: list[SpanRecord]) -> int:
    """How many layers the model has, as its peers announce it (0: none of them says)."""
    return max((r.model_layers for r in records), default=0)


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


class GatewayStateError(Exception):
    """The gateway could not be asked: unreachable (exit code 3), or it refused us (exit code 2)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fetch_gateway_state(url: str, api_key: str | None, timeout: float = 10.0) -> dict[str, Any]:
    """GET URL/dashboard/state: the swarm as that gateway sees it (its DHT node is already warm)."""
    import http.client
    import json
    import urllib.error
    import urllib.request

    base = url.rstrip("/").removesuffix("/v1")
    if "://" not in base:
        base = f"http://{base}"
    try:
        request = urllib.request.Request(f"{base}/dashboard/state")
        if api_key:
            request.add_header("Authorization", f"Bearer {api_key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            state = json.load(response)
    except urllib.error.HTTPError as e:
        hint = " (give --api-key)" if e.code == 401 else ""
        raise GatewayStateError(f"gateway {url} answered HTTP {e.code}{hint}", 2) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise GatewayStateError(f"could not reach gateway {url}: {reason}", 3) from None
    except json.JSONDecodeError:
        raise GatewayStateError(f"{url} is not a swarmlm gateway (its /dashboard/state is not JSON)", 2) from None
    except (ValueError, http.client.InvalidURL) as e:  # no host, a port that is no number
        raise GatewayStateError(f"--gateway {url!r} is not a URL ({e})", 2) from None
    except http.client.HTTPException:  # it answered, but not in HTTP (a libp2p port, say)
        raise GatewayStateError(f"{url} does not speak HTTP: is it a gateway's --api address?", 2) from None
    if not isinstance(state, dict) or not {"model", "num_layers", "ttl", "peers"} <= state.keys():
        raise GatewayStateError(f"{url} is not a swarmlm gateway (unexpected /dashboard/state)", 2)
    return state


def print_gateway_state(state: dict[str, Any]) -> int:
    """`print_status` for what a gateway said."""
    return print_status(records_from_state(state), str(state["model"]), int(state["num_layers"]), float(state["ttl"]))
