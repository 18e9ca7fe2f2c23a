"""A pipeline peer's model: its own stage here, every other stage on whichever live peer holds it.

`PipelineModel.loss(blocks)` runs a micro-batch through every stage: its own through its server in this
process, the others by calls to a peer of that stage chosen at random among the live ones (SWARM's
stochastic wiring, Ryabinin et al. 2023), a failed call re-sent to another peer of the stage. Stages are
autograd functions: `loss.backward()` sends each stage its input again with the gradient of its output
(the last stage computes the loss and its gradient in the forward call already), and each stage's server
recomputes its part and steps its weights, so one backward pass trains every stage the micro-batch went
through, here and on the other peers.

Peers announce their stage in the DHT (`StagePeers`); a joining peer takes the stage with the fewest.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from torch import Tensor

from swarmlm.core.loop import LoopThread
from swarmlm.core.stream_call import request_reply
from swarmlm.train.model import TrainableModel
from swarmlm.train.pipeline_messages import StageCall, StageReply
from swarmlm.train.pipeline_stage import STAGE_HANDLER, StageServer
from swarmlm.train.trainer import NoPeersError

logger = logging.getLogger(__name__)

ANNOUNCE_TTL = 20.0  # a peer's stage announcement lives this long unless refreshed (every third of it)
JOIN_SETTLE = 2.0  # seconds a joining peer waits for others joining at the same moment
CALL_TIMEOUT = 60.0
BAN_SECONDS = 30.0


class NoStagePeerError(NoPeersError):
    """No live peer of a stage answered within the deadline."""


def stages_key(run_id: str) -> str:
    return f"{run_id}.pipeline"


class StagePeers:
    """Who holds which stage (from the DHT), and calls to them with retries."""

    def __init__(self, dht: DHT, run_id: str, stages: int, retry_window: float) -> None:
        self.dht, self.run_id, self.stages, self.retry_window = dht, run_id, stages, retry_window
        self.me = str(dht.peer_id)
        self.loop: LoopThread | None = None  # the training link's, once connected (`attach`)
        self.p2p: P2P | None = None
        self.server: StageServer | None = None  # our own stage
        self._banned: dict[str, float] = {}
        self._holders: tuple[dict[int, list[str]], float] = ({}, -1.0)
        self._flags: dict[str, dict[str, Any]] = {}  # peer -> its announcement ("done", "evaluated")
        self._joining: list[tuple[float, str]] = []  # (when, peer) of peers choosing their stage
        self._stage: int | None = None  # ours, once announced
        self._done = False
        self._evaluated: bool | None = None  # None: we make no final evaluation (a Python `fit`)
        self._stop = threading.Event()

    def attach(self, loop: LoopThread, p2p: P2P, server: StageServer) -> None:
        """Call other peers through the link's P2P replica (one replica per DHT and process), and our own
        stage's `server` directly."""
        self.loop, self.p2p, self.server = loop, p2p, server

    # ----- announcements ------------------------------------------------------------------------
    def holders(self, fresh: bool = False) -> dict[int, list[str]]:
        """Stage -> the peers announcing it (read again after a few seconds, or at once with `fresh`)."""
        found, when = self._holders
        if fresh or time.monotonic() - when > 3.0:
            found = {s: [] for s in range(self.stages)}
            flags, joining = {}, []
            entry = self.dht.get(stages_key(self.run_id), latest=True)
            for peer, item in (entry.value if entry is not None and isinstance(entry.value, dict) else {}).items():
                value = getattr(item, "value", None)
                stage = value.get("stage") if isinstance(value, dict) else None
                if type(stage) is int and 0 <= stage < self.stages:
                    found[stage].append(str(peer))
                    flags[str(peer)] = value
                elif isinstance(value, dict) and isinstance(value.get("joined"), int | float):
                    joining.append((float(value["joined"]), str(peer)))
            self._holders, self._flags, self._joining = (found, time.monotonic()), flags, sorted(joining)
        return found

    def choose_stage(self) -> int:
        """The stage the swarm needs most. Peers starting at once would all see the same counts and take
        the same stage, so a joining peer first says so, waits JOIN_SETTLE seconds, and then deals the
        joining peers it sees (by when they joined) one by one to the least-served stage: each of them
        deals the same way and takes the stage dealt to it."""
        self.note_joining()
        time.sleep(JOIN_SETTLE)
        counts = {s: len(p) for s, p in self.holders(fresh=True).items()}
        joining = [peer for _, peer in self._joining] or [self.me]
        if self.me not in joining:  # our own note has not reached the DHT yet: deal ourselves last
            joining.append(self.me)
        for peer in joining:
            stage = min(counts, key=lambda s: (counts[s], s))
            counts[stage] += 1
            if peer == self.me:
                return stage
        raise AssertionError("unreachable: we are among the joining peers")

    def note_joining(self) -> None:
        """Say we are joining (before our stage is served): peers done with their rounds wait for us."""
        joined = get_dht_time()
        self.dht.store(stages_key(self.run_id), {"joined": joined}, joined + ANNOUNCE_TTL, subkey=self.me)

    def others_training(self) -> int:
        """Live peers of the run, other than us, that have not finished their rounds or are joining."""
        return self._others(lambda value: not value.get("done"))

    def others_evaluating(self) -> int:
        """Live peers of the run, other than us, that will make a final evaluation and have not yet, or
        are joining."""
        return self._others(lambda value: value.get("evaluated") is False)

    def _others(self, pending: Callable[[dict[str, Any]], bool]) -> int:
        self.holders(fresh=True)
        peers = {peer for peer, value in self._flags.items() if pending(value)}
        return len((peers | {peer for _, peer in self._joining}) - {self.me})

    def mark_done(self, done: bool = True) -> None:
        """Our rounds are done (we still serve our stage: others may still need it), or, with False, that
        we train again (another `fit`)."""
        self._done, self._evaluated = done, None
        self._store()

    def mark_evaluated(self, made: bool) -> None:
        """We will make a final evaluation once nobody trains (False; peers that made theirs wait for it),
        or we made it (True)."""
        self._evaluated = made
        self._store()

    def _store(self) -> None:
        value = {"stage": self._stage, "done": self._done, "evaluated": self._evaluated}
        self.dht.store(stages_key(self.run_id), value, get_dht_time() + ANNOUNCE_TTL, subkey=self.me)

    def announce(self, stage: int) -> None:
        """Announce `stage` now and every third of ANNOUNCE_TTL until `close`."""
        self._stage = stage
        self._store()

        def loop() -> None:
            while not self._stop.wait(ANNOUNCE_TTL / 3):
                try:
                    self._store()
                except Exception as e:  # a DHT hiccup: the next refresh tries again
                    logger.warning("could not announce our stage: %s", e)

        threading.Thread(target=loop, name="swarmlm-stage-announce", daemon=True).start()

    def wait_for_every_stage(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while missing := [s for s, peers in self.holders(fresh=True).items() if not peers]:
            if time.monotonic() > deadline:
                raise NoStagePeerError(
                    f"no peer holds pipeline stage {', '.join(map(str, missing))} after {wait:.0f} s"
                )
            time.sleep(1.0)

    # ----- calls --------------------------------------------------------------------------------
    def call(self, call: StageCall) -> StageReply:
        """`call` answered by a live peer of its stage; failed peers are banned for a while and the call
        re-sent to another, for up to `retry_window` seconds. Our own stage answers in this process."""
        if self.server is not None and call.stage == self.server.stage:
            return self.server.handle(call)
        first_failure: float | None = None
        last: BaseException | None = None
        while True:
            now = time.monotonic()
            live = [p for p in self.holders(fresh=last is not None)[call.stage] if self._banned.get(p, 0) < now]
            if live:
                peer = random.choice(live)
                assert self.loop is not None, "not attached"
                try:
                    return self.loop.run(self._send(peer, call), CALL_TIMEOUT + 5)
                except Exception as e:  # dead, hung, refusing: another peer of the stage takes it
                    last = e
                    self._banned[peer] = now + BAN_SECONDS
                    logger.warning("stage %d peer %s… failed (%s): re-sending to another", call.stage, peer[:12], e)
            first_failure = first_failure or now
            if now - first_failure > self.retry_window:
                why = f"the last one failed: {last}" if last is not None else "no live peer holds it"
                raise NoStagePeerError(f"no peer of stage {call.stage} answered for {self.retry_window:.0f} s; {why}")
            if not live:
                time.sleep(1.0)

    async def _send(self, peer: str, call: StageCall) -> StageReply:
        assert self.p2p is not None
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), STAGE_HANDLER)
        return StageReply.from_proto(await request_reply(reader, writer, call.to_proto()))

    def close(self) -> None:
        self._stop.set()


class _RemoteStage(torch.autograd.Function):
    """A stage run by its server (another peer's, or ours): no graph here, the backward pass is a call."""

    @staticmethod
    def forward(ctx: Any, peers: StagePeers, stage: int, x: Tensor, anchor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.peers, ctx.stage, ctx.x = peers, stage, x.detach()
        return peers.call(StageCall("forward", stage, peers.run_id, {"x": ctx.x})).tensors["out"]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        reply = ctx.peers.call(StageCall("backward", ctx.stage, ctx.peers.run_id, {"x": ctx.x, "grad": grad}))
        return None, None, reply.tensors.get("grad"), None


class _RemoteLoss(torch.autograd.Function):
    """The last stage: its server computes the loss and its backward (stepping its weights) in one call;
    the gradient of its input waits here for our backward pass."""

    @staticmethod
    def forward(ctx: Any, peers: StagePeers, stage: int, x: Tensor, targets: Tensor, anchor: Tensor) -> Tensor:  # type: ignore[override]
        call = StageCall("loss", stage, peers.run_id, {"x": x.detach(), "targets": targets}, train=True)
        reply = peers.call(call)
        ctx.grad = reply.tensors.get("grad")
        assert reply.loss is not None
        return torch.tensor(reply.loss)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return None, None, None if ctx.grad is None else ctx.grad * grad, None, None


@dataclass
class PipelineModel(TrainableModel):
    """`module` is this peer's stage; `loss` runs the whole model across the swarm."""

    stage: int = 0
    stages: int = 1
    peers: StagePeers | None = field(default=None, repr=False)  # set once connected

    def loss(self, blocks: Tensor) -> Tensor:
        """The mean next-token loss of a micro-batch through every stage (ours too, through its server, so
        that every stage steps the same way); its backward pass steps each stage's weights."""
        x, targets = blocks[:, :-1], blocks[:, 1:]
        training = torch.is_grad_enabled()
        anchor = torch.zeros((), requires_grad=True) if training else torch.zeros(())
        h = x
        for s in range(self.stages):
            last = s == self.stages - 1
            assert self.peers is not None, "not connected"
            if last and training:
                return _RemoteLoss.apply(self.peers, s, h, targets, anchor)
            if last:
                return torch.tensor(
                    self.peers.call(StageCall("loss", s, self.peers.run_id, {"x": h, "targets": targets})).loss
                )
            if training:
                h = _RemoteStage.apply(self.peers, s, h, anchor)
            else:
                h = self.peers.call(StageCall("forward", s, self.peers.run_id, {"x": h})).tensors["out"]
        raise AssertionError("unreachable: the last stage returns the loss")
