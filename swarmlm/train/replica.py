"""What the peers of a run hold in common, which a newcomer downloads: the round, the global weights, and
the optimizer state that must agree among them (DiLoCo's outer momentum; DDP's AdamW moments).

The `Trainer` holds one, as torchtitan's trainer holds its checkpointer; its `SwarmLink` hands `shared` to
the averager, whose thread streams it to a newcomer (hivemind's state sharing), and streams a download
from a peer ahead of us into `download` (state_download.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TypedDict

import torch
from torch import Tensor

from swarmlm.model.loading import tensors_digest
from swarmlm.train.inner import InnerOptimizer
from swarmlm.train.outer import OuterOptimizer, copy_into

logger = logging.getLogger(__name__)


class StateMeta(TypedDict):
    """What travels with the shared tensors, and is checked before a download is taken."""

    round: int
    digest: str
    names: list[str]
    common: int  # how many tensors of optimizer state come before the weights


SharedState = tuple[StateMeta, list[Tensor]]


class Replica:
    """One peer's copy of the run's common state, over the Trainer's tensors (nothing copied but DDP's
    state at a round's end). Its tensors change holding `lock`: a pipeline stage's server and the
    averager's thread read them from other threads."""

    def __init__(
        self,
        mode: str,
        names: list[str],
        local: list[torch.nn.Parameter],
        outer: OuterOptimizer,
        inner: InnerOptimizer,
        lock: threading.RLock,
    ) -> None:
        self.mode, self.names, self.local, self.outer, self.inner, self.lock = mode, names, local, outer, inner, lock
        self.round = 0
        self.downloaded = False  # set by a download; the round loop reads and clears it
        self._ddp_copy: SharedState | None = None  # DDP's state at its last round's end (see `shared`)

    def digest(self) -> str:
        """Of the global weights: peers of one round and one digest hold the same state."""
        return tensors_digest(zip(self.names, self.outer.params, strict=True))

    def _snapshot(self) -> SharedState:
        """The optimizer state peers hold in common, then the global weights. DiLoCo's are live (outer.py):
        a step before the weights, last, are all streamed shows in their digest, and the download is refused."""
        if self.mode == "ddp":
            common, weights = self.inner.moments(), [g.detach().clone() for g in self.outer.params]
        else:
            common, weights = self.outer.momentum(), [g.detach() for g in self.outer.params]
        meta: StateMeta = {"round": self.round, "digest": self.digest(), "names": self.names, "common": len(common)}
        return meta, common + weights

    def shared(self) -> SharedState:
        """The state a newcomer downloads (the averager's thread calls it): DiLoCo's as it is (it changes
        only at the outer step); DDP's as copied at the round's end (it moves each step)."""
        with self.lock:
            return self._ddp_copy if self._ddp_copy is not None else self._snapshot()

    def refresh(self) -> None:
        """After the state moved (a round's end, a download): DDP's copy for newcomers is taken again."""
        with self.lock:
            self._ddp_copy = self._snapshot() if self.mode == "ddp" else None

    def download(self, meta: Mapping[str, object], staging: list[Tensor]) -> Download:
        """Take a state as it streams in: the shared optimizer state into ours as it is, the weights into
        `staging` (tensors shaped as the weights, idle meanwhile) until their digest is checked."""
        return Download(self, meta, staging)

    def _common(self, count: int) -> list[Tensor | None]:
        """Our tensors of the shared optimizer state, to be written in place; None for each of `count` we
        cannot take (a peer of another --outer-momentum setting: buffers on one side only)."""
        ours = self.inner.live_moments() if self.mode == "ddp" else self.outer.momentum()
        if len(ours) == count:
            return list(ours)
        logger.warning("a downloaded state's outer momentum does not match ours (--outer-momentum): kept ours")
        return [None] * count

    def take(self, round_: int, digest: object, weights: list[Tensor]) -> bool:
        """Take downloaded weights of `round_`; False (nothing taken) if they are not those `digest` names."""
        if tensors_digest(zip(self.names, weights, strict=True)) != digest:
            logger.warning("a downloaded state did not match its digest: not taken")
            return False
        with torch.no_grad(), self.lock:
            copy_into(self.outer.params, weights)
            copy_into(self.local, self.outer.params)
            self.round = round_
        logger.info("caught up: downloaded round %d from a peer", self.round)
        self.downloaded = True
        self.refresh()
        return True


class Download:
    """One download into a `Replica` (the `Sink` of state_download.py). The optimizer state is written in
    place as it arrives; when the weights, last, do not match their digest (the peer stepped while
    streaming), they are not taken and the next download writes that state again."""

    def __init__(self, replica: Replica, meta: Mapping[str, object], staging: list[Tensor]) -> None:
        count, round_ = meta.get("common"), meta.get("round")
        if not isinstance(count, int) or count < 0 or not isinstance(round_, int):
            raise ValueError("a downloaded state does not say its round and how many optimizer tensors it holds")
        self.replica, self.round, self.digest, self.staging = replica, round_, meta.get("digest"), staging
        self.targets = replica._common(count) + list(staging)

    def put(self, index: int, tensor: Tensor) -> None:
        if index >= len(self.targets):
            raise ValueError(f"a downloaded state holds more than the {len(self.targets)} tensors it announced")
        target = self.targets[index]
        if target is None:
            return
        if target.shape != tensor.shape:
            raise ValueError(f"a downloaded tensor of shape {tuple(tensor.shape)} where ours is {tuple(target.shape)}")
        with torch.no_grad(), self.replica.lock:
            target.copy_(tensor)

    def finish(self, count: int) -> bool:
        if count != len(self.targets):
            logger.warning("a downloaded state ended after %d of %d tensors: not taken", count, len(self.targets))
            return False
        return self.replica.take(self.round, self.digest, self.staging)
