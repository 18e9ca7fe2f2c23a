"""`swarmlm train`: one training peer from start to exit code, as a person at a terminal sees it.

It prints the peer's address (others join with `--initial-peers`), shows the progress bar and a log line
per round, writes hivemind's own log to `RUN_DIR/hivemind.log`, and ends with a summary line. Exit codes:
0 done, 3 no peers left to average with (`--patience`), 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from swarmlm.core.heap import hold_little_freed_memory
from swarmlm.train.evaluation import export_checkpoint
from swarmlm.train.pipeline_trainer import PipelineTrainer, make_trainer
from swarmlm.train.progress import TrainMetrics, TrainProgress, run_summary
from swarmlm.train.train_config import TrainConfig
from swarmlm.train.trainer import NoPeersError

logger = logging.getLogger(__name__)


def hivemind_logs_to(path: Path) -> None:
    """hivemind's own log lines (matchmaking retries, "could not find a group" tracebacks, the p2p
    daemon's output) go to a file: on a terminal they ran through the progress bar, and what matters in
    them this peer says itself, in one line (a failed round, a download). The DHT and averager processes
    are forked after this, so theirs go there too."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")  # drop hivemind's own stderr handler
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    hivemind = logging.getLogger("hivemind")
    hivemind.handlers = [handler]
    hivemind.propagate = False
    hivemind.setLevel(logging.INFO)


def run_training(cfg: TrainConfig, export: Path | None = None) -> int:
    """Join the run's swarm, train until `cfg.rounds`, optionally export the best round."""

    def leave(*_: object) -> None:  # SIGTERM leaves like Ctrl-C: averager and DHT shut down cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, leave)
    hold_little_freed_memory()  # every step frees and reallocates its gradients and activations: core/heap.py
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    hivemind_logs_to(cfg.run_dir / "hivemind.log")
    trainer = make_trainer(cfg)
    try:
        link = trainer.connect()
        # One parseable line: local swarms (demo, tests) read it to point later peers at this one.
        print(f"swarmlm train: peer {link.peer_id} at {' '.join(link.visible_maddrs())}", flush=True)
        if isinstance(trainer, PipelineTrainer):
            a, b = trainer.layers
            print(
                f"swarmlm train: pipeline stage {trainer.stage} of {cfg.pipeline_stages} (layers {a}:{b})", flush=True
            )
        tokens_per_step = cfg.batch_size * (trainer.shards.block_size - 1)
        with TrainProgress(cfg.inner_steps, tokens_per_step, TrainMetrics(cfg.metrics_port)) as progress:
            reports = trainer.run(progress)
        trainer.finish()
        checkpoints = trainer.checkpointer
        print(run_summary(reports, trainer.round, cfg.rounds, checkpoints.last, checkpoints.best()), flush=True)
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
