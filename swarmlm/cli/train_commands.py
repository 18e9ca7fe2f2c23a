"""`swarmlm train`, `eval`, `export` and `data prepare`: training a model with the swarm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from swarmlm.cli.exits import exit_with, fail
from swarmlm.cli.input_checks import check_multiaddrs
from swarmlm.cli.logs import setup_logging
from swarmlm.cli.options import config_options
from swarmlm.train.train_config import PrepareConfig, TrainConfig

CheckpointArgument = Annotated[Path, typer.Argument(help="A training run folder (its best round) or a round-*.json")]


@config_options(cfg=TrainConfig)
def train(
    cfg: TrainConfig,
    threads: Annotated[int | None, typer.Option(help="CPU threads for compute (default: all cores)")] = None,
    export: Annotated[Path | None, typer.Option(help="At the end, export the best round as an HF directory")] = None,
) -> None:
    """Train with the swarm: DiLoCo rounds on this peer's own data, averaged with the peers present."""
    check_multiaddrs(cfg.initial_peers, "--initial-peers", need_peer_id=True)
    check_multiaddrs(cfg.host_maddrs, "--host-maddrs")
    from swarmlm.train.training_run import run_training

    setup_logging(logging.INFO)  # after the import: opacus configures the root logger when imported
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    exit_with(run_training, cfg, export)


def evaluate(
    checkpoint: CheckpointArgument,
    data: Annotated[Path | None, typer.Option(help="A prepared data folder: its validation split is used")] = None,
    blocks: Annotated[int, typer.Option(help="Most validation blocks to use")] = 256,
    tasks: Annotated[
        str | None, typer.Option(help="lm-evaluation-harness tasks to score the model on, comma-separated")
    ] = None,
    include_path: Annotated[Path | None, typer.Option(help="With --tasks: a folder of task YAMLs of your own")] = None,
    limit: Annotated[int | None, typer.Option(help="With --tasks: at most this many documents a task")] = None,
) -> None:
    """Validation loss and perplexity of a training checkpoint (--data), or its lm-eval scores (--tasks)."""
    if (data is None) == (tasks is None):
        fail("give --data (validation loss) or --tasks (lm-evaluation-harness)")
    if tasks is not None:
        from swarmlm.train.harness import run_harness

        exit_with(run_harness, checkpoint, [t for t in tasks.split(",") if t], include_path, limit)
    from swarmlm.train.evaluation import evaluate_checkpoint

    exit_with(evaluate_checkpoint, checkpoint, data, blocks)


def export_model(
    checkpoint: CheckpointArgument,
    out: Annotated[Path, typer.Option(help="The HF directory to write (config, safetensors, tokenizer)")],
    adapter: Annotated[
        bool,
        typer.Option(
            "--adapter", help="A LoRA run: write its adapters alone, a peft adapter folder for --adapters NAME=OUT"
        ),
    ] = False,
) -> None:
    """Export a trained model as an HF directory that `swarmlm serve` and `swarmlm peer` load."""
    from swarmlm.train.evaluation import export_checkpoint

    exit_with(export_checkpoint, checkpoint, out, adapter)


data_app = typer.Typer(
    help="Training data: clean, tokenize and pack text into checksummed token shards.", no_args_is_help=True
)


@data_app.command("prepare")
@config_options(cfg=PrepareConfig)
def data_prepare(
    cfg: PrepareConfig,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (its old shards are replaced)")],
    sources: Annotated[
        list[Path] | None,
        typer.Argument(help="Text files, folders (*.txt, *.md, *.jsonl) or JSONL files (default: Shakespeare's plays)"),
    ] = None,
) -> None:
    """Clean, deduplicate and tokenize text; pack it into train/val shards with a checksummed manifest."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from swarmlm.train.data import prepare

    def run(srcs: list[Path]) -> int:
        m = prepare(srcs, out, cfg)
        st = m.stats
        tok = "trained BPE (tokenizer/)" if m.tokenizer["kind"] == "trained" else m.tokenizer["model"]
        table = Table(title=f"swarmlm data prepare → {out}")
        table.add_column("", style="bold")
        table.add_column("count", justify="right")
        for name, value in [
            ("files", st.files),
            ("files skipped", st.files_skipped),
            ("documents", st.documents),
            ("lines read", st.lines_read),
            ("lines kept", st.lines_kept),
            ("empty dropped", st.empty_dropped),
            ("duplicates removed", st.duplicates_removed),
            ("boilerplate dropped", st.boilerplate_dropped),
            ("bad JSONL lines", st.bad_jsonl_lines),
            ("characters", st.characters),
            ("tokens", st.tokens),
            ("train blocks", st.train_blocks),
            ("val blocks", st.val_blocks),
            ("shards", m.num_shards),
        ]:
            table.add_row(name, f"{value:,}")
        console = Console()
        console.print(table)
        for skipped in m.skipped:
            console.print(Text.assemble(("skipped ", "yellow"), skipped.describe()), soft_wrap=True)
        console.print(f"tokenizer: {tok}, vocab {m.vocab_size:,}; {m.block_size} tokens per block ({m.dtype})")
        return 0

    exit_with(run, sources or [])
