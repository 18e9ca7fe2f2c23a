"""Choosing spans: which layers a joining peer serves, and which chain of peers a client uses."""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from swarmlm.swarm.span_record import SpanRecord

HOP_SECONDS = 0.003  # assumed cost of one network hop before any is measured (loopback: ~1 ms)


class NoRouteError(RuntimeError):
    """No chain of live peers covers the layers; the message names the uncovered ones."""


def coverage(records: Iterable[SpanRecord], num_layers: int) -> list[float]:
    """Announced throughput per layer (sum over the peers serving it)."""
    per_layer = [0.0] * num_layers
    for r in records:
        for layer in range(r.start, min(r.end, num_layers)):
            per_layer[layer] += max(r.throughput, 1e-6)
    return per_layer


def choose_span(records: Iterable[SpanRecord], num_layers: int, span_layers: int) -> tuple[int, int]:
    """Petals' rule: the window of `span_layers` consecutive layers with the lowest total throughput
    (ties: the lowest start, which keeps equally sized spans aligned so chains connect)."""
    span_layers = max(1, min(span_layers, num_layers))
    per_layer = coverage(records, num_layers)
    # Weakest layer first, then the window's total: a hole anywhere is filled before adding capacity.
    best = min(
        range(num_layers - span_layers + 1),
        key=lambda s: (min(per_layer[s : s + span_layers]), sum(per_layer[s : s + span_layers]), s),
    )
    return best, best + span_layers


MOVE_MARGIN = 1.33  # move only if the weakest layer's throughput grows by a third (Petals: quality < 0.75)


def better_span(
    records: Iterable[SpanRecord], me: SpanRecord, num_layers: int, span_layers: int
) -> tuple[int, int] | None:
    """The span `me` should move to, or None: moving must raise the swarm's weakest layer clearly."""
    others = [r for r in records if r.peer_id != me.peer_id]
    target = choose_span(others, num_layers, span_layers)
    if target == (me.start, me.end):
        return None
    now = min(coverage([*others, me], num_layers))
    moved = dataclasses.replace(me, start=target[0], end=target[1])
    after = min(coverage([*others, moved], num_layers))
    return target if after > now * MOVE_MARGIN else None


def peers_per_layer(records: Iterable[SpanRecord], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for r in records:
        for layer in range(r.start, min(r.end, num_layers)):
            counts[layer] += 1
    return counts


def uncovered_layers(records: Iterable[SpanRecord], start: int, end: int) -> list[int]:
    covered = set()
    for r in records:
        covered.update(range(max(r.start, start), min(r.end, end)))
    return [layer for layer in range(start, end) if layer not in covered]


def holding_adapter(records: Iterable[SpanRecord], name: str) -> list[SpanRecord]:
    """The records of peers holding LoRA adapter `name`, as the same file as most of its holders: two files
    under one name are never mixed in one route."""
    holders = [r for r in records if name in r.adapters]
    if not holders:
        return []
    common, _ = Counter(r.adapters[name] for r in holders).most_common(1)[0]
    return [r for r in holders if r.adapters[name] == common]


@dataclass(frozen=True)
class RouteHop:
    """Layers [start, end) of a chain, computed by `record`'s peer (a part of its span, or all of it)."""

    record: SpanRecord
    start: int
    end: int


def find_route(
    records: Iterable[SpanRecord],
    start: int,
    end: int,
    banned: set[str] = frozenset(),  # type: ignore[assignment]
    rtt: dict[str, float] | None = None,
) -> list[RouteHop]:
    """The fastest chain from layer `start` to `end`: a shortest path over layer boundaries. A hop may use
    any part of a peer's span, switching peers where another span begins (spans need not line up); it
    costs its round trip (measured, else HOP_SECONDS) plus its share of the peer's time per token,
    inflated by the sessions already waiting there."""
    usable = [r for r in records if r.peer_id not in banned and r.num_layers > 0 and r.state == "online"]
    rtt = rtt or {}
    cuts = {start, end} | {r.start for r in usable} | {r.end for r in usable}
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, RouteHop] = {}
    heap = [(0.0, start)]
    while heap:
        cost, at = heapq.heappop(heap)
        if at == end:
            break
        if cost > best.get(at, float("inf")):
            continue
        for r in usable:
            if not r.start <= at < r.end:
                continue
            per_layer = (1 + r.queue) / max(r.throughput, 1e-3) / r.num_layers
            for stop in sorted(c for c in cuts if at < c <= min(r.end, end)):
                total = cost + rtt.get(r.peer_id, HOP_SECONDS) + (stop - at) * per_layer
                if total < best.get(stop, float("inf")):
                    best[stop] = total
                    came_from[stop] = RouteHop(r, at, stop)
                    heapq.heappush(heap, (total, stop))
    if end not in came_from and start != end:
        missing = uncovered_layers(usable, start, end)
        raise NoRouteError(f"no route through layers {start}:{end}: layers {format_layers(missing)} have no live peer")
    chain: list[RouteHop] = []
    at = end
    while at != start:
        hop = came_from[at]
        chain.append(hop)
        at = hop.start
    return chain[::-1]


def format_layers(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3:6, 9': runs as START:END with END excluded, like --layers."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer:
            runs[-1][1] = layer + 1
        else:
            runs.append([layer, layer + 1])
    return ", ".join(f"{a}:{b}" if b - a > 1 else str(a) for a, b in runs)
