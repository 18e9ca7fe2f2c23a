"""DiLoCo's outer optimizer: the global weights (what every round starts from, what the peers of a run
hold in common) and the outer Nesterov SGD that moves them with the averaged pseudo-gradient. Its
momentum travels to a newcomer with the weights.
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
        self.params = [p.detach().clone().requires_grad_(True) for p in local]
        self.sgd = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=momentum > 0)

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
        return [
            self.sgd.state.get(g, {}).get("momentum_buffer", torch.zeros_like(g)).detach().clone() for g in self.params
        ]

    def load_momentum(self, tensors: list[Tensor]) -> None:
        for g, m in zip(self.params, tensors, strict=True):
            self.sgd.state[g]["momentum_buffer"] = m.clone()

    def state_dict(self) -> dict[str, Tensor]:
        return {f"global.{i}": g for i, g in enumerate(self.params)} | flatten_optimizer("outer", self.sgd)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        copy_into(self.params, [state[f"global.{i}"] for i in range(len(self.params))])
        restore_optimizer("outer", self.sgd, state)
