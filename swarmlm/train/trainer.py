"""One training peer: DiLoCo rounds (or synchronous data-parallel steps) averaged over the swarm.

A DiLoCo round on each peer (Douillard et al., 2023):

1. `H` inner AdamW steps on the peer's own data, starting from the swarm's global weights;
2. pseudo-gradient = global weights - local weights (optionally poisoned, for attack tests; optionally
   clipped and noised for differential privacy);
3. robust all-reduce of the pseudo-gradients with whoever is in the group (`allreduce.py`);
4. outer Nesterov SGD step on the global weights with the averaged pseudo-gradient; local = global.

Every member of a group receives bit-identical averages and applies the same outer step to the same
global weights: after a round all members hold weights of one digest. Each member sends its round and
digest along (hivemind's gather): one that started elsewhere than the group's majority downloads the state
afterwards. A round whose averaging fails keeps the local progress: the next pseudo-gradient covers it.

The `Trainer` owns the training state and the round loop; `swarm_link.py` its place in the swarm,
`replica.py` the state peers hold in common and a newcomer downloads, `outer.py` DiLoCo's outer step,
`checkpointer.py` the files (`state_dict()` is a checkpoint).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from hivemind.averaging.control import StepControl
from torch import Tensor

from swarmlm.core.identity import Identity
from swarmlm.model.loading import tensors_digest
from swarmlm.train.aggregation import poison_
from swarmlm.train.checkpointer import Checkpointer, restore_rng_state, rng_state
from swarmlm.train.data import TokenShards, load_data_tokenizer
from swarmlm.train.evaluation import evaluate, run_identity
from swarmlm.train.inner import InnerOptimizer
from swarmlm.train.model import TrainableModel, build_model
from swarmlm.train.outer import OuterOptimizer, copy_into
from swarmlm.train.privacy import PeerPrivacy
from swarmlm.train.progress import TrainProgress
from swarmlm.train.replica import Replica
from swarmlm.train.round_report import RoundReport
from swarmlm.train.swarm_link import Gathered, SwarmLink, group_base
from swarmlm.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, float], None]  # (inner steps done this round, last loss)
Batches = Iterator[tuple[int, Tensor]]  # (data position after the batch, the batch)


class NoPeersError(RuntimeError):
    """The run cannot go on: not enough peers to average with."""


class Trainer:
    """A peer's training state and round loop; `Stateful`: its `state_dict()` is what a checkpoint holds."""

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
        # Held wherever the weights or the round change: a pipeline stage's server and a newcomer's state
        # download read them from other threads.
        self.weights_lock = threading.RLock()
        self.model: TrainableModel = self._build_model(train.vocab_size, train.block_size, eos)
        params = self.model.params
        self.outer = OuterOptimizer(params, cfg.outer_lr, cfg.outer_momentum)
        self.inner = InnerOptimizer(params, cfg)
        self.privacy = PeerPrivacy(cfg.dp_clip, cfg.dp_noise, cfg.dp_delta) if cfg.dp_noise is not None else None
        self.replica = Replica(cfg.mode, self.model.names, params, self.outer, self.inner, self.weights_lock)
        self.position = 0  # batches drawn from this peer's data so far
        self.checkpointer = Checkpointer(cfg.run_dir / "checkpoints")
        self.log_path = cfg.run_dir / "rounds.jsonl"
        self._sent_base: tuple[int, str] = (0, "")
        self.failures = 0  # averaging attempts failed in a row
        self.curve: list[tuple[int, float]] = []  # (round, validation loss)
        self._step_seconds = 0.0  # the last round's mean step time
        self.identity = Identity.from_option(cfg.identity)  # signs this peer's ledger entries
        self.link: SwarmLink | None = None
        self.group: list[str] = []  # peer ids of the last round's group, sorted
        self.update_digest: str | None = None  # of the last round's averaged pseudo-gradient (DiLoCo)

    def _build_model(self, vocab_size: int, context: int, eos: int | None) -> TrainableModel:
        return build_model(self.cfg, vocab_size, context, eos)

    @property
    def global_params(self) -> list[Tensor]:
        """The swarm's agreed weights: what every round starts from and what the outer optimizer moves."""
        return self.outer.params

    # ---- the swarm ---------------------------------------------------------------------------------

    def connect(self) -> SwarmLink:
        cfg, names = self.cfg, self.model.names
        self.link = SwarmLink(cfg, self.identity, self.replica, self.global_params, names, None, self.model.params)
        return self.link

    @property
    def swarm(self) -> SwarmLink:
        assert self.link is not None, "not connected"
        return self.link

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    @property
    def round(self) -> int:
        """The global round this peer's weights are at (its replica's: a download moves it)."""
        return self.replica.round

    @round.setter
    def round(self, value: int) -> None:
        self.replica.round = value

    def publish(self) -> None:
        """Offer our state at our round to newcomers (after a round's end, at the start)."""
        self.replica.refresh()
        if self.link is not None:
            self.link.offer(self.round)

    def _average(self, refill: Callable[[list[Tensor]], None], early: StepControl | None = None) -> Gathered | None:
        """All-reduce the buffers' update; `refill` rewrites it after a broken attempt (see SwarmLink.average)."""
        if early is None:
            self._sent_base = (self.round, self.replica.digest())
        return self.swarm.average(self._sent_base, refill, early)

    def _begin_average(self, whole_round: bool = False) -> StepControl:
        self._sent_base = (self.round, self.replica.digest())
        return self.swarm.begin_average(self._sent_base, whole_round)

    # ---- training ----------------------------------------------------------------------------------

    def _inner_step(self, batch: Tensor, step_in_round: int) -> float:
        self.inner.schedule(self.cfg, self.round, step_in_round)
        loss = self.model.loss(batch)
        loss.backward()
        return loss.item()

    def _clip_and_step(self) -> None:
        with self.weights_lock:
            self.inner.step()

    def _diloco_round(self, batches: Batches, on_step: StepCallback) -> tuple[list[float], float, int]:
        compute, losses, early = 0.0, [], None
        h = self.cfg.inner_steps
        # Matchmaking starts a matchmaking time's worth of steps before the end (at the last round's pace);
        # a peer that just downloaded the state queues at its first step, so the group waits for it.
        late, self.replica.downloaded = self.replica.downloaded, False
        lead = math.ceil(self.cfg.matchmaking_time / self._step_seconds) if self._step_seconds else 0
        begin = 0 if late else max(0, h - lead) if lead else None  # the step at which matchmaking starts
        for i in range(h):
            if i == begin and self.link is not None:
                early = self._begin_average(whole_round=late)
            self.position, batch = next(batches)
            t0 = time.perf_counter()
            losses.append(self._inner_step(batch, i))
            self._clip_and_step()
            compute += time.perf_counter() - t0
            on_step(i + 1, losses[-1])
        self._step_seconds = compute / h
        t0 = time.perf_counter()
        with self.swarm.update_buffers() as update, torch.no_grad():
            self._write_pseudo_gradient(update)
        compute += time.perf_counter() - t0
        gathered = self._average(self._write_pseudo_gradient, early)
        if gathered is None:  # keep local progress: the next round's pseudo-gradient includes it
            self._averaging_failed()
            return losses, compute, 0
        self.failures = 0
        self.group = sorted(str(peer) for peer in gathered)
        base = group_base(gathered, self._sent_base)
        t0 = time.perf_counter()
        with self.swarm.update_buffers() as averaged:
            self.update_digest = tensors_digest(zip(self.model.names, averaged, strict=True))
            if base == self._sent_base:  # else we started elsewhere: our outer step would be wrong
                with self.weights_lock:
                    self.outer.step(averaged)
                    copy_into(self.model.params, self.global_params)
                    self.round = base[0] + 1
        if base != self._sent_base:
            self._resync(base)
            return losses, compute, len(gathered)
        self.publish()
        compute += time.perf_counter() - t0
        return losses, compute, len(gathered)

    def _ddp_round(self, batches: Batches, on_step: StepCallback) -> tuple[list[float], float, int]:
        """The baseline: every step's gradients are averaged before the optimizer step.

        A one-sided failure (the others applied a step, we did not) leaves us off the group's state. The
        last step alone decides who is in step at the round's end (peers whose last step applied the
        group's average publish the next round, the others download it): with a sticky "strayed once"
        flag, a few failures a round would leave nobody to publish."""
        compute, losses, group, in_step, start = 0.0, [], 0, False, self.round
        for i in range(self.cfg.inner_steps):
            self.position, batch = next(batches)
            t0 = time.perf_counter()
            losses.append(self._inner_step(batch, i))
            grads = [p.grad for p in self.model.params]
            with self.swarm.update_buffers() as buffers:
                self._write_gradients(buffers)
            compute += time.perf_counter() - t0
            gathered = self._average(self._write_gradients)
            t0 = time.perf_counter()
            if gathered is None:  # apply nothing rather than our own gradient: the others applied the average
                self._averaging_failed()
                self.inner.zero_grad()
                on_step(i + 1, losses[-1])
                if self.round > self._sent_base[0]:  # caught up meanwhile: the others finished this round
                    return losses, compute, 0
                in_step = False
                continue
            self.failures = 0
            self.group = sorted(str(peer) for peer in gathered)
            with self.swarm.update_buffers() as averaged:
                copy_into(grads, averaged)
            group = len(gathered)
            in_step = group_base(gathered, self._sent_base) == self._sent_base
            self._clip_and_step()
            copy_into(self.global_params, self.model.params)
            compute += time.perf_counter() - t0
            on_step(i + 1, losses[-1])
        if in_step:
            self.round += 1
            self.publish()
        elif group:
            self._resync(self._sent_base)
        return losses, compute, group if self.round > start else 0  # a re-sync that failed averaged nothing

    def _write_pseudo_gradient(self, update: list[Tensor]) -> None:
        """DiLoCo's update: global - local weights, poisoned or privatized (a rewrite is a DP release too)."""
        with self.weights_lock:  # a pipeline stage's server steps the local weights from its own thread
            self.outer.pseudo_gradient(self.model.params, out=update)
        if self.cfg.byzantine:
            poison_(update, self.cfg.byzantine, self.cfg.byzantine_scale)
        if self.privacy is not None:
            self.privacy.privatize_(update)

    def _write_gradients(self, buffers: list[Tensor]) -> None:
        """DDP's update: this step's gradients (poisoned if configured)."""
        copy_into(buffers, [p.grad for p in self.model.params])
        if self.cfg.byzantine:
            poison_(buffers, self.cfg.byzantine, self.cfg.byzantine_scale)

    def _averaging_failed(self) -> None:
        """A round with no group, or a broken all-reduce: give up after `patience` such rounds in a row."""
        if self.round > self._sent_base[0]:  # caught up with the others meanwhile
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.cfg.patience:
            raise NoPeersError(
                f"no group of {self.cfg.min_group_size} peers for {self.failures} rounds in a row: "
                "the other peers have left (lower --min-group-size to train with fewer)"
            )

    def _resync(self, base: tuple[int, str]) -> None:
        """We started elsewhere than the group: take its result (round base + 1) from a member instead."""
        logger.warning("round %d: this peer started from another state than its group: re-syncing", base[0] + 1)
        if not self.swarm.catch_up(at_least=base[0] + 1, wait=30.0):
            logger.warning("re-sync failed: no peer shares round %d yet; trying again next round", base[0] + 1)

    # ---- the round loop ----------------------------------------------------------------------------

    def run(self, progress: TrainProgress | None = None) -> list[RoundReport]:
        """Train until the global round reaches `cfg.rounds`. Returns this run's round reports (the
        first one is round 0, the starting weights' validation loss, when the run starts from scratch)."""
        cfg = self.cfg
        self.restore()
        if self.link is not None:
            self.link.catch_up()
        self.publish()
        batches = self.shards.batches(cfg.batch_size, seed=cfg.seed, start=self.position)
        reports: list[RoundReport] = []
        if self.round == 0:
            reports.append(self._report([], 0.0, 0, time.perf_counter(), 0, progress))
            if self.link is not None:
                self.link.wait_for_peers(max(cfg.min_peers, cfg.min_group_size), cfg.start_wait)
        if progress is not None:
            progress.start_run(self.round, cfg.rounds)
        while self.round < cfg.rounds:
            wall0, sent0 = time.perf_counter(), self.link.bytes_sent() if self.link else 0
            on_step = progress.step if progress is not None else (lambda i, loss: None)
            if progress is not None:
                progress.start_round(self.round, cfg.rounds)
            if self.link is not None:
                self.link.publish_membership()
            run_round = self._diloco_round if cfg.mode == "diloco" else self._ddp_round
            losses, compute, group = run_round(batches, on_step)
            sent = (self.link.bytes_sent() if self.link else 0) - sent0
            reports.append(self._report(losses, compute, group, wall0, sent, progress))
            if group:
                self.save(reports[-1].val_loss)
                if self.link is not None and self.link.ledger is not None:
                    self.link.ledger.record(reports[-1], self.group, self.update_digest)
        if not self.checkpointer.holds(self.round):  # the round we hold was taken by download
            self.save(evaluate(self.model, self.val_blocks, self.cfg.batch_size))
        return reports

    def _report(
        self, losses: list[float], compute: float, group: int, wall0: float, sent: int, progress: TrainProgress | None
    ) -> RoundReport:
        """Evaluate (after an averaged round, or at the start), log to rounds.jsonl and the progress."""
        val_loss = evaluate(self.model, self.val_blocks, self.cfg.batch_size) if group or not losses else float("nan")
        report = RoundReport(
            round=self.round,
            train_loss=sum(losses) / len(losses) if losses else float("nan"),
            val_loss=val_loss,
            group_size=group,
            digest=self.replica.digest(),
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
            if self.link is not None:
                self.link.announce(report.round, report.group_size, self.curve)
        return report

    def finish(self) -> None:
        """After the last round: linger for stragglers and collect the last round's ledger entries."""
        if self.link is not None:
            self.link.wind_down(self.group, self.round)

    # ---- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """All a restarted peer (and `eval`/`export`) needs: weights, optimizers, round, data, RNG, privacy."""
        local = {f"local.{i}": p for i, p in enumerate(self.model.params)}
        state: dict[str, Any] = self.outer.state_dict() | local | self.inner.state_dict()
        return state | {
            "round": self.round,
            "position": self.position,
            "names": self.model.names,
            "digest": self.replica.digest(),
            "rng": rng_state(),
            "dp_history": self.privacy.accountant.history if self.privacy is not None else None,
            "model": run_identity(self.cfg, self.model),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("names") != self.model.names:
            raise ValueError("checkpoint is of a different model than --size/--model")
        with self.weights_lock:
            self.outer.load_state_dict(state)
            copy_into(self.model.params, [state[f"local.{i}"] for i in range(len(self.model.params))])
            self.inner.load_state_dict(state)
            self.round, self.position = int(state["round"]), int(state["position"])
        restore_rng_state(state["rng"])
        if self.privacy is not None and state.get("dp_history"):
            self.privacy.accountant.history = [tuple(h) for h in state["dp_history"]]

    def save(self, val_loss: float) -> None:
        with self.weights_lock:  # the tensors are written as they are, uncopied: nothing may step meanwhile
            self.checkpointer.save(self, self.round, val_loss, keep=self.cfg.keep_checkpoints)

    def restore(self) -> bool:
        """Resume from this peer's newest intact checkpoint (a corrupt one is skipped). False if none."""
        return self.checkpointer.restore(self) is not None
