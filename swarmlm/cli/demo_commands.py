"""`swarmlm demo` and `swarmlm demo train`: the embedded model and corpus, end to end on this machine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from swarmlm.cli.exits import exit_with
from swarmlm.cli.logs import setup_logging

demo_app = typer.Typer(
    help="Demos on the embedded model and corpus (without a subcommand: serve a local swarm).",
    invoke_without_command=True,
)


@demo_app.callback()
def demo(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port of the gateway")] = 8000,
    prompt: Annotated[str, typer.Option(help="The chat message sent")] = "In two sentences, why do bees dance?",
    once: Annotated[bool, typer.Option(help="Exit after the answer instead of serving until Ctrl-C")] = False,
) -> None:
    """Start a local swarm on the embedded model, stream a chat answer through the openai client, keep serving."""
    if ctx.invoked_subcommand is not None:
        return
    from swarmlm.launch.demo_serve import run_demo

    raise typer.Exit(run_demo(port, prompt, once))


@demo_app.command("train")
def demo_train(
    work_dir: Annotated[Path, typer.Option(help="Data, checkpoints and the exported model")] = Path("demo-train"),
    rounds: Annotated[int, typer.Option(help="DiLoCo rounds")] = 12,
    inner_steps: Annotated[int, typer.Option(help="Inner steps per round (H)")] = 50,
    port: Annotated[int, typer.Option(help="Port of the gateway that serves the trained model")] = 8000,
    prompt: Annotated[str, typer.Option(help="The prompt the trained model completes")] = "ROMEO:",
) -> None:
    """Three peers train a tiny model from scratch (one is killed and restarts), then a swarm serves it."""
    from swarmlm.launch.demo_train import run_train_demo

    setup_logging(logging.WARNING)
    exit_with(run_train_demo, work_dir, rounds, inner_steps, port, prompt)
