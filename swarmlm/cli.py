"""The `swarmlm` command line."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

app = typer.Typer(
    help="Serve and train language models on a swarm of ordinary machines.", no_args_is_help=True, add_completion=False
)


@app.command()
def serve(
    model: Annotated[
        str | None, typer.Option(help="A .gguf file or HF model directory (default: embedded SmolLM2-135M-Instruct)")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    scheduler: Annotated[str, typer.Option(help="mlfq (FastServe skip-join MLFQ) or fcfs")] = "mlfq",
    fair: Annotated[bool, typer.Option(help="Per-user fairness (virtual token counters) over the scheduler")] = False,
    kv_budget: Annotated[int | None, typer.Option(help="KV cache budget in bytes (default: from free memory)")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    quant: Annotated[str, typer.Option(help="Weight-only quantization on CPU: none, int8 or int4")] = "none",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    max_batch_seqs: Annotated[int, typer.Option(help="Most sequences in one step")] = 32,
    max_step_tokens: Annotated[int, typer.Option(help="Most tokens in one step (prefill chunk budget)")] = 256,
    max_model_len: Annotated[int | None, typer.Option(help="Context limit (default: the model's)")] = None,
    max_queued_requests: Annotated[int, typer.Option(help="Queue bound; beyond it requests get 429")] = 256,
    mlfq_quantum: Annotated[float, typer.Option(help="MLFQ base quantum in seconds (doubles per level)")] = 0.25,
    starvation: Annotated[float, typer.Option(help="MLFQ: seconds of waiting before promotion to the top")] = 10.0,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    from swarmlm.model.checkpoint import CheckpointError
    from swarmlm.serve.server import ServeConfig, run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if scheduler not in ("mlfq", "fcfs"):
        raise typer.BadParameter("choose mlfq or fcfs", param_hint="--scheduler")
    cfg = ServeConfig(
        model=model,
        host=host,
        port=port,
        scheduler=scheduler,
        fair=fair,
        kv_budget=kv_budget,
        dtype=dtype,
        quant=quant,
        device=device,
        max_batch_seqs=max_batch_seqs,
        max_step_tokens=max_step_tokens,
        max_model_len=max_model_len,
        max_queued_requests=max_queued_requests,
        mlfq_quantum=mlfq_quantum,
        starvation=starvation,
    )
    try:
        code = run_server(cfg)
    except (CheckpointError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    raise typer.Exit(code)


@app.command()
def demo(
    port: int = 8000,
    prompt: str = "In two sentences, why do bees dance?",
    once: Annotated[bool, typer.Option(help="Exit after the answer instead of serving until Ctrl-C")] = False,
) -> None:
    """Start a server on the embedded model, stream a chat answer through the openai client, keep serving."""
    from swarmlm.demo import run_demo

    raise typer.Exit(run_demo(port, prompt, once))


if __name__ == "__main__":
    app()
