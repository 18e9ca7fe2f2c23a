"""`InferenceSession`: a chain of hops through the swarm for one or more sequences, surviving failures.

The session's hops (one P2P stream each, span_stream.py) cover every layer. Its *rows* are the sequences
it carries: one for a `RemoteModel` generation, a micro-batch of them for a gateway. A step sends every
row's new tokens to the first hop in one message; each peer pushes its output to the next and answers
the session too (messages.py), so the session knows what went into each boundary of the chain.

When a hop fails (killed, timed out, answered an error, or never got its push), the session bans that
peer for a while, routes a new chain from that boundary to the end, replays the remembered inputs
through it to rebuild the peers' KV caches, and carries on with the step that failed: the text is the
same as without the failure. Routes, bans, deadlines and spot-check verdicts come from the
`RemoteSequenceManager` it is handed. One step runs at a time per session.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from dataclasses import dataclass

import torch
from torch import Tensor

from swarmlm.swarm.messages import NextHop, Row, StepRequest
from swarmlm.swarm.routing import NoRouteError
from swarmlm.swarm.sequence_manager import RemoteSequenceManager
from swarmlm.swarm.span_record import SpanRecord
from swarmlm.swarm.span_stream import HopFailure, SpanStream

log = logging.getLogger("swarmlm.client")


@dataclass
class _RowState:
    position: int  # tokens of this row already through every hop
    max_length: int
    adapter: str | None = None  # its LoRA adapter: every hop of the chain must hold it


class InferenceSession:
    """A chain of hops for some rows; `step()` runs their new tokens' hidden states through every layer."""

    def __init__(
        self, manager: RemoteSequenceManager, max_length: int | None = None, adapter: str | None = None
    ) -> None:
        """With `max_length`, the session carries one row ("0", with LoRA adapter `adapter`) and `step`
        takes and gives plain tensors; without, rows come and go with `add` and `remove`, and `step_rows`
        runs them."""
        self.manager = manager
        self.session_id = uuid.uuid4().hex
        self.num_layers = manager.num_layers
        self.hops: list[SpanStream] = []
        self.rows: dict[str, _RowState] = {}
        self._inputs: dict[int, dict[str, Tensor]] = {}  # boundary -> row -> inputs sent into it so far
        self._closed: list[str] = []  # rows removed since the last step: the hops free them with the next one
        self._step_ids = itertools.count(1)
        manager.opened(self)
        if max_length is not None:
            self.add("0", max_length, adapter)

    def add(self, key: str, max_length: int, adapter: str | None = None) -> None:
        """A new row (with the LoRA adapter named `adapter`); the chain is rerouted from the first hop
        that lacks that adapter (the rows so far are replayed into the new hops)."""
        self.rows[key] = _RowState(0, max_length, adapter)
        lacking = [i for i, hop in enumerate(self.hops) if adapter is not None and adapter not in hop.record.adapters]
        if lacking:
            self._drop_hops(lacking[0])

    def remove(self, key: str) -> None:
        """Forget a row; a session left without rows gives up its chain (the next row routes afresh)."""
        if self.rows.pop(key, None) is not None:
            for history in self._inputs.values():
                history.pop(key, None)
            self._closed.append(key)
        if not self.rows and self.hops:
            self._drop_hops(0)
            self._inputs, self._closed = {}, []

    def peers(self) -> list[str]:
        """The peer of each hop of the current chain."""
        return [hop.record.peer_id for hop in list(self.hops)]

    def step(self, hidden: Tensor) -> Tensor:
        """The single row's hidden states [n, hidden_size] at its next n positions; the last layer's output."""
        return self.step_rows({"0": hidden})["0"]

    def step_rows(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each row's next hidden states [n, hidden_size] through every layer, all in one message per hop."""
        rows = []
        for key, hidden in inputs.items():
            state = self.rows[key]
            if state.position + hidden.shape[0] > state.max_length:
                raise ValueError(f"row {key} holds {state.max_length} tokens")
            rows.append(Row(key, state.position, hidden.shape[0], state.max_length, state.adapter))
        config = self.manager.config
        current = {0: torch.cat(list(inputs.values()))}  # this step's input at each boundary
        layer, i = 0, 0
        failed_at: float | None = None
        while layer < self.num_layers:
            if i == len(self.hops):
                self._route_from(layer)
            timeout = config.step_timeout * (len(self.hops) - i + 1) + 5
            for out in self.manager.run(self._through(i, current[layer], rows), timeout):
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
            if layer == self.num_layers and (caught := self._spot_check(current, rows)) is not None:
                layer, i = self.hops[caught].start, caught  # redo this step from the liar's layers on
                self._drop_hops(caught)
                current = {b: t for b, t in current.items() if b <= layer}
        if failed_at is not None:
            self.manager.stats.recovered(time.monotonic() - failed_at)
        for boundary, tensor in current.items():
            if boundary < self.num_layers:
                history = self._inputs.setdefault(boundary, {})
                for row, part in zip(rows, _split(tensor, rows), strict=True):
                    past = history.get(row.key)
                    history[row.key] = part if past is None else torch.cat([past, part])
        for row in rows:
            self.rows[row.key].position += row.length
        return {row.key: part for row, part in zip(rows, _split(current[self.num_layers], rows), strict=True)}

    def _spot_check(self, current: dict[int, Tensor], rows: list[Row]) -> int | None:
        """Re-run some of this step's hops on other peers (`ClientConfig.spot_check`), for one row each; the
        index of a hop whose peer was caught lying (its output must be recomputed), or None."""
        share = self.manager.config.spot_check
        if share <= 0:
            return None
        records: list[SpanRecord] | None = None  # looked up once per step, and only when a hop is drawn
        for i, hop in enumerate(self.hops):
            if random.random() >= share:
                continue
            records = records if records is not None else self.manager.routable_records()
            r = random.randrange(len(rows))
            row = rows[r]
            past = self._inputs.get(hop.start, {}).get(row.key)
            new = _split(current[hop.start], rows)[r]
            inputs = new if past is None else torch.cat([past, new])
            output = _split(current[hop.end], rows)[r]
            adapter = self.rows[row.key].adapter
            if self.manager.spot_check(hop, inputs, output, records, adapter) == hop.record.peer_id:
                return i
        return None

    async def _through(self, i: int, hidden: Tensor, rows: list[Row]) -> list[Tensor | HopFailure]:
        """Run `hidden` through hops i.. (one visit to the loop thread per step): the step goes to hop i,
        which pushes it on; each hop's output, up to the first failure, which comes last."""
        hops = self.hops[i:]
        step_id = next(self._step_ids)
        futures = [hop.expect(step_id) for hop in hops]
        closed, self._closed = self._closed, []
        forward = [NextHop(hop.record.peer_id, hop.start) for hop in hops[1:]]
        outs: list[Tensor | HopFailure] = []
        try:
            await hops[0].send(StepRequest(hidden, rows, step_id, forward=forward, closed=closed))
        except HopFailure as e:
            return [e]
        for hop, future in zip(hops, futures, strict=True):
            try:
                outs.append(await hop.reply(future))
            except HopFailure as e:
                outs.append(e)
                break
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
                adapters = {row.adapter for row in self.rows.values() if row.adapter is not None}
                for route in self.manager.make_route(layer, adapters=adapters):
                    hop = SpanStream(self.manager, route, self.session_id)
                    if self.hops:
                        self.hops[-1].on_push_error = hop.fail_step
                    self.hops.append(hop)
                    self.manager.run(self._open(hop), self.manager.config.step_timeout * 2 + 5)
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

    async def _open(self, hop: SpanStream) -> None:
        """Open a new hop's stream; with history, replay it (every boundary's history is kept, see
        step_rows) to rebuild this peer's KV for the session so far."""
        history = self._inputs.get(hop.start, {})
        rows = [
            Row(k, 0, h.shape[0], self.rows[k].max_length, self.rows[k].adapter)
            for k, h in history.items()
            if k in self.rows
        ]
        if not rows:
            await hop.open()
            return
        out = await hop.call(StepRequest(torch.cat([history[r.key] for r in rows]), rows, next(self._step_ids)))
        if hop.end < self.num_layers:
            self._inputs[hop.end] = {r.key: part for r, part in zip(rows, _split(out, rows), strict=True)}

    def close(self) -> None:
        for hop in self.hops:
            hop.close()
        self.hops.clear()
        self.manager.closed(self)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split(tensor: Tensor, rows: list[Row]) -> tuple[Tensor, ...]:
    return tensor.split([r.length for r in rows])
