"""One training peer: DiLoCo rounds (or synchronous data-parallel steps) averaged over the swarm.

A DiLoCo round on each peer (Douillard et al., 2023):

1. `H` inner AdamW steps on the peer's own data, starting from the swarm's global weights;
2. pseudo-gradient = global weights - local weights (optionally poisoned, for attack tests; optionally
   clipped and noised for differential privacy);
3. robust all-reduce of the pseudo-gradients with whoever is in the group (`allreduce.py`);
4. outer Nesterov SGD step on the global weights with the averaged pseudo-gradient; local = global.

Every member of a group receives bit-identical averages and applies the same outer step to the same
global weights, so after a round all members hold weights with the same digest. Each member also sends
its round and digest along (hivemind's gather): a member whose starting point differed from the group's
majority downloads the state from a peer afterwards. A round whose averaging fails (no group in time,
or a reducer died) keeps the local progress: the next round's pseudo-gradient then covers it too.

A newcomer, or a peer restarted behind the others, downloads the global weights, the outer optimizer's
momentum and the round number from the most advanced peer before training (hivemind's state sharing).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hivemind.utils import get_dht_time
from torch import Tensor

from swarmlm.core.identity import Identity
from swarmlm.core.keys import TRAINING_KEY
from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Membership, load_membership
from swarmlm.ledger.store import Ledger
from swarmlm.ledger.sync import LedgerSync
from swarmlm.model.loading import tensors_digest
from swarmlm.train.allreduce import RobustAverager
from swarmlm.train.checkpointer import best_round, latest_checkpoint, mark_best, save_checkpoint
from swarmlm.train.config import TrainConfig
from swarmlm.train.data import TokenShards, load_data_tokenizer
from swarmlm.train.evaluation import evaluate
from swarmlm.train.model import TrainableModel, build_model
from swarmlm.train.privacy import PeerPrivacy

logger = logging.getLogger(__name__)


TRAINING_TTL = 600.0
CURVE_POINTS = 200
ROUND_KEY_BITS = 16  # rounds in the matchmaking key, modulo 2**16: only neighbours need to differ


class NoPeersError(RuntimeError):
    """The run cannot go on: not enough peers to average with."""


@dataclass
class RoundReport:
    round: int
    train_loss: float
    val_loss: float
    group_size: int
    digest: str
    tokens: int
    compute_s: float
    wall_s: float
    bytes_sent: int
    epsilon: float | None
    averaged: bool

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    return {
        f"{prefix}.{index}.{key}": value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
        for index, state in opt.state_dict()["state"].items()
        for key, value in state.items()
    }


def _restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        train = TokenShards.open(cfg.data, "train")
        val = TokenShards.open(cfg.data, "val")
        self.tokenizer = load_data_tokenizer(cfg.data)
        self.shards = train.part(*cfg.data_part) if cfg.data_part else train
        if len(self.shards) == 0:
            raise ValueError(f"{cfg.data}: no training blocks for this peer")
        self.val_blocks = val.blocks(range(min(cfg.eval_blocks, len(val))))
        eos = self.tokenizer.eos_token_ids[0] if self.tokenizer.eos_token_ids else None
        self.model: TrainableModel = build_model(cfg, train.vocab_size, train.block_size, eos)
        params = self.model.params
        # The swarm's agreed weights: what every round starts from and what the outer optimizer moves.
        self.global_params = [p.detach().clone().requires_grad_(True) for p in params]
        self.inner_opt = torch.optim.AdamW(params, lr=cfg.inner_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.outer_opt = torch.optim.SGD(
            self.global_params, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.outer_momentum > 0
        )
        self.privacy = PeerPrivacy(cfg.dp_clip, cfg.dp_noise, cfg.dp_delta) if cfg.dp_noise is not None else None
        self.round = 0
        self.position = 0  # batches drawn from this peer's data so far
        self.inner_steps_done = 0
        self.best_val = float("inf")
        self.checkpoints = cfg.run_dir / "checkpoints"
        self.log_path = cfg.run_dir / "rounds.jsonl"
        self._state_lock = threading.Lock()
        self._shared_state: tuple[dict[str, Any], list[Tensor]] = self._snapshot()
        self._sent_base: tuple[int, str] = (0, "")
        self.failures = 0  # averaging attempts failed in a row
        self.curve: list[tuple[int, float]] = []  # (round, validation loss)
        self._step_seconds = 0.0  # the last round's mean inner step time
        self.dht: Any = None
        self.membership: Membership | None = None
        self.averager: RobustAverager | None = None
        self.identity = Identity.from_option(cfg.identity)  # signs this peer's ledger entries
        self.ledger_sync: LedgerSync | None = None
        self.group: list[str] = []  # peer ids of the last round's group, sorted
        self.update_digest: str | None = None  # of the last round's averaged pseudo-gradient (DiLoCo)

    # ---- swarm plumbing ----------------------------------------------------------------------------

    def connect(self) -> None:
        from swarmlm.core.dht import DAEMON_START_TIMEOUT, start_dht

        cfg = self.cfg
        cert = load_membership(cfg.swarm_cert, self.identity) if cfg.swarm_cert else None
        ledger = Ledger(cfg.run_dir / "ledger.jsonl", self.identity)  # a tampered copy stops us here
        self.dht = start_dht(cfg.initial_peers, cfg.host_maddrs, self.identity, cert=cert)
        self.membership = Membership(self.dht, cert)
        self.membership.publish()
        loop = LoopThread("swarmlm-ledger")
        p2p = loop.run(self.dht.replicate_p2p(), DAEMON_START_TIMEOUT)
        self.ledger_sync = LedgerSync(ledger, loop, p2p, self.membership)
        self.averager = RobustAverager(
            [torch.zeros_like(p) for p in self.global_params],
            self.dht,
            prefix=cfg.run_id,
            aggregation=cfg.aggregation,
            wire=cfg.wire,
            state_fn=self._shared,
            membership=self.membership,
            target_group_size=cfg.target_group_size,
            min_group_size=cfg.min_group_size,
            min_matchmaking_time=cfg.matchmaking_time,
            request_timeout=cfg.matchmaking_time / 2,  # hivemind: below the matchmaking time
            allreduce_timeout=cfg.averaging_timeout,
            next_chunk_timeout=10.0,
            start=True,
        )
        self.averager.state_sharing_priority = float(self.round)

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def close(self) -> None:
        if self.ledger_sync is not None:
            self.ledger_sync.loop.stop(self.ledger_sync.p2p)
            self.ledger_sync.ledger.close()
        if self.averager is not None:
            self.averager.shutdown()
        if self.dht is not None:
            self.dht.shutdown()

    def _snapshot(self) -> tuple[dict[str, Any], list[Tensor]]:
        meta = {"round": self.round, "digest": self.digest(), "names": self.model.names}
        return meta, [g.detach().clone() for g in self.global_params] + self._shared_optimizer_state()

    def _shared_optimizer_state(self) -> list[Tensor]:
        """The optimizer state all peers hold in common: DiLoCo's outer momentum, or in DDP mode the AdamW
        moments and step count (every peer takes the same steps; a peer that re-syncs with other moments
        would drift off again at its next step)."""
        if self.cfg.mode == "ddp":
            state = []
            for p in self.model.params:
                s = self.inner_opt.state.get(p, {})
                step = torch.tensor(float(s.get("step", 0)))
                state += [
                    s.get("exp_avg", torch.zeros_like(p)).clone(),
                    s.get("exp_avg_sq", torch.zeros_like(p)).clone(),
                    step,
                ]
            return state
        return [
            self.outer_opt.state.get(g, {}).get("momentum_buffer", torch.zeros_like(g)).detach().clone()
            for g in self.global_params
        ]

    def _load_optimizer_state(self, tensors: list[Tensor]) -> None:
        if self.cfg.mode == "ddp":
            for p, (avg, avg_sq, step) in zip(
                self.model.params, zip(tensors[0::3], tensors[1::3], tensors[2::3], strict=True), strict=True
            ):
                self.inner_opt.state[p] = {"step": step.clone(), "exp_avg": avg.clone(), "exp_avg_sq": avg_sq.clone()}
            return
        for g, m in zip(self.global_params, tensors, strict=True):
            self.outer_opt.state[g]["momentum_buffer"] = m.clone()

    def _shared(self) -> tuple[dict[str, Any], list[Tensor]]:
        with self._state_lock:
            return self._shared_state

    def digest(self) -> str:
        return tensors_digest(zip(self.model.names, self.global_params, strict=True))

    def catch_up(self, at_least: int | None = None, wait: float = 0.0) -> bool:
        """Download the global state from the most advanced peer: if it is ahead of ours, or (`at_least`)
        once some peer has reached that round, trying for up to `wait` seconds."""
        assert self.averager is not None
        deadline = time.monotonic() + wait
        wanted = self.round + 1 if at_least is None else at_least
        while True:
            loaded = self.averager.load_state_from_peers(timeout=30) if self._best_shared_round() >= wanted else None
            if loaded:
                meta, tensors = loaded
                if meta.get("round", -1) >= wanted and meta.get("names") == self.model.names:
                    self._load_shared(meta, tensors)
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def _load_shared(self, meta: dict[str, Any], tensors: list[Tensor]) -> None:
        n = len(self.global_params)
        with torch.no_grad():
            for g, t in zip(self.global_params, tensors[:n], strict=True):
                g.copy_(t)
            self._load_optimizer_state(tensors[n:])
            for p, g in zip(self.model.params, self.global_params, strict=True):
                p.copy_(g)
        self.round = int(meta["round"])
        if self.digest() != meta.get("digest"):
            raise RuntimeError("downloaded state does not match its digest")
        logger.info("caught up: downloaded round %d from a peer", self.round)
        self._publish()

    def _publish(self) -> None:
        snapshot = self._snapshot()
        with self._state_lock:
            self._shared_state = snapshot
        if self.averager is not None:
            self.averager.state_sharing_priority = float(self.round)

    def _begin_average(self) -> Any:
        """Start matchmaking in the background while the last inner steps run (as hivemind's Optimizer
        pre-schedules it): the group is formed by the time the update is ready, and its all-reduce waits
        for `allow_allreduce`. The base sent along is already known: global weights do not change mid-round."""
        assert self.averager is not None
        self._sent_base = (self.round, self.digest())
        gather = {"round": self._sent_base[0], "digest": self._sent_base[1]}
        self._match_within_round()
        window = self._attempt_window() + self.cfg.matchmaking_time  # covers the steps still to run
        return self.averager.step(gather=gather, timeout=window, allow_retries=False, wait=False, require_trigger=True)

    def _match_within_round(self) -> None:
        """Match only with peers averaging from the same round: the round goes into the matchmaking key
        (hivemind's group bits). A straggler retrying round r would otherwise join the others' group for
        round r + 1 and mix a pseudo-gradient from stale weights into it. Set before every matchmaking:
        hivemind rewrites the bits each time a group assembles."""
        assert self.averager is not None
        self.averager.set_group_bits(format(self._sent_base[0] % 2**ROUND_KEY_BITS, f"0{ROUND_KEY_BITS}b"))

    def _attempt_window(self) -> float:
        """How long one matchmaking attempt may wait before we look whether the others moved on: short,
        so a straggler notices a finished run while its peers still linger (see `run_training`)."""
        return 3 * self.cfg.matchmaking_time

    def _average(self, tensors: list[Tensor], early: Any = None) -> tuple[list[Tensor], dict[Any, Any]] | None:
        """All-reduce `tensors` with the current group (`early`: the matchmaking `_begin_average` started);
        None when no group formed or the round failed."""
        assert self.averager is not None
        with self.averager.get_tensors() as buffers:
            for b, t in zip(buffers, tensors, strict=True):
                b.copy_(t)
        if early is None:
            self._sent_base = (self.round, self.digest())
        gather = {"round": self._sent_base[0], "digest": self._sent_base[1]}
        deadline = time.monotonic() + self.cfg.averaging_timeout
        while True:
            try:
                if early is not None:
                    control, early = early, None  # one try: a retry is a fresh step
                    control.allow_allreduce()
                    gathered = control.result()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= self.cfg.matchmaking_time:
                        return None
                    window = min(remaining, self._attempt_window())
                    self._match_within_round()
                    gathered = self.averager.step(gather=gather, timeout=window, allow_retries=False)
                if gathered:
                    with self.averager.get_tensors() as buffers:
                        return [b.clone() for b in buffers], gathered
            except Exception as e:  # hivemind raises on a failed group; the caller keeps its progress
                logger.warning("averaging failed in round %d: %s", self.round, e)
            # A failure can be one-sided: the others may have finished this round. Then take their state.
            if self.catch_up() or time.monotonic() >= deadline:
                return None

    def _shared_rounds(self) -> list[float]:
        """The rounds the peers of this run offer their state at (read from the DHT: no download)."""
        found = self.dht.get(f"{self.cfg.run_id}.all_averagers", latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        return [info.value for info in found.value.values() if isinstance(getattr(info, "value", None), float | int)]

    def _best_shared_round(self) -> float:
        return max(self._shared_rounds(), default=-1.0)

    def linger(self) -> None:
        """Stay a moment after the last round, and longer while a peer of the run is still behind: a
        straggler (its last all-reduce broke on its side, or it came back late) downloads the final state
        from us. Bounded: a crashed peer's entry stays in the DHT until it expires."""
        time.sleep(4 * self.cfg.matchmaking_time + 2)  # longer than a straggler's matchmaking attempt
        deadline = time.monotonic() + self.cfg.averaging_timeout
        while min(self._shared_rounds(), default=self.round) < self.round and time.monotonic() < deadline:
            time.sleep(1.0)

    # ---- training ----------------------------------------------------------------------------------

    def _inner_lr(self, step_in_round: int) -> float:
        """Linear warmup over this peer's first steps (in DiLoCo its AdamW state starts empty, even when it
        joins late; in DDP every peer shares one optimizer state, so one schedule), times cosine decay over
        the run's global progress."""
        cfg = self.cfg
        global_step = self.round * cfg.inner_steps + step_in_round
        warm_steps = global_step if cfg.mode == "ddp" else self.inner_steps_done
        warm = min(1.0, (warm_steps + 1) / max(1, cfg.warmup_steps))
        progress = min(1.0, global_step / (cfg.rounds * cfg.inner_steps))
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.inner_lr * warm * decay

    def _inner_step(self, batch: Tensor, step_in_round: int) -> float:
        for group in self.inner_opt.param_groups:
            group["lr"] = self._inner_lr(step_in_round)
        loss = self.model.loss(batch)
        loss.backward()
        return loss.item()

    def _clip_and_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.params, 1.0)
        self.inner_opt.step()
        self.inner_opt.zero_grad(set_to_none=True)
        self.inner_steps_done += 1

    def _poison_(self, update: list[Tensor]) -> None:
        """Fault injection (tests, benchmarks): what a Byzantine peer would send."""
        for t in update:
            if self.cfg.byzantine == "sign_flip":
                t.mul_(-self.cfg.byzantine_scale)
            else:
                t.add_(torch.randn_like(t) * self.cfg.byzantine_scale * t.abs().mean().clamp_min(1e-3))

    def _diloco_round(self, batches: Iterator[tuple[int, Tensor]], on_step: Any) -> tuple[list[float], float, int]:
        compute, losses, early = 0.0, [], None
        h = self.cfg.inner_steps
        # Steps left when matchmaking starts: about the matchmaking time's worth (from the last round's pace).
        lead = math.ceil(self.cfg.matchmaking_time / self._step_seconds) if self._step_seconds else 0
        for i in range(h):
            if lead and i == max(0, h - lead) and self.averager is not None:
                early = self._begin_average()
            self.position, batch = next(batches)
            t0 = time.perf_counter()
            losses.append(self._inner_step(batch, i))
            self._clip_and_step()
            compute += time.perf_counter() - t0
            on_step(i + 1, losses[-1])
        self._step_seconds = compute / h
        t0 = time.perf_counter()
        with torch.no_grad():
            update = [g.detach() - p.detach() for g, p in zip(self.global_params, self.model.params, strict=True)]
            if self.cfg.byzantine:
                self._poison_(update)
            if self.privacy is not None:
                self.privacy.privatize_(update)
        compute += time.perf_counter() - t0
        result = self._average(update, early)
        if result is None:  # keep local progress: the next round's pseudo-gradient includes it
            self._averaging_failed()
            return losses, compute, 0
        self.failures = 0
        averaged, gathered = result
        self.group = sorted(str(peer) for peer in gathered)
        self.update_digest = tensors_digest(zip(self.model.names, averaged, strict=True))
        base = self._group_base(gathered)
        if base != self._sent_base:  # we started elsewhere: our outer step would be wrong
            self._resync(base)
            return losses, compute, len(gathered)
        t0 = time.perf_counter()
        for g, a in zip(self.global_params, averaged, strict=True):
            g.grad = a
        self.outer_opt.step()
        self.outer_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, g in zip(self.model.params, self.global_params, strict=True):
                p.copy_(g)
        self.round = base[0] + 1
        self._publish()
        compute += time.perf_counter() - t0
        return losses, compute, len(gathered)

    def _ddp_round(self, batches: Iterator[tuple[int, Tensor]], on_step: Any) -> tuple[list[float], float, int]:
        """The baseline: every step's gradients are averaged before the optimizer step.

        A one-sided failure (the others applied a step, we did not) leaves us off the group's state. Only
        the last step decides who is in step at the round's end: the peers whose last step applied the
        average from the group's own starting state publish the next round, the others download it. A
        sticky "strayed once this round" flag would not do: with a few failures per round every peer
        strays at some step, nobody publishes, and the run never advances."""
        compute, losses, group, in_step = 0.0, [], 0, False
        for i in range(self.cfg.inner_steps):
            self.position, batch = next(batches)
            t0 = time.perf_counter()
            losses.append(self._inner_step(batch, i))
            grads = [p.grad.detach() for p in self.model.params]
            if self.cfg.byzantine:
                self._poison_(grads)
            compute += time.perf_counter() - t0
            result = self._average(grads)
            t0 = time.perf_counter()
            if result is None:  # apply nothing rather than our own gradient: the others applied the average
                self._averaging_failed()
                self.inner_opt.zero_grad(set_to_none=True)
                on_step(i + 1, losses[-1])
                if self.round > self._sent_base[0]:  # caught up meanwhile: the others finished this round
                    return losses, compute, 0
                in_step = False
                continue
            self.failures = 0
            averaged, gathered = result
            self.group = sorted(str(peer) for peer in gathered)
            for p, a in zip(self.model.params, averaged, strict=True):
                p.grad = a
            group = len(gathered)
            in_step = self._group_base(gathered) == self._sent_base
            self._clip_and_step()
            with torch.no_grad():
                for g, p in zip(self.global_params, self.model.params, strict=True):
                    g.copy_(p)
            compute += time.perf_counter() - t0
            on_step(i + 1, losses[-1])
        if in_step:
            self.round += 1
            self._publish()
        elif group:
            self._resync(self._sent_base)
        return losses, compute, group

    def _averaging_failed(self) -> None:
        """A round that found no group, or whose all-reduce broke (`_average` already took the others'
        state if they moved on): give up after `patience` such rounds in a row."""
        if self.round > self._sent_base[0]:  # caught up with the others meanwhile
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.cfg.patience:
            raise NoPeersError(
                f"no group of {self.cfg.min_group_size} peers for {self.failures} rounds in a row: "
                "the other peers have left (lower --min-group-size to train with fewer)"
            )

    def _group_base(self, gathered: dict[Any, Any]) -> tuple[int, str]:
        """The (round, digest) most of the group started from; ties go to the highest, so every member
        picks the same one from the same gathered data."""
        bases = [(info["round"], info["digest"]) for info in gathered.values() if isinstance(info, dict)]
        return max(set(bases), key=lambda b: (bases.count(b), b)) if bases else self._sent_base

    def _resync(self, base: tuple[int, str]) -> None:
        """We averaged from another starting point than the group's: take the group's result from a
        member instead of applying ours (it publishes round base + 1 right after its outer step)."""
        logger.warning("round %d: this peer started from another state than its group: re-syncing", base[0] + 1)
        if not self.catch_up(at_least=base[0] + 1, wait=30.0):
            logger.warning("re-sync failed: no peer shares round %d yet; trying again next round", base[0] + 1)

    def run(self, progress: Any = None) -> list[RoundReport]:
        """Train until the global round reaches `cfg.rounds`. Returns this run's round reports (the
        first one is round 0, the starting weights' validation loss, when the run starts from scratch)."""
        cfg = self.cfg
        self.restore()
        if self.averager is not None:
            self.catch_up()
        self._publish()
        batches = self.shards.batches(cfg.batch_size, seed=cfg.seed, start=self.position)
        reports: list[RoundReport] = []
        if self.round == 0:
            reports.append(self._report([], 0.0, 0, time.perf_counter(), 0, progress))
        while self.round < cfg.rounds:
            wall0, sent0 = time.perf_counter(), self._bytes_sent()
            on_step = progress.step if progress is not None else (lambda i, loss: None)
            if progress is not None:
                progress.start_round(self.round, cfg.rounds)
            if self.membership is not None and not self.membership.publish():
                logger.warning("could not store our membership certificate in the DHT")
            run_round = self._diloco_round if cfg.mode == "diloco" else self._ddp_round
            losses, compute, group = run_round(batches, on_step)
            reports.append(self._report(losses, compute, group, wall0, self._bytes_sent() - sent0, progress))
            if group:
                self.save(reports[-1])
                self._record_round(reports[-1])
        return reports

    def _record_round(self, report: RoundReport) -> None:
        """Each member that completed the round signs it into the ledger (one writer would not do: its
        side of the all-reduce may be the one that broke), then pulls from another member, so each copy
        soon holds every round, attested by the members that took part."""
        if self.ledger_sync is None or not self.group:
            return
        cfg = self.cfg
        epsilon = report.epsilon if report.epsilon is not None and math.isfinite(report.epsilon) else None
        body = {"run": cfg.run_id, "round": report.round, "mode": cfg.mode, "participants": self.group}
        body |= {"aggregation": cfg.aggregation, "weights": report.digest, "epsilon": epsilon}
        self.ledger_sync.ledger.append("training_round", {**body, "update": self.update_digest})
        self.sync_ledger()

    def sync_ledger(self, wait: float = 0.0) -> None:
        """Pull the ledger entries we lack from another member of the last group. With `wait`, keep
        pulling for up to that many seconds until our copy holds the round we are at: a peer that took
        its last round's result by download signed nothing itself, and the members that did only linger
        a few seconds."""
        if self.ledger_sync is None or not self.group:
            return
        others = [p for p in self.group if p != self.identity.peer_id]
        deadline = time.monotonic() + wait
        while True:
            self.ledger_sync.pull_from_any(others)
            if self._ledger_holds_round(self.round) or time.monotonic() >= deadline:
                return
            time.sleep(1.0)

    def _ledger_holds_round(self, round_: int) -> bool:
        assert self.ledger_sync is not None
        return any(
            e.kind == "training_round" and e.body.get("run") == self.cfg.run_id and e.body.get("round") == round_
            for e in self.ledger_sync.ledger.entries
        )

    def _report(
        self, losses: list[float], compute: float, group: int, wall0: float, sent: int, progress: Any
    ) -> RoundReport:
        """Evaluate (after an averaged round, or at the start), log to rounds.jsonl and the progress."""
        val_loss = evaluate(self.model, self.val_blocks) if group or not losses else float("nan")
        report = RoundReport(
            round=self.round,
            train_loss=sum(losses) / len(losses) if losses else float("nan"),
            val_loss=val_loss,
            group_size=group,
            digest=self.digest(),
            tokens=self.cfg.batch_size * (self.shards.block_size - 1) * len(losses),
            compute_s=compute,
            wall_s=time.perf_counter() - wall0,
            bytes_sent=sent,
            epsilon=self.privacy.epsilon if self.privacy is not None else None,
            averaged=bool(group),
        )
        with self.log_path.open("a") as f:
            f.write(report.to_json() + "\n")
        if progress is not None and losses:
            progress.end_round(report)
        if not math.isnan(report.val_loss):
            self.curve.append((report.round, round(report.val_loss, 4)))
            self._announce(report)
        return report

    def _announce(self, report: RoundReport) -> None:
        """Put the run's progress and loss curve in the DHT, where a gateway's dashboard finds it. Every
        peer of the run writes the same entry (its peers hold the same weights and curve)."""
        if self.dht is None:
            return
        value = {"round": report.round, "group": report.group_size, "curve": self.curve[-CURVE_POINTS:]}
        self.dht.store(TRAINING_KEY, value, get_dht_time() + TRAINING_TTL, subkey=self.cfg.run_id, return_future=True)

    def _bytes_sent(self) -> int:
        return int(self.averager.bytes_sent.value) if self.averager is not None else 0

    # ---- checkpoints -------------------------------------------------------------------------------

    def save(self, report: RoundReport) -> None:
        tensors = {f"global.{i}": g for i, g in enumerate(self.global_params)}
        tensors |= {f"local.{i}": p for i, p in enumerate(self.model.params)}
        tensors |= _flatten_optimizer("inner", self.inner_opt)
        tensors |= _flatten_optimizer("outer", self.outer_opt)
        meta = {
            "position": self.position,
            "inner_steps_done": self.inner_steps_done,
            "names": self.model.names,
            "digest": report.digest,
            "val_loss": report.val_loss,
            "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "dp_history": self.privacy.accountant.history if self.privacy is not None else None,
            "model": self.train_identity(),
        }
        save_checkpoint(self.checkpoints, self.round, tensors, meta, keep=self.cfg.keep_checkpoints)
        if report.val_loss < self.best_val:
            self.best_val = report.val_loss
            mark_best(self.checkpoints, self.round, report.val_loss)

    def train_identity(self) -> dict[str, Any]:
        """What `eval` and `export` need to rebuild this model from a checkpoint."""
        cfg = self.cfg
        return {
            "size": cfg.size,
            "base_model": cfg.model,
            "lora_rank": cfg.lora_rank,
            "seed": cfg.seed,
            "config": self.model.config.to_hf(),
            "data": str(cfg.data),
        }

    def restore(self) -> bool:
        """Resume from this peer's newest intact checkpoint (a corrupt one is skipped). False if none."""
        found = latest_checkpoint(self.checkpoints)
        if found is None:
            return False
        tensors, meta = found
        if meta.get("names") != self.model.names:
            raise ValueError(f"{self.checkpoints}: checkpoint is of a different model than --size/--model")
        with torch.no_grad():
            for i, g in enumerate(self.global_params):
                g.copy_(tensors[f"global.{i}"])
            for i, p in enumerate(self.model.params):
                p.copy_(tensors[f"local.{i}"])
        _restore_optimizer("inner", self.inner_opt, tensors)
        _restore_optimizer("outer", self.outer_opt, tensors)
        self.round, self.position = int(meta["round"]), int(meta["position"])
        self.inner_steps_done = int(meta["inner_steps_done"])
        rng = torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8)
        torch.set_rng_state(rng)
        if self.privacy is not None and meta.get("dp_history"):
            self.privacy.accountant.history = [tuple(h) for h in meta["dp_history"]]
        if (best := best_round(self.checkpoints)) is not None:
            self.best_val = best[1]
        logger.info("resumed from %s at round %d", self.checkpoints, self.round)
        return True


def run_training(cfg: TrainConfig, export: Path | None = None) -> int:
    """`swarmlm train`: join the run's swarm, train until `cfg.rounds`, optionally export the best round."""
    import signal

    from swarmlm.train.evaluation import export_checkpoint
    from swarmlm.train.progress import TrainMetrics, TrainProgress

    def leave(*_: object) -> None:  # SIGTERM leaves like Ctrl-C: averager and DHT shut down cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, leave)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    try:
        trainer.connect()
        # One parseable line: local swarms (demo, tests) read it to point later peers at this one.
        print(f"swarmlm train: peer {trainer.dht.peer_id} at {' '.join(trainer.visible_maddrs())}", flush=True)
        tokens_per_step = cfg.batch_size * (trainer.shards.block_size - 1)
        with TrainProgress(cfg.inner_steps, tokens_per_step, TrainMetrics(cfg.metrics_port)) as progress:
            trainer.run(progress)
        trainer.sync_ledger(wait=4 * cfg.matchmaking_time + 2)  # while the last round's signers linger
        trainer.linger()
        trainer.sync_ledger()  # the last round's entries, signed by the other members meanwhile
        if export is not None:
            export_checkpoint(cfg.run_dir, export)
    except KeyboardInterrupt:
        return 130
    except NoPeersError as e:
        logger.error("%s", e)
        return 3
    finally:
        trainer.close()
    return 0
