"""Aggregation rules for the peers' contributions to one part of an all-reduce.

Each rule maps a stack of contributions `[n, ...]` to one tensor. A reducer applies its rule to its own
part of the vector only (the BTARD approach: nobody has to see every peer's whole update), so the rules
work coordinate-wise (trimmed mean) or on the part's norm (CenteredClip).

Which to pick: the mean is exact but one poisoned contribution moves it arbitrarily far. The trimmed mean
drops the `k` largest and smallest values of each coordinate (robust while fewer than half are bad).
CenteredClip (Karimireddy et al., 2021) starts from the coordinate-wise median and repeatedly moves
toward the contributions, each clipped to radius `tau` around the current centre, so an attacker shifts
the result by at most `tau / n` per iteration. Median and Krum are left out on purpose: they fail
without any attacker when peers' data differ (see docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

AGGREGATIONS = ("mean", "trimmed_mean", "centered_clip")

Aggregator = Callable[[Tensor, Tensor], Tensor]  # (stacked contributions [n, ...], weights [n]) -> aggregate


def mean(stack: Tensor, weights: Tensor) -> Tensor:
    w = weights.to(stack.dtype).reshape(-1, *[1] * (stack.dim() - 1))
    return (stack * w).sum(0) / w.sum()


def trimmed_mean(stack: Tensor, weights: Tensor, trim: float = 0.2) -> Tensor:
    """Coordinate-wise mean after dropping the `ceil(trim * n)` smallest and largest values (fewer when
    that would leave nothing: with two contributions nothing can be trimmed)."""
    n = stack.shape[0]
    k = min(math.ceil(trim * n), (n - 1) // 2)
    if k == 0:
        return mean(stack, weights)
    return stack.sort(dim=0).values[k : n - k].mean(0)


def centered_clip(stack: Tensor, weights: Tensor, tau: float | None = None, iters: int = 20) -> Tensor:
    """CenteredClip from the coordinate-wise median. `tau` defaults to the median distance of the
    contributions from that start, so honest peers are barely clipped whatever the update's scale."""
    flat = stack.reshape(stack.shape[0], -1).double()
    center = flat.median(dim=0).values
    if tau is None:
        tau = float((flat - center).norm(dim=1).median())
    if tau <= 0:
        return center.to(stack.dtype).reshape(stack.shape[1:])
    for _ in range(iters):
        diff = flat - center
        scale = (tau / diff.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
        step = (diff * scale[:, None]).mean(0)
        center = center + step
        if float(step.norm()) <= 1e-7 * (float(center.norm()) + 1e-12):
            break
    return center.to(stack.dtype).reshape(stack.shape[1:])


def get_aggregator(name: str) -> Aggregator:
    rules: dict[str, Aggregator] = {"mean": mean, "trimmed_mean": trimmed_mean, "centered_clip": centered_clip}
    if name not in rules:
        raise ValueError(f"unknown aggregation {name!r}: choose one of {', '.join(AGGREGATIONS)}")
    return rules[name]
