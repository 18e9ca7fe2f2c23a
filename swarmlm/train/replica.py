"""What the peers of a run hold in common, which a newcomer downloads: the round, the global weights, and
the optimizer state that must agree among them (DiLoCo's outer momentum; DDP's AdamW moments).

The `Trainer` holds one, as torchtitan's trainer holds its checkpointer; its `SwarmLink` hands `shared` to
the averager, whose thread streams it to a newcomer (hivemind's state sharing), and gives a download
from a peer ahead of us to `load_shared`.
"""

from __future__ import annotations

import logging
import threading
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
        meta: StateMeta = {"round": self.round, "digest": self.digest(), "names": self.names}
        if self.mode == "ddp":
            return meta, self.inner.moments() + [g.detach().clone() for g in self.outer.params]
        return meta, self.outer.momentum() + [g.detach() for g in self.outer.params]

    def shared(self) -> SharedState:
        """The state a newcomer downloads (the averager's thread calls it): DiLoCo's as it is (it changes
        only at the outer step); DDP's as copied at the round's end (it moves each step)."""
        with self.lock:
            return self._ddp_copy if self._ddp_copy is not None else self._snapshot()

    def refresh(self) -> None:
        """After the state moved (a round's end, a download): DDP's copy for newcomers is taken again."""
        with self.lock:
            self._ddp_copy = self._snapshot() if self.mode == "ddp" else None

    def load_shared(self, meta: StateMeta, tensors: list[Tensor]) -> bool:
        """Take a downloaded state; False (nothing taken) if its weights are not those its digest names."""
        weights = self.outer.params
        common, downloaded = tensors[: -len(weights)], tensors[-len(weights) :]
        if tensors_digest(zip(self.names, downloaded, strict=True)) != meta.get("digest"):
            logger.warning("a downloaded state did not match its digest: not taken")
            return False
        with torch.no_grad(), self.lock:
            copy_into(weights, downloaded)
            if self.mode == "ddp":
                self.inner.load_moments(common)
            else:
                self.outer.load_momentum(common)
            copy_into(self.local, weights)
            self.round = int(meta["round"])
        logger.info("caught up: downloaded round %d from a peer", self.round)
        self.downloaded = True
        self.refresh()
        return True
