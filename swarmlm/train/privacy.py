"""Peer-level differential privacy (DP-FedAvg style) with opacus's accountant.

Each round a peer clips its whole pseudo-gradient to L2 norm `clip` and adds Gaussian noise of standard
deviation `noise_multiplier * clip` before it leaves the peer. The noise is added locally because there
is no trusted server: the reducers that see a peer's parts are other peers. So each released update is a
Gaussian mechanism over the peer's entire dataset (sensitivity `clip`), once per round with sampling rate
1, and opacus's RDP accountant composes the rounds into (epsilon, delta).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PeerPrivacy:
    def __init__(self, clip: float, noise_multiplier: float, delta: float | None, seed: int | None = None) -> None:
        if delta is None or not 0 < delta < 1:
            raise ValueError("differential privacy needs --dp-delta in (0, 1): epsilon is meaningless without it")
        if clip <= 0 or noise_multiplier < 0:
            raise ValueError("--dp-clip must be > 0 and --dp-noise >= 0")
        # Imported here: opacus pulls in torch.distributed.tensor and scipy.stats, seconds of every trainer's
        # start that only a run with differential privacy needs.
        from opacus.accountants import RDPAccountant

        self.clip, self.noise_multiplier, self.delta = clip, noise_multiplier, delta
        self.accountant = RDPAccountant()
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    def privatize_(self, update: Sequence[Tensor]) -> float:
        """Clip `update` (all tensors together) and add noise, in place. Returns the norm before clipping."""
        norm = float(torch.sqrt(sum((t.float() ** 2).sum() for t in update)))
        scale = min(1.0, self.clip / (norm + 1e-12))
        for t in update:
            t.mul_(scale)
            if self.noise_multiplier > 0:
                noise = torch.randn(t.shape, generator=self.generator) * (self.noise_multiplier * self.clip)
                t.add_(noise.to(t.dtype))
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        return norm

    @property
    def epsilon(self) -> float:
        if self.noise_multiplier == 0:
            return float("inf")
        return float(self.accountant.get_epsilon(delta=self.delta))
