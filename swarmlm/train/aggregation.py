"""Aggregation rules for the peers' contributions to one part of an all-reduce.

Each rule maps a stack of contributions `[n, ...]` to one tensor. A reducer applies its rule to its own
part of the vector only (the BTARD approach: nobody has to see every peer's whole update), so the rules
work coordinate-wise (trimmed mean) or on the part's norm (CenteredClip).

Which to pick: the mean is exact but one poisoned contribution moves it arbitrarily far. The trimmed mean
drops the `k` largest and smallest values of each coordinate (robust while fewer than half are bad).
CenteredClip (Karimireddy et al., 2021) starts from the coordinate-wise median and repeatedly moves
toward the contributions, each clipped to radius `tau` around the current centre, so an attacker shifts
the result by at most `tau / n` per iteration; one that ends far outside that radius is dropped (within a
budget) and the clipping redone without it. Median and Krum are left out on purpose: they fail
without any attacker when peers' data differ (see docs/architecture.md). `poison_` is the attack they
are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

AGGREGATIONS = ("mean", "trimmed_mean", "centered_clip")

Aggregator = Callable[[Tensor, Tensor], Tensor]  # (stacked contributions [n, ...], weights [n]) -> aggregate


def mean(stack: Tensor, weights: Tensor) -> Tensor:
    w = weights.to(stack.dtype).reshape(-1, *[1] * (stack.dim() - 1))
    return (stack * w).sum(0) / w.sum()


def byzantine_budget(n: int, fraction: float = 0.2) -> int:
    """How many of `n` contributions a robust rule may set aside as bad: `ceil(fraction * n)`, always
    fewer than half (with two contributions, none)."""
    return min(math.ceil(fraction * n), (n - 1) // 2)


def trimmed_mean(stack: Tensor, weights: Tensor, trim: float = 0.2) -> Tensor:
    """Coordinate-wise mean after dropping the `byzantine_budget(n, trim)` smallest and largest values."""
    n = stack.shape[0]
    k = byzantine_budget(n, trim)
    if k == 0:
        return mean(stack, weights)
    return stack.sort(dim=0).values[k : n - k].mean(0)


def centered_clip(
    stack: Tensor, weights: Tensor, tau: float | None = None, iters: int = 20, reject: float = 3.0
) -> Tensor:
    """CenteredClip from the coordinate-wise median. `tau` defaults to the median distance of the
    contributions from the centre, so honest peers are barely clipped whatever the update's scale.

    A clipped contribution still pulls the centre by tau / n, all along its own direction: against one
    peer sending -10x its update among four, a third of the honest spread taken off the honest mean's
    step, every round (bench/RESULTS.md, train). So a contribution that ends more than `reject`
    tau from the centre is dropped and the clipping runs again on the rest, with tau measured anew. At
    most `byzantine_budget(n)` are dropped, and only while more than twice that many remain, so honest
    peers stay the majority of what is kept; an attacker near enough to be kept is clipped as before.
    """
    n = stack.shape[0]
    kept = stack.reshape(n, -1).double()
    ordered = kept.sort(dim=0).values
    center = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    budget = byzantine_budget(n)
    max_dropped = budget if n - budget > 2 * budget else 0
    while True:
        radius = tau if tau is not None else float((kept - center).norm(dim=1).median())
        if radius <= 0:
            break
        center = _clip_toward(kept, center, radius, iters)
        far = (kept - center).norm(dim=1) > reject * radius
        if not bool(far.any()) or n - int((~far).sum()) > max_dropped:
            break
        kept = kept[~far]
    return center.to(stack.dtype).reshape(stack.shape[1:])


def _clip_toward(flat: Tensor, center: Tensor, tau: float, iters: int) -> Tensor:
    """CenteredClip's iterations: move the centre by the mean of the contributions' offsets, each clipped
    to norm `tau`."""
    for _ in range(iters):
        diff = flat - center
        scale = (tau / diff.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
        step = (diff * scale[:, None]).mean(0)
        center = center + step
        if float(step.norm()) <= 1e-7 * (float(center.norm()) + 1e-12):
            break
    return center


def get_aggregator(name: str) -> Aggregator:
    rules: dict[str, Aggregator] = {"mean": mean, "trimmed_mean": trimmed_mean, "centered_clip": centered_clip}
    if name not in rules:
        raise ValueError(f"unknown aggregation {name!r}: choose one of {', '.join(AGGREGATIONS)}")
    return rules[name]


def poison_(update: list[Tensor], attack: str, scale: float) -> None:
    """Fault injection (tests, benchmarks): what a Byzantine peer would send ("sign_flip" or "noise")."""
    for t in update:
        if attack == "sign_flip":
            t.mul_(-scale)
        else:
            t.add_(torch.randn_like(t) * scale * t.abs().mean().clamp_min(1e-3))
