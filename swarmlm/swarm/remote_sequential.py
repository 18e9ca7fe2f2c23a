"""`RemoteSequential`: layers of a swarm's model as a PyTorch module that backpropagates through the peers.

Its forward pass sends the hidden states through a chain of peers (one stateless `rpc_train` call per hop,
grad_messages.py) and remembers what went into each hop; its backward pass walks the chain in reverse,
sending each hop its input again with the gradient of its output, and gets back the gradient of its
input and of the LoRA adapters of its layers. The weights on the peers stay frozen: whatever trains is
the client's (the adapters are passed in with each call, so an ordinary optimizer steps them).

A hop that fails (killed, timed out, refused) is banned for a while and the pass goes on through another
route from the layer where it failed: in the forward pass from that boundary on; in the backward pass the
failed hop's layers are run forward again through new peers (to get the inputs of their layers) and then
backward. No peer keeps anything between calls, so a retried step computes the same numbers: with fp32
on the wire a step during which a peer dies gives the loss and gradients of one without failures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from swarmlm.core.stream_call import request_reply
from swarmlm.swarm.grad_messages import GradReply, GradRequest
from swarmlm.swarm.routing import NoRouteError, RouteHop
from swarmlm.swarm.sequence_manager import RemoteSequenceManager
from swarmlm.swarm.servicer import TRAIN_HANDLER

log = logging.getLogger("swarmlm.client")
RETRY_PAUSE = 0.5  # between routes after a failure: records refresh every few seconds


@dataclass
class _Hop:
    route: RouteHop
    hidden: Tensor  # what went into it


class _Retries:
    """The failures of one pass: it gives up once failures have gone on for the manager's route_timeout."""

    def __init__(self, manager: RemoteSequenceManager) -> None:
        self.manager = manager
        self.first: float | None = None  # when the failures began

    def failed(self, hop: RouteHop, error: BaseException) -> None:
        now = time.monotonic()
        self.first = self.first or now
        where = f"peer {hop.record.peer_id[:12]}… (layers {hop.start}:{hop.end})"
        if now - self.first > self.manager.config.route_timeout:
            raise NoRouteError(f"no peer completed layers {hop.start}:{hop.end}; last: {where}: {error}") from error
        log.warning("training pass failed at %s, rerouting: %s", where, error)
        self.manager.ban(hop.record.peer_id)

    def recovered(self) -> None:
        if self.first is not None:
            self.manager.stats.recovered(time.monotonic() - self.first)
            self.first = None


class RemoteSequential(nn.Module):
    """Layers [start, end) of the model `manager` routes, as a module: `forward(hidden [B, L, hidden],
    adapters)` with the rows at positions 0..L-1 (causal, no cache)."""

    def __init__(self, manager: RemoteSequenceManager, start: int = 0, end: int | None = None) -> None:
        super().__init__()
        self.manager = manager
        self.start, self.end = start, manager.num_layers if end is None else end
        self.last_peers: list[str] = []  # the peer of each hop of the latest forward pass

    def forward(self, hidden: Tensor, adapters: dict[str, Tensor] | None = None, lora_scale: float = 1.0) -> Tensor:
        adapters = adapters or {}
        names = tuple(adapters)
        return _RemoteSpan.apply(self, names, lora_scale, hidden, *adapters.values())

    # ----- passes: any thread; the calls run on the manager's loop ------------------------------------
    def run_forward(
        self, hidden: Tensor, adapters: dict[str, Tensor], scale: float, start: int, end: int
    ) -> tuple[Tensor, list[_Hop]]:
        """`hidden` through layers [start, end), rerouting around failures; the output and each hop's input."""
        hops: list[_Hop] = []
        retries = _Retries(self.manager)
        layer, x = start, hidden
        while layer < end:
            for route in self._route(layer, end, retries):
                try:
                    reply = self._call(route, x, adapters, scale)
                except Exception as e:  # a dead, hung or refusing peer: route again from this boundary
                    retries.failed(route, e)
                    break
                assert reply.output is not None
                hops.append(_Hop(route, x))
                x, layer = reply.output.float(), route.end
        retries.recovered()
        return x, hops

    def run_backward(
        self, hops: list[_Hop], grad: Tensor, adapters: dict[str, Tensor], scale: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Gradients with respect to the input of `hops[0]` and to the adapters, from `grad` at the output."""
        grads: dict[str, Tensor] = {}
        retries = _Retries(self.manager)
        for hop in reversed(hops):
            grad = self._backward_hop(hop, grad, adapters, scale, grads, retries)
        retries.recovered()
        return grad, grads

    def _backward_hop(
        self,
        hop: _Hop,
        grad: Tensor,
        adapters: dict[str, Tensor],
        scale: float,
        grads: dict[str, Tensor],
        retries: _Retries,
    ) -> Tensor:
        try:
            reply = self._call(hop.route, hop.hidden, adapters, scale, grad)
        except Exception as e:  # run these layers forward through other peers, then backward through them
            retries.failed(hop.route, e)
            time.sleep(RETRY_PAUSE)
            _, sub_hops = self.run_forward(hop.hidden, adapters, scale, hop.route.start, hop.route.end)
            for sub in reversed(sub_hops):
                grad = self._backward_hop(sub, grad, adapters, scale, grads, retries)
            return grad
        assert reply.grad_input is not None
        grads.update(reply.grad_adapters)
        return reply.grad_input.float()

    def _route(self, start: int, end: int, retries: _Retries) -> list[RouteHop]:
        while True:
            try:
                return self.manager.make_route(start, end, training=True)
            except NoRouteError as e:
                if retries.first is None:
                    raise
                if time.monotonic() - retries.first > self.manager.config.route_timeout:
                    raise NoRouteError(f"{e} (gave up after {self.manager.config.route_timeout:.0f} s)") from e
                time.sleep(RETRY_PAUSE)

    def _call(
        self, route: RouteHop, hidden: Tensor, adapters: dict[str, Tensor], scale: float, grad: Tensor | None = None
    ) -> GradReply:
        wire = self.manager.wire_dtype
        ours = {n: t for n, t in adapters.items() if route.start <= _layer(n) < route.end}
        request = GradRequest(
            route.record.model_id,
            route.start,
            route.end,
            hidden.to(wire),
            None if grad is None else grad.to(wire),
            ours,
            scale,
        )
        timeout = self.manager.config.step_timeout
        return self.manager.run(self.send(route.record.peer_id, request), timeout + 5)

    async def send(self, peer_id: str, request: GradRequest) -> GradReply:
        """One request to one peer, on the manager's loop (no retries); RemoteError if it refused."""
        reader, writer = await self.manager.open_stream(peer_id, TRAIN_HANDLER)
        return GradReply.from_proto(await request_reply(reader, writer, request.to_proto()), request.backward)


def _layer(name: str) -> int:
    """The layer of an adapter tensor named like layers.3.self_attn.qkv_proj.lora_A."""
    return int(name.split(".", 2)[1])


class _RemoteSpan(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, module: RemoteSequential, names: tuple[str, ...], scale: float, hidden: Tensor, *adapters: Tensor
    ) -> Tensor:
        values = dict(zip(names, (a.detach() for a in adapters), strict=True))
        out, hops = module.run_forward(hidden.detach().float(), values, scale, module.start, module.end)
        ctx.module, ctx.names, ctx.scale, ctx.hops, ctx.adapters = module, names, scale, hops, values
        module.last_peers = [hop.route.record.peer_id for hop in hops]
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_in, grads = ctx.module.run_backward(ctx.hops, grad_output.float(), ctx.adapters, ctx.scale)
        adapter_grads = [grads.get(n) for n in ctx.names]
        return (None, None, None, grad_in.to(grad_output.dtype), *adapter_grads)
