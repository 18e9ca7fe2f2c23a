"""A peer of a pipeline-trained run: the DiLoCo `Trainer`, holding and training one stage of the model.

`swarmlm train --pipeline-stages K` splits the model into K stages (pipeline_stage.stage_layers). A peer
joins the DHT, takes the stage the fewest peers announce (or the one its run folder says it had), and
builds only that stage: its weights, gradients and optimizer state are all it holds. Its inner steps
drive micro-batches of its own data through every stage (pipeline_model.py), and it serves the other
peers' micro-batches through its stage (pipeline_stage.py): each micro-batch's backward pass through the
stage, its own or another peer's, is one optimizer step of the stage. Rounds average the stage's
weights with the other peers of the same stage: the stage is a DiLoCo run of its own (run id
RUN-stageS), so matchmaking, robust aggregation, catch-up, checkpoints and the ledger are the Trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable

import torch

from swarmlm.core.dht import start_dht
from swarmlm.core.files import atomic_write
from swarmlm.core.identity import Identity
from swarmlm.model.llama import LlamaSpan
from swarmlm.model.loading import DTYPES
from swarmlm.train.evaluation import evaluate
from swarmlm.train.model import init_weights_by_name
from swarmlm.train.pipeline_model import NoStagePeerError, PipelineModel, StagePeers
from swarmlm.train.pipeline_stage import StageServer, stage_layers
from swarmlm.train.progress import TrainProgress
from swarmlm.train.round_report import RoundReport
from swarmlm.train.swarm_link import SwarmLink
from swarmlm.train.train_config import TrainConfig, preset_config
from swarmlm.train.trainer import Trainer

logger = logging.getLogger(__name__)
LINGER_LIMIT = 1800.0  # at most this long serving others after our own rounds
QUIET_CHECKS = 10.0  # seconds between the two checks that find nobody training before we evaluate
FINAL_EVAL = "final_eval.json"  # in the run folder: the validation loss of the pipeline once nobody trains


def make_trainer(cfg: TrainConfig) -> Trainer:
    """The peer `cfg` asks for: a stage of a pipeline-trained model, or a whole-model DiLoCo trainer."""
    return PipelineTrainer(cfg) if cfg.pipeline_stages else Trainer(cfg)


class PipelineTrainer(Trainer):
    def __init__(self, cfg: TrainConfig) -> None:
        self.base_run_id, self.stages = cfg.run_id, cfg.pipeline_stages
        identity = Identity.from_option(cfg.identity)
        dht = start_dht(cfg.initial_peers, cfg.host_maddrs, identity)
        self._dht = dht
        try:
            self.peers = StagePeers(dht, cfg.run_id, self.stages, retry_window=cfg.averaging_timeout)
            self.stage = self._choose_stage(cfg)
            super().__init__(dataclasses.replace(cfg, run_id=f"{cfg.run_id}-stage{self.stage}"))
        except BaseException:
            dht.shutdown()
            raise
        self.identity = identity  # the DHT's: it signs this peer's ledger entries
        self.server: StageServer | None = None

    def _choose_stage(self, cfg: TrainConfig) -> int:
        """The stage this run folder held before (a restart), else the stage the fewest peers hold."""
        marker = cfg.run_dir / "pipeline.json"
        if marker.exists():
            held = json.loads(marker.read_text())
            if held.get("stages") == self.stages:
                self.peers.note_joining()  # a restart: peers done with their rounds wait while we load
                return int(held["stage"])
        stage = self.peers.choose_stage()
        atomic_write(marker, json.dumps({"stage": stage, "stages": self.stages}))
        return stage

    @property
    def layers(self) -> tuple[int, int]:
        assert isinstance(self.model, PipelineModel)
        return self.model.module.start, self.model.module.end  # type: ignore[return-value]

    def _build_model(self, vocab_size: int, context: int, eos: int | None) -> PipelineModel:
        # Untied: the embeddings live on the first stage, the head on the last.
        config = dataclasses.replace(preset_config(self.cfg.size, vocab_size, context, eos), tie_word_embeddings=False)
        start, end = stage_layers(config, self.stages)[self.stage]
        span = LlamaSpan(config, start, end)
        init_weights_by_name(span, self.cfg.seed)
        span.to(DTYPES[self.cfg.dtype]).train().requires_grad_(True)
        named = list(span.named_parameters())
        return PipelineModel(
            span, config, [n for n, _ in named], [p for _, p in named], self.stage, self.stages, self.peers
        )

    def connect(self) -> SwarmLink:
        self.link = SwarmLink(
            self.cfg, self.identity, self.replica, self.global_params, self.model.names, self._dht, self.model.params
        )
        module = self.model.module
        assert isinstance(module, LlamaSpan)
        self.server = StageServer(
            module,
            self.model.params,
            self.stage,
            self.stages,
            self.base_run_id,
            self.weights_lock,
            self._step,
        )
        self.peers.attach(self.link.loop, self.link.p2p, self.server)
        self.link.loop.run(self.server.add_p2p_handlers(self.link.p2p), 30)
        self.peers.announce(self.stage)
        return self.link

    def _step(self, grads: list[torch.Tensor]) -> None:
        """One optimizer step per micro-batch through our stage (the server calls it, holding the lock)."""
        for p, g in zip(self.model.params, grads, strict=True):
            p.grad = g
        self.inner.step()

    def _clip_and_step(self) -> None:
        """Nothing left to do after our micro-batch: its backward pass stepped every stage it went through."""

    def run(self, progress: TrainProgress | None = None) -> list[RoundReport]:
        """Wait (up to --start-wait) until every stage has a peer, then train; then say we are done
        training (we go on serving our stage while connected: `finish` waits for the others)."""
        self.peers.wait_for_every_stage(self.cfg.start_wait)
        self.peers.mark_done(False)
        reports = super().run(progress)
        self.peers.mark_done()
        return reports

    def finish(self) -> None:
        """Our rounds are done: serve our stage while other peers of the run still train (their micro-batches
        need every stage); once nobody trains, evaluate the whole pipeline's end state (written to the run
        folder's final_eval.json) and serve until the others have too, then linger as every trainer does."""
        self.peers.mark_evaluated(False)
        deadline = time.monotonic() + LINGER_LIMIT
        # Nobody training twice in a row, QUIET_CHECKS apart: a crashed peer's note expires some 15 s after
        # it died, and its restart notes itself only once its process is up.
        self._serve_while(self.peers.others_training, "train", deadline, checks=2)
        try:
            val_loss = evaluate(self.model, self.val_blocks, self.cfg.batch_size)
        except NoStagePeerError as e:  # a stage left meanwhile: our rounds are done all the same
            logger.warning("no final evaluation of the pipeline: %s", e)
        else:
            atomic_write(self.cfg.run_dir / FINAL_EVAL, json.dumps({"round": self.round, "val_loss": val_loss}))
            logger.info("final evaluation of the pipeline after round %d: validation loss %.4f", self.round, val_loss)
        self.peers.mark_evaluated(True)
        self._serve_while(self.peers.others_evaluating, "evaluate", deadline, checks=1)
        super().finish()

    def _serve_while(self, others: Callable[[], int], doing: str, deadline: float, checks: int) -> None:
        """Serve our stage until `checks` checks in a row, QUIET_CHECKS apart, find no other peer still
        `doing` it (`others` counts them), or until `deadline`."""
        quiet = 0
        while time.monotonic() < deadline:
            if pending := others():
                logger.info("serving stage %d while %d other peer(s) still %s", self.stage, pending, doing)
                quiet = 0
                time.sleep(2.0)
                continue
            quiet += 1
            if quiet == checks:
                return
            time.sleep(QUIET_CHECKS)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.peers.close()
        if self.link is None:  # never connected: the DHT is still ours to stop
            self._dht.shutdown()
        super().close()
