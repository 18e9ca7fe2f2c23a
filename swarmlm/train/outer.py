"""DiLoCo's outer optimizer: the global weights (what every round starts from, what the peers of a run
hold in common) and the outer Nesterov SGD that moves them with the averaged pseudo-gradient. Its
momentum travels to a newcomer with the weights.

Both live in shared memory from the start: a newcomer's download is streamed by the averager's process,
which is handed them by reference (hivemind pickles a tensor not yet shared into shared memory: with a
snapshot's clone, that was two copies of each while a download was served).
"""

from __future__ import annotations

import torch
from torch import Tensor

from swarmlm.train.checkpointer import flatten_optimizer, restore_optimizer


def copy_into(targets: list[Tensor], sources: list[Tensor]) -> None:
    """targets[i] = sources[i], in place (local = global after an outer step, or the reverse)."""
    with torch.no_grad():
        for t, s in zip(targets, sources, strict=True):
            t.copy_(s)


class OuterOptimizer:
    """The swarm's agreed weights and DiLoCo's outer Nesterov SGD over them (lr 0.7, momentum 0.9 by
    default): every member of a group applies the same step to the same weights with the same average."""

    def __init__(self, local: list[torch.nn.Parameter], lr: float, momentum: float) -> None:
        self.params = [p.detach().clone().share_memory_().requires_grad_(True) for p in local]
        self.sgd = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self._share_momentum()

    def _share_momentum(self) -> None:
        """Every momentum buffer in shared memory, made up front as zeros (SGD's first step then leaves
        it equal to the gradient, bit for bit what its own first step's clone holds); none without momentum."""
        if not self.sgd.defaults["momentum"]:
            return
        for g in self.params:
            state = self.sgd.state[g]
            buf = state.get("momentum_buffer")
            state["momentum_buffer"] = torch.zeros_like(g).share_memory_() if buf is None else buf.share_memory_()

    def pseudo_gradient(self, local: list[torch.nn.Parameter], out: list[Tensor]) -> None:
        """out = global - local: how far this round's inner steps moved the weights, as a gradient."""
        with torch.no_grad():
            for g, p, o in zip(self.params, local, out, strict=True):
                torch.sub(g.detach(), p.detach(), out=o)

    def step(self, averaged: list[Tensor]) -> None:
        for g, a in zip(self.params, averaged, strict=True):
            g.grad = a
        self.sgd.step()
        self.sgd.zero_grad(set_to_none=True)

    def momentum(self) -> list[Tensor]:
        """The live momentum buffers (no copy): they change at the next step. No buffers without momentum
        (a newcomer's download would carry a vector of zeros as large as the weights)."""
        if not self.sgd.defaults["momentum"]:
            return []
        return [self.sgd.state[g]["momentum_buffer"] for g in self.params]

    def state_dict(self) -> dict[str, Tensor]:
        return {f"global.{i}": g for i, g in enumerate(self.params)} | flatten_optimizer("outer", self.sgd)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        copy_into(self.params, [state[f"global.{i}"] for i in range(len(self.params))])
        restore_optimizer("outer", self.sgd, state)
        self._share_momentum()
