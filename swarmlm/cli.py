"""The `swarmlm` command line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer

T = TypeVar("T")

app = typer.Typer(
    help="Serve and train language models on a swarm of ordinary machines.", no_args_is_help=True, add_completion=False
)


ModelOption = Annotated[
    str | None, typer.Option(help="A .gguf file or HF model directory (default: embedded SmolLM2-135M-Instruct)")
]
ApiKeysOption = Annotated[
    str | None, typer.Option(help="API key file (`swarmlm keys create`): every /v1 call needs a key")
]
SwarmCertOption = Annotated[
    str | None, typer.Option(help="Membership certificate (`swarmlm swarm invite`): join a private swarm")
]
ProtectMetricsOption = Annotated[bool, typer.Option(help="With --api-keys: /metrics and /dashboard need a key too")]


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
    api_keys: ApiKeysOption = None,
    protect_metrics: ProtectMetricsOption = False,
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
        api_keys=api_keys,
        protect_metrics=protect_metrics,
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
    api_keys: ApiKeysOption = None,
    protect_metrics: ProtectMetricsOption = False,
    ledger: Annotated[
        str | None, typer.Option(help="This peer's copy of the ledger (default: ~/.swarmlm/ledger/PEER_ID.jsonl)")
    ] = None,
    swarm_cert: SwarmCertOption = None,
    perturb_outputs: Annotated[
        float, typer.Option(help="Fault injection for attack tests: add noise of this relative size to outputs")
    ] = 0.0,
) -> None:
    """Join (or start) a swarm and serve a span of the model's layers to its clients."""
    from swarmlm.serve.gateway import GatewayConfig, run_peer_with_gateway
    from swarmlm.swarm.peer import PeerConfig

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
        ledger=ledger,
        swarm_cert=swarm_cert,
        perturb_outputs=perturb_outputs,
    )
    gateway = None if api is None else GatewayConfig(api, max_batch_seqs, api_keys, protect_metrics)
    _exit_with(lambda c: run_peer_with_gateway(*c), (cfg, gateway))


@app.command()
def status(
    initial_peers: Annotated[list[str], typer.Option("--initial-peers", help="Multiaddr of any peer in the swarm")],
    model: Annotated[str | None, typer.Option(help="The model whose swarm to show (default: the embedded one)")] = None,
    identity: Annotated[str | None, typer.Option(help="Key file (with --swarm-cert: the member's key)")] = None,
    swarm_cert: SwarmCertOption = None,
) -> None:
    """Show the swarm's peers and per-layer coverage; exit code 1 if some layer has no live peer."""
    from swarmlm.core.dht import start_dht
    from swarmlm.core.identity import Identity
    from swarmlm.core.membership import load_membership
    from swarmlm.model.checkpoint import open_checkpoint
    from swarmlm.model.loading import resolve_model
    from swarmlm.swarm.records import DEFAULT_TTL, fetch_records
    from swarmlm.swarm.status import print_status

    model_id, path = resolve_model(model)
    num_layers = open_checkpoint(path).config.num_layers
    me = Identity.from_option(identity)
    cert = load_membership(swarm_cert, me) if swarm_cert else None
    dht = start_dht(initial_peers, ["/ip4/127.0.0.1/tcp/0"], me, client=True, cert=cert)
    try:
        code = print_status(fetch_records(dht, model_id, online_only=False), model_id, num_layers, DEFAULT_TTL)
    finally:
        dht.shutdown()
    raise typer.Exit(code)


demo_app = typer.Typer(
    help="Demos on the embedded model and corpus (without a subcommand: serve a local swarm).",
    invoke_without_command=True,
)
app.add_typer(demo_app, name="demo")


@demo_app.callback()
def demo(
    ctx: typer.Context,
    port: int = 8000,
    prompt: str = "In two sentences, why do bees dance?",
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
    prompt: str = "ROMEO:",
) -> None:
    """Three peers train a tiny model from scratch (one is killed and restarts), then a swarm serves it."""
    from swarmlm.launch.demo_train import run_train_demo

    logging.basicConfig(level=logging.WARNING, force=True)
    _exit_with(lambda c: run_train_demo(*c), (work_dir, rounds, inner_steps, port, prompt))


def _parse_part(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        rank, world = (int(x) for x in value.split("/"))
    except ValueError as e:
        raise typer.BadParameter("give RANK/WORLD, e.g. 0/3", param_hint="--data-part") from e
    return rank, world


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="A folder written by `swarmlm data prepare` (stays on this peer)")],
    run_dir: Annotated[Path, typer.Option(help="This peer's checkpoints and round log (resumed if present)")],
    run_id: Annotated[str, typer.Option(help="Peers with the same run id train together")] = "swarmlm-train",
    initial_peers: Annotated[
        list[str] | None, typer.Option("--initial-peers", help="Multiaddr of any peer already in the run")
    ] = None,
    host_maddrs: Annotated[
        list[str] | None, typer.Option("--host-maddrs", help="Where to listen (default /ip4/127.0.0.1/tcp/0)")
    ] = None,
    identity: Annotated[str | None, typer.Option(help="Private key file: a stable peer id")] = None,
    swarm_cert: SwarmCertOption = None,
    size: Annotated[str, typer.Option(help="Model size from scratch: tiny, small or base")] = "tiny",
    model: Annotated[str | None, typer.Option(help="Fine-tune this .gguf / HF directory instead")] = None,
    lora_rank: Annotated[int, typer.Option(help="> 0: train LoRA adapters of this rank only (peft)")] = 0,
    seed: Annotated[int, typer.Option(help="Initial weights' seed (the same on every peer of a run)")] = 0,
    data_part: Annotated[str | None, typer.Option(help="RANK/WORLD: train on this slice of the data only")] = None,
    batch_size: int = 8,
    mode: Annotated[str, typer.Option(help="diloco, or ddp (average gradients every step: the baseline)")] = "diloco",
    inner_steps: Annotated[int, typer.Option(help="H: local AdamW steps per round")] = 50,
    inner_lr: float = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Inner steps of linear learning-rate warmup")] = 20,
    min_lr_ratio: Annotated[
        float, typer.Option(help="Cosine-decay the inner learning rate over the run to this fraction (1: constant)")
    ] = 0.1,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    rounds: Annotated[int, typer.Option(help="Stop when the swarm reaches this round")] = 10,
    target_group_size: Annotated[int, typer.Option(help="Peers expected in a round's group")] = 4,
    min_peers: Annotated[int, typer.Option(help="A fresh run waits for this many peers before round 1")] = 2,
    start_wait: Annotated[float, typer.Option(help="Most seconds to wait for --min-peers; then train")] = 60.0,
    min_group_size: Annotated[int, typer.Option(help="Fewest peers a round averages with (1: alone too)")] = 1,
    aggregation: Annotated[str, typer.Option(help="mean, trimmed_mean or centered_clip")] = "mean",
    wire: Annotated[
        str | None, typer.Option(help="fp16, fp32 or int8 on the wire (default: fp16 for diloco, fp32 for ddp)")
    ] = None,
    matchmaking_time: Annotated[float, typer.Option(help="Seconds a round waits for its group to fill")] = 2.0,
    averaging_timeout: Annotated[float, typer.Option(help="Give up a round's averaging after this")] = 60.0,
    patience: Annotated[int, typer.Option(help="Rounds in a row without a group before giving up (exit 3)")] = 5,
    dp_clip: Annotated[float, typer.Option(help="DP: clip each round's update to this L2 norm")] = 1.0,
    dp_noise: Annotated[float | None, typer.Option(help="DP: Gaussian noise multiplier (turns DP on)")] = None,
    dp_delta: Annotated[float | None, typer.Option(help="DP: delta of the (epsilon, delta) reported")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for compute (default: all cores)")] = None,
    export: Annotated[Path | None, typer.Option(help="At the end, export the best round as an HF directory")] = None,
    byzantine: Annotated[
        str | None, typer.Option(help="Fault injection for tests: send poisoned updates (sign_flip or noise)")
    ] = None,
) -> None:
    """Train with the swarm: DiLoCo rounds on this peer's own data, averaged with the peers present."""
    from swarmlm.train.config import TrainConfig
    from swarmlm.train.training_run import run_training

    # force: opacus configures the root logger when imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    def run(_: None) -> int:  # the config is checked inside: a bad setting is one clean error
        cfg = TrainConfig(
            data=data,
            run_dir=run_dir,
            run_id=run_id,
            initial_peers=initial_peers or [],
            host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"],
            identity=identity,
            swarm_cert=swarm_cert,
            size=size,
            model=model,
            lora_rank=lora_rank,
            seed=seed,
            data_part=_parse_part(data_part),
            batch_size=batch_size,
            mode=mode,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            rounds=rounds,
            target_group_size=target_group_size,
            min_peers=min_peers,
            start_wait=start_wait,
            min_group_size=min_group_size,
            aggregation=aggregation,
            wire=wire,
            matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout,
            patience=patience,
            dp_clip=dp_clip,
            dp_noise=dp_noise,
            dp_delta=dp_delta,
            metrics_port=metrics_port,
            byzantine=byzantine,
        )
        return run_training(cfg, export)

    _exit_with(run, None)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A training run folder (its best round) or a round-*.json")],
    data: Annotated[Path, typer.Option(help="A prepared data folder: its validation split is used")],
    blocks: Annotated[int, typer.Option(help="Most validation blocks to use")] = 256,
) -> None:
    """Validation loss and perplexity of a training checkpoint."""
    from swarmlm.train.evaluation import evaluate_checkpoint

    _exit_with(lambda c: evaluate_checkpoint(*c), (checkpoint, data, blocks))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training run folder (its best round) or a round-*.json")],
    out: Annotated[Path, typer.Option(help="The HF directory to write (config, safetensors, tokenizer)")],
) -> None:
    """Export a trained model as an HF directory that `swarmlm serve` and `swarmlm peer` load."""
    from swarmlm.train.evaluation import export_checkpoint

    _exit_with(lambda c: export_checkpoint(*c), (checkpoint, out))


data_app = typer.Typer(
    help="Training data: clean, tokenize and pack text into checksummed token shards.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (its old shards are replaced)")],
    sources: Annotated[
        list[Path] | None,
        typer.Argument(help="Text files, folders (*.txt, *.md, *.jsonl) or JSONL files (default: Shakespeare's plays)"),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenize with this model's tokenizer (default: embedded SmolLM2)")
    ] = None,
    train_tokenizer: Annotated[
        int | None, typer.Option(help="Train a byte-level BPE of this vocabulary size on the corpus instead")
    ] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per block (training sequence)")] = 256,
    val_fraction: Annotated[float, typer.Option(help="Share of blocks held out for validation")] = 0.05,
    shard_blocks: Annotated[int, typer.Option(help="Most blocks per shard file")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split")] = 0,
) -> None:
    """Clean, deduplicate and tokenize text; pack it into train/val shards with a checksummed manifest."""
    from rich.console import Console
    from rich.table import Table

    from swarmlm.train.data import prepare

    def run(srcs: list[Path]) -> int:
        m = prepare(
            srcs,
            out,
            tokenizer=tokenizer,
            train_tokenizer=train_tokenizer,
            block_size=block_size,
            val_fraction=val_fraction,
            shard_blocks=shard_blocks,
            seed=seed,
        )
        st = m.stats
        tok = "trained BPE (tokenizer/)" if m.tokenizer["kind"] == "trained" else m.tokenizer["model"]
        table = Table(title=f"swarmlm data prepare → {out}")
        table.add_column("", style="bold")
        table.add_column("count", justify="right")
        for name, value in [
            ("files", st.files),
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
        console.print(f"tokenizer: {tok}, vocab {m.vocab_size:,}; {m.block_size} tokens per block ({m.dtype})")
        return 0

    _exit_with(run, sources or [])


swarm_app = typer.Typer(help="Private swarms: an owner key and membership certificates.", no_args_is_help=True)
app.add_typer(swarm_app, name="swarm")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """'90' (seconds), '90s', '30m', '12h', '7d' -> seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 3600, 30m, 12h or 7d") from None
    if seconds <= 0:
        raise typer.BadParameter("must be positive")
    return seconds


@swarm_app.command("init")
def swarm_init(
    out: Annotated[Path, typer.Option("--out", help="Where to write the owner's key (keep it secret)")],
) -> None:
    """Make a swarm owner key; prints the swarm id (the owner's peer id)."""
    from swarmlm.core.identity import Identity

    if out.exists():
        typer.secho(f"error: {out} exists; a swarm keeps its owner key", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(Identity.load_or_create(out).peer_id)


@swarm_app.command("id")
def swarm_id(
    identity: Annotated[Path, typer.Argument(help="A peer's key file (created if missing)")],
) -> None:
    """Print the peer id of a key file: what the owner invites."""
    from swarmlm.core.identity import Identity

    def run(path: Path) -> int:
        typer.echo(Identity.load_or_create(path).peer_id)
        return 0

    _exit_with(run, identity)


@swarm_app.command("invite")
def swarm_invite(
    peer_id: Annotated[str, typer.Argument(help="The invited peer's id (`swarmlm swarm id KEYFILE`)")],
    owner: Annotated[Path, typer.Option(help="The owner key of `swarmlm swarm init`")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the certificate")],
    expires: Annotated[str, typer.Option(help="Lifetime: seconds, or 30m, 12h, 7d")] = "30d",
) -> None:
    """Sign a membership certificate for a peer; it joins with --identity KEYFILE --swarm-cert FILE."""
    from swarmlm.core.identity import Identity
    from swarmlm.core.membership import Certificate

    lifetime = _duration(expires)

    def run(_: None) -> int:
        Certificate.issue(Identity.load(owner), peer_id, lifetime).save(out)
        typer.echo(f"certificate for {peer_id} written to {out}", err=True)
        return 0

    _exit_with(run, None)


keys_app = typer.Typer(help="API keys for `serve --api-keys` and `peer --api-keys`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for (the user of per-user fairness)")],
    file: Annotated[Path, typer.Option("--file", help="The key file (created if missing; holds hashes only)")],
    rpm: Annotated[float | None, typer.Option(help="Requests per minute allowed (default: unlimited)")] = None,
    models: Annotated[list[str] | None, typer.Option("--model", help="Allow only this model (repeatable)")] = None,
) -> None:
    """Make a new API key: printed once, only its sha256 is stored."""
    from swarmlm.serve.auth import create_key

    def run(_: None) -> int:
        typer.echo(create_key(file, name, rpm, models))
        typer.echo(f"key {name!r} added to {file}; it is shown only now", err=True)
        return 0

    _exit_with(run, None)


ledger_app = typer.Typer(
    help="The signed, hash-chained ledger of model versions and training rounds.", no_args_is_help=True
)
app.add_typer(ledger_app, name="ledger")
LedgerPath = Annotated[Path, typer.Argument(help="A copy of the ledger (a peer's --ledger file)")]


def _read_ledger(path: Path) -> list:
    from swarmlm.ledger.store import read_lines

    if not path.is_file():
        typer.secho(f"error: no ledger at {path}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return read_lines(path)[0]


@ledger_app.command("show")
def ledger_show(
    path: LedgerPath,
    kind: Annotated[str | None, typer.Option(help="Only entries of this kind")] = None,
    last: Annotated[int | None, typer.Option(help="Only the last N entries")] = None,
) -> None:
    """List the entries of a copy of the ledger (unchecked: `swarmlm ledger verify` checks them)."""
    from rich.console import Console

    from swarmlm.ledger.render import entries_table

    Console().print(entries_table(_read_ledger(path), kind, last))


@ledger_app.command("verify")
def ledger_verify(
    path: LedgerPath,
    against: Annotated[
        Path | None, typer.Option(help="Another copy (e.g. another peer's): also report entries this one lacks")
    ] = None,
) -> None:
    """Check every hash, link and signature; name the first bad entry and exit 1 if there is one. With
    --against, also exit 1 if the other copy holds entries this one lacks (dropped newest entries leave a
    valid chain: only another copy shows them) or an author signed two different entries at one number."""
    from swarmlm.ledger.chain import compare_copies, verify_chain

    entries = _read_ledger(path)
    verdict = verify_chain(entries)
    if not verdict.ok:
        typer.secho(f"entry {verdict.first_bad} is bad: {verdict.reason}", fg=typer.colors.RED, err=True)
        typer.echo(f"the {verdict.entries} entries before it verify", err=True)
        raise typer.Exit(1)
    typer.secho(f"ok: {verdict.entries} entries, every hash, link and signature verified", fg=typer.colors.GREEN)
    if against is None:
        return
    others = _read_ledger(against)
    theirs = verify_chain(others)
    if not theirs.ok:  # its verified prefix still counts as evidence
        typer.echo(f"{against}: entry {theirs.first_bad} is bad ({theirs.reason}); compared its first {theirs.entries}")
    missing, forks = compare_copies(entries, others[: theirs.entries])
    for mine, other in forks:
        typer.secho(
            f"author {mine.author} signed two different entries #{mine.seq}: {mine.hash[:16]}… here, "
            f"{other.hash[:16]}… in {against}",
            fg=typer.colors.RED,
            err=True,
        )
    if missing:
        first = missing[0]
        typer.secho(
            f"this copy lacks {len(missing)} entries that {against} holds (the first: #{first.seq} by "
            f"{first.author}, {first.kind}): dropped, or not synced yet",
            fg=typer.colors.RED,
            err=True,
        )
    if missing or forks:
        raise typer.Exit(1)
    typer.secho(f"and it holds every entry of {against}", fg=typer.colors.GREEN)


if __name__ == "__main__":
    app()
