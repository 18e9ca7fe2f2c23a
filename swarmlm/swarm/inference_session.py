"""`InferenceSession`: one generation's chain of hops through the swarm, surviving peer failures.

The session's hops (one P2P stream each, span_stream.py) cover every layer. The session remembers what
it sent into each boundary of the chain. When a hop fails (killed, timed out, or answered an error), it
bans that peer for a while, routes a new chain from that boundary to the end, replays the remembered
inputs through it to rebuild the peers' KV caches, and carries on with the step that failed: the text is
the same as without the failure. Routes, bans, deadlines and spot-check verdicts come from the
`RemoteSequenceManager` it is handed.
"""

from __future__ import annotations

import logging
import random
import time
import uuid

import torch
from torch import Tensor

from swarmlm.swarm.records import SpanRecord
from swarmlm.swarm.routing import NoRouteError
from swarmlm.swarm.sequence_manager import RemoteSequenceManager
from swarmlm.swarm.span_stream import HopFailure, SpanStream

log = logging.getLogger("swarmlm.client")


class InferenceSession:
    """One generation's chain of hops; `step()` runs new tokens' hidden states through every layer."""

    def __init__(self, manager: RemoteSequenceManager, max_length: int) -> None:
        self.manager = manager
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.num_layers = manager.num_layers
        self.hops: list[SpanStream] = []
        self.position = 0  # tokens already processed by every hop
        self._inputs: dict[int, Tensor] = {}  # boundary layer -> inputs sent into it for positions < position
        manager.opened(self)

    def peers(self) -> list[str]:
        """The peer of each hop of the current chain."""
        return [hop.record.peer_id for hop in list(self.hops)]

    def step(self, hidden: Tensor) -> Tensor:
        """hidden: [n, hidden_size] at positions position..position+n. Returns the last layer's output."""
        if self.position + hidden.shape[0] > self.max_length:
            raise ValueError(f"the session holds {self.max_length} tokens")
        config = self.manager.config
        current = {0: hidden}  # this step's input at each boundary
        layer, i = 0, 0
        failed_at: float | None = None
        while layer < self.num_layers:
            if i == len(self.hops):
                self._route_from(layer)
            timeout = config.step_timeout * (len(self.hops) - i) + 5
            for out in self.manager.run(self._through(i, current[layer]), timeout):
                hop = self.hops[i]
                if isinstance(out, HopFailure):
                    log.warning("hop failed, rerouting: %s", out)
                    failed_at = failed_at or time.monotonic()
                    if time.monotonic() - failed_at > config.route_timeout:  # peers that keep refusing
                        raise NoRouteError(f"no peer completed layers {hop.start}-{hop.end - 1}: {out}")
                    self.manager.ban(hop.record.peer_id)
                    self._drop_hops(i)
                    break
                layer = hop.end
                current[layer] = out
                i += 1
            if layer == self.num_layers and (caught := self._spot_check(current)) is not None:
                layer, i = self.hops[caught].start, caught  # redo this step from the liar's layers on
                self._drop_hops(caught)
                current = {b: t for b, t in current.items() if b <= layer}
        if failed_at is not None:
            self.manager.stats.recovered(time.monotonic() - failed_at)
        for boundary, tensor in current.items():
            if boundary < self.num_layers:
                past = self._inputs.get(boundary)
                self._inputs[boundary] = tensor if past is None else torch.cat([past, tensor])
        self.position += hidden.shape[0]
        return current[self.num_layers]

    def _spot_check(self, current: dict[int, Tensor]) -> int | None:
        """Re-run some of this step's hops on other peers (`ClientConfig.spot_check`); the index of a hop
        whose peer was caught lying (its output must be recomputed), or None."""
        share = self.manager.config.spot_check
        if share <= 0:
            return None
        records: list[SpanRecord] | None = None  # looked up once per step, and only when a hop is drawn
        for i, hop in enumerate(self.hops):
            if random.random() >= share:
                continue
            records = records if records is not None else self.manager.routable_records()
            past = self._inputs.get(hop.start)
            inputs = current[hop.start] if past is None else torch.cat([past, current[hop.start]])
            if self.manager.spot_check(hop, inputs, current[hop.end], records) == hop.record.peer_id:
                return i
        return None

    async def _through(self, i: int, hidden: Tensor) -> list[Tensor | HopFailure]:
        """Run `hidden` through hops i.. in one visit to the loop thread (one thread hand-off per token, not
        one per hop): each hop's output, up to the first failure, which comes last."""
        outs: list[Tensor | HopFailure] = []
        for hop in self.hops[i:]:
            try:
                hidden = await hop.call(hidden, self.position)
            except HopFailure as e:
                outs.append(e)
                break
            outs.append(hidden)
        return outs

    def _drop_hops(self, i: int) -> None:
        """Close hops i.. and forget what was sent past the failed hop's start (the new chain's boundaries
        may differ; replay recomputes them)."""
        start = self.hops[i].start
        for hop in self.hops[i:]:
            hop.close()
        del self.hops[i:]
        self._inputs = {b: t for b, t in self._inputs.items() if b <= start}

    def _route_from(self, layer: int) -> None:
        """Append a chain covering layer..end, replaying the session's history through each new hop."""
        route_timeout = self.manager.config.route_timeout
        deadline = time.monotonic() + route_timeout
        first_new = len(self.hops)
        while True:
            try:
                for route in self.manager.make_route(layer):
                    hop = SpanStream(self.manager, route, self.session_id, self.max_length)
                    self.hops.append(hop)
                    if self.position > 0:
                        past = self._inputs[hop.start]  # every boundary's history is kept (see step)
                        out = hop.step(past, 0)  # replay: rebuilds this peer's KV for the session so far
                        if hop.end < self.num_layers:
                            self._inputs[hop.end] = out
                return
            except (NoRouteError, HopFailure) as e:
                if isinstance(e, HopFailure):
                    self.manager.ban(self.hops[-1].record.peer_id)
                for hop in self.hops[first_new:]:
                    hop.close()
                del self.hops[first_new:]
                if time.monotonic() > deadline:
                    raise NoRouteError(f"{e} (gave up after {route_timeout:.0f} s)") from e
                time.sleep(0.5)  # records refresh every few seconds; a new peer may be joining

    def close(self) -> None:
        for hop in self.hops:
            hop.close()
        self.hops.clear()
        self.manager.closed(self)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
