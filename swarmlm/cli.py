"""The `swarmlm` command line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer

T = TypeVar("T")

app = typer.Typer(
    help="Serve and train language models on a swarm of ordinary machines.", no_args_is_help=True, add_completion=False
)


ModelOption = Annotated[
    str | None, typer.Option(help="A .gguf file or HF model directory (default: embedded SmolLM2-135M-Instruct)")
]


def _exit_with(run: Callable[[T], int], cfg: T) -> NoReturn:
    """Run a long-lived command; a bad model or setting is one red line and exit code 2, not a traceback."""
    from swarmlm.model.checkpoint import CheckpointError

    try:
        code = run(cfg)
    except (CheckpointError, ValueError, OSError) as e:  # OSError: an address already in use
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    raise typer.Exit(code)


@app.command()
def serve(
    model: ModelOption = None,
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
    _exit_with(run_server, cfg)


@app.command()
def peer(
    model: ModelOption = None,
    initial_peers: Annotated[
        list[str] | None, typer.Option("--initial-peers", help="Multiaddr of any peer already in the swarm")
    ] = None,
    host_maddrs: Annotated[
        list[str] | None, typer.Option("--host-maddrs", help="Where to listen (default /ip4/127.0.0.1/tcp/0)")
    ] = None,
    identity: Annotated[
        str | None, typer.Option(help="Private key file: a stable peer id (created if missing)")
    ] = None,
    layers: Annotated[
        str, typer.Option(help="auto (least-served range), START:END, or none (serve no layers)")
    ] = "auto",
    num_layers: Annotated[int | None, typer.Option(help="Span size for --layers auto (default: all)")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    quant: Annotated[str, typer.Option(help="Weight-only quantization on CPU: none, int8 or int4")] = "none",
    kv_budget: Annotated[int, typer.Option(help="KV cache budget in bytes")] = 1 << 30,
    scheduler: Annotated[str, typer.Option(help="mlfq or fcfs: the order sessions' steps run in")] = "mlfq",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for compute (default: all cores; 1 when peers share a machine)")
    ] = None,
    rebalance_period: Annotated[
        float, typer.Option(help="With --layers auto: seconds between checks whether another span needs us more")
    ] = 60.0,
    api: Annotated[
        str | None, typer.Option(help="HOST:PORT: also serve the OpenAI API and /dashboard, backed by the swarm")
    ] = None,
    max_batch_seqs: Annotated[int, typer.Option(help="With --api: sequences the gateway runs at once")] = 32,
) -> None:
    """Join (or start) a swarm and serve a span of the model's layers to its clients."""
    from swarmlm.swarm.peer import PeerConfig, run_peer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PeerConfig(
        model=model,
        initial_peers=initial_peers or [],
        host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"],
        identity=identity,
        layers=layers,
        num_layers=num_layers,
        dtype=dtype,
        quant=quant,
        kv_budget=kv_budget,
        scheduler=scheduler,
        threads=threads,
        rebalance_period=rebalance_period,
        api=api,
        max_batch_seqs=max_batch_seqs,
    )
    _exit_with(run_peer, cfg)


@app.command()
def status(
    initial_peers: Annotated[list[str], typer.Option("--initial-peers", help="Multiaddr of any peer in the swarm")],
    model: Annotated[str | None, typer.Option(help="The model whose swarm to show (default: the embedded one)")] = None,
) -> None:
    """Show the swarm's peers and per-layer coverage; exit code 1 if some layer has no live peer."""
    from swarmlm.model.checkpoint import open_checkpoint
    from swarmlm.model.loading import resolve_model
    from swarmlm.swarm.records import DEFAULT_TTL, fetch_records, start_dht
    from swarmlm.swarm.status import print_status

    model_id, path = resolve_model(model)
    num_layers = open_checkpoint(path).config.num_layers
    dht = start_dht(initial_peers, ["/ip4/127.0.0.1/tcp/0"], client=True)
    try:
        code = print_status(fetch_records(dht, model_id, online_only=False), model_id, num_layers, DEFAULT_TTL)
    finally:
        dht.shutdown()
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
