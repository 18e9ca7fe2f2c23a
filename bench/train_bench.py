"""Training benchmark: DiLoCo against synchronous data-parallel, attacks, and a LoRA fine-tune.

Every phase starts from the same model, as the DiLoCo paper's runs start from a pretrained one: one peer
first trains the tiny model alone for --warm-start-steps steps of 32 sequences (0: random weights; the
result is cached in .cache/). From scratch the loss falls so steeply that DiLoCo's noisier per-peer steps
show as a gap that says little about a real run.

Phases (all in one run, real `swarmlm train` processes on loopback pinned to cores, the same data and model):
  diloco     4 peers, H inner steps per round, R rounds, averaged with the plain mean
  ddp        4 peers, the same number of steps and tokens, gradients averaged every step (the baseline), in
             fp32: rounded to fp16 without loss scaling, gradients lose their small entries
  ddp-1      1 peer, the same steps with the 4 peers' batches in one: DDP as if no all-reduce ever broke
             (a diagnostic, run only when named in --phases)
  attack-*   4 peers of which one sends -10x its update, under mean / trimmed mean / CenteredClip
  lora       SmolLM2-135M with LoRA adapters on a small instruction set, 2 peers: val loss before/after

Reported: final validation loss DiLoCo / DDP and DiLoCo / ddp-1 (target <= 1.03); bytes sent per peer
DiLoCo / DDP (target <= 1.2 / H); DiLoCo compute utilization = training compute time / wall time over rounds 2..R
(round 1 also waits for the last peer to start; target >= 0.9); each attack's final loss against the
clean DiLoCo run (target within 5 % for the robust rules).

bench/RESULTS.md keeps the settings tried, why the defaults are these, and the figures of past runs.

    make bench-train        # the defaults: ~45 min on 2 cores, ~13 min more while the warm start is not cached
    .venv/bin/python bench/train_bench.py [--inner-steps 20] [--rounds 20] [--batch-size 32] [--inner-lr 1.2e-2]
        [--outer-lr 1.0] [--outer-momentum 0.5] [--peers 4] [--warm-start-steps 600] [--phases diloco,ddp,...]

Output: a table of the figures against their targets (stderr); the last line of stdout is
`BENCH_JSON {...}`; the same JSON goes to bench/results/train-<time>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarmlm.launch.trainers import start_run
from swarmlm.train.data import default_corpus_files, prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result

ROOT = Path(__file__).resolve().parent.parent
WARM_CACHE = ROOT / ".cache" / "train-bench-warm"
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def run_peers(data: Path, root: Path, n: int, common: tuple[str, ...], per_peer: dict[int, tuple[str, ...]]) -> list:
    """n peers of one run (rounds wait for all n); returns each peer's round reports."""
    args = ("--target-group-size", str(n), "--min-group-size", str(n), "--run-id", root.name, *common)
    peers = start_run(data, root, n, args, per_peer, pin=True)
    try:
        for p in peers:
            if p.finish(timeout=3600) != 0:
                raise RuntimeError(f"peer failed:\n{p.log.read_text()[-3000:]}")
    finally:
        for p in peers:
            p.stop()
    return [p.rounds() for p in peers]


def summarize(reports: list[list[dict]]) -> dict:
    """The run's figures. Its result is its last averaged round, read from a peer that averaged it: a peer
    whose side of the last all-reduce broke reports that round unaveraged (no val loss) and downloads
    the final weights from the others instead."""

    def last_averaged(peer: list[dict]) -> int:
        return max((r["round"] for r in peer if r["averaged"]), default=0)

    latest = max(reports, key=last_averaged)
    rounds = [r for r in latest if r["averaged"]]
    final = rounds[-1]["round"]
    steady = [r for p in reports for r in p if r["averaged"] and r["round"] > 1]
    compute = sum(r["compute_s"] for r in steady)
    wall = sum(r["wall_s"] for r in steady)
    return {
        "initial_val_loss": latest[0]["val_loss"],
        "final_val_loss": rounds[-1]["val_loss"],
        "bytes_per_peer": statistics.mean(sum(r["bytes_sent"] for r in p) for p in reports),
        "utilization": compute / wall if wall else float("nan"),
        "wall_s": statistics.mean(sum(r["wall_s"] for r in p) for p in reports),
        "same_weights": len({p[-1]["digest"] for p in reports}) == 1,
        "final_averaged_by": sum(last_averaged(p) == final for p in reports),
        "curve": [round(r["val_loss"], 4) for r in rounds],
    }


def instruction_set(path: Path, n: int = 240) -> Path:
    """A small instruction set built from the public-domain plays: 'which play has this line?' The
    answers are checkable, and the base model does not know them, so the loss has room to fall."""
    rng = random.Random(0)
    examples = []
    plays = {}  # title -> its long lines (some files of the corpus have none: verse only)
    for play in default_corpus_files():
        if lines := [ln.strip() for ln in play.read_text(errors="ignore").splitlines() if len(ln.strip()) > 40]:
            plays[play.stem.removesuffix("_gut").replace("_", " ").title()] = lines
    titles = sorted(plays)
    for _ in range(n):
        title = rng.choice(titles)
        line = rng.choice(plays[title])
        examples.append(
            {
                "text": f'<|im_start|>user\nWhich Shakespeare play has this line: "{line}"<|im_end|>\n'
                f"<|im_start|>assistant\nIt is from {title}.<|im_end|>"
            }
        )
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


PHASES = ("diloco", "ddp", "ddp-1", "attack-mean", "attack-trimmed_mean", "attack-centered_clip", "lora")
DEFAULT_PHASES = tuple(p for p in PHASES if p != "ddp-1")  # ddp-1 is a diagnostic (see the docstring)


def run_phase(name: str, data: Path, work: Path, n: int, batch: int, common: tuple[str, ...]) -> dict:
    if name == "lora":
        inst = work / "inst"
        prepare([instruction_set(work / "instructions.jsonl")], inst, block_size=64, val_fraction=0.15)
        lora = ("--lora-rank", "8", "--inner-steps", "10", "--rounds", "3", "--batch-size", "4", "--inner-lr", "1e-3")
        lora += ("--model", "SmolLM2-135M-Instruct", "--matchmaking-time", "2", "--warmup-steps", "1")
        return summarize(run_peers(inst, work / "lora", 2, lora, {}))
    if name == "ddp":
        ddp = (*common, "--mode", "ddp", "--matchmaking-time", "0.5")  # ddp's wire default: fp32 (see the docstring)
        return summarize(run_peers(data, work / name, n, ddp, {}))
    if name == "ddp-1":  # DDP's steps without a network: one peer, the n peers' batches in one
        alone = (*common, "--mode", "ddp", "--batch-size", str(n * batch), "--matchmaking-time", "0.1")
        return summarize(run_peers(data, work / name, 1, alone, {}))
    if name.startswith("attack-"):
        rule = name.removeprefix("attack-")
        attacker = {n - 1: ("--byzantine", "sign_flip")}
        return summarize(run_peers(data, work / name, n, (*common, "--aggregation", rule), attacker))
    return summarize(run_peers(data, work / name, n, (*common, "--mode", "diloco"), {}))


def warm_start(data: Path, work: Path, steps: int) -> tuple[str, ...]:
    """The model every phase starts from: as in the DiLoCo paper (whose runs start from a model pretrained
    for 24k steps), one peer first trains the tiny model alone for `steps` steps of 32 sequences; 0 starts
    from random weights. The phases' options for it.

    The result is kept in .cache/ (~13 min of one core for 600 steps), keyed by everything it depends on:
    its options, the data's manifest (shard checksums, tokenizer) and the training and model code."""
    if steps <= 0:
        return ("--size", "tiny")
    alone = ("--mode", "diloco", "--inner-steps", str(steps), "--rounds", "1", "--batch-size", "32")
    alone += ("--inner-lr", "3e-3", "--outer-lr", "1.0", "--outer-momentum", "0", "--matchmaking-time", "0.5")
    key = hashlib.sha256(json.dumps(alone).encode() + (data / "manifest.json").read_bytes())
    for package in ("model", "train"):
        for source in sorted((ROOT / "swarmlm" / package).rglob("*.py")):
            key.update(source.read_bytes())
    model = WARM_CACHE / key.hexdigest()[:16]
    if (model / "config.json").exists():
        console.print(f"warm start: reusing {model}")
        return ("--model", str(model))
    exported = work / "warm-model"
    run_peers(data, work / "warm", 1, (*alone, "--size", "tiny", "--export", str(exported)), {})
    WARM_CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=WARM_CACHE))  # renamed into place whole: no half-written cache entry
    shutil.copytree(exported, partial, dirs_exist_ok=True)
    partial.rename(model)
    return ("--model", str(model))


def report(results: dict[str, dict], n: int, h: int, rounds: int, settings: dict[str, float]) -> dict:
    """Print the table of targets for the phases that ran; the JSON result."""
    batch = settings["batch_size"]
    table = Table(title=f"Training: {n} peers, H={h}, {rounds} rounds, batch {batch} per peer, same tokens per phase")
    for col in ("measure", "value", "target", "met"):
        table.add_column(col)

    def row(name: str, value: float, target: str, met: bool) -> None:
        table.add_row(name, f"{value:.4g}", target, "yes" if met else "NO")

    result: dict = {"bench": "train", "peers": n, "inner_steps": h, "rounds": rounds, **settings}
    d, p = results.get("diloco"), results.get("ddp")
    if d:
        result["diloco_utilization"] = d["utilization"]
        row("DiLoCo compute utilization", d["utilization"], ">= 0.9", d["utilization"] >= 0.9)
    if d and p:
        result["loss_ratio"] = d["final_val_loss"] / p["final_val_loss"]
        result["bytes_ratio"] = d["bytes_per_peer"] / p["bytes_per_peer"]
        row("final val loss DiLoCo / DDP", result["loss_ratio"], "<= 1.03", result["loss_ratio"] <= 1.03)
        row(
            "bytes per peer DiLoCo / DDP",
            result["bytes_ratio"],
            f"<= 1.2/H = {1.2 / h:.4g}",
            result["bytes_ratio"] <= 1.2 / h,
        )
        row("DDP compute utilization", p["utilization"], "", True)
    if d and (one := results.get("ddp-1")):
        result["loss_ratio_one_peer"] = ratio = d["final_val_loss"] / one["final_val_loss"]
        row(f"final val loss DiLoCo / DDP on 1 peer ({n}x batch)", ratio, "<= 1.03", ratio <= 1.03)
    attacks = {}
    for rule in ("mean", "trimmed_mean", "centered_clip"):
        if d and f"attack-{rule}" in results:
            attacks[rule] = ratio = results[f"attack-{rule}"]["final_val_loss"] / d["final_val_loss"]
            robust = rule != "mean"
            target = "<= 1.05" if robust else "(not robust)"
            row(f"1 of {n} peers -10x, {rule}: loss / clean", ratio, target, ratio <= 1.05 or not robust)
    if attacks:
        result["attack_loss_ratio"] = attacks
    if lr := results.get("lora"):
        falls = lr["final_val_loss"] < lr["initial_val_loss"]
        value = f"{lr['initial_val_loss']:.3f} -> {lr['final_val_loss']:.3f}"
        table.add_row("LoRA SmolLM2, 2 peers: val loss", value, "falls", "yes" if falls else "NO")
    console.print(table)
    return {**result, "phases": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per peer and step (lora: its own)")
    ap.add_argument("--inner-lr", type=float, default=1.2e-2, help="AdamW lr of every phase but lora")
    ap.add_argument("--outer-lr", type=float, default=1.0)
    ap.add_argument("--outer-momentum", type=float, default=0.5)
    ap.add_argument("--warm-start-steps", type=int, default=600, help="steps one peer trains first (0: none)")
    ap.add_argument("--phases", default=",".join(DEFAULT_PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    args = ap.parse_args()
    h, rounds, n = args.inner_steps, args.rounds, args.peers
    phases = args.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="swarmlm-bench-train-"))
    console.print(f"[bold]train bench[/]: {n} peers, H={h}, {rounds} rounds, work in {work}")
    data = work / "data"
    prepare(default_corpus_files(), data, train_tokenizer=2048, block_size=128)
    common = ("--inner-steps", str(h), "--rounds", str(rounds), "--batch-size", str(args.batch_size))
    common += ("--inner-lr", str(args.inner_lr))
    warm_steps = args.warm_start_steps if set(phases) - {"lora"} else 0  # lora starts from SmolLM2
    common += ("--matchmaking-time", "2", *warm_start(data, work, warm_steps))
    common += ("--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum))
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}  # a phase that fails costs only its own figures
    for name in phases:
        t0 = time.monotonic()
        console.print(f"phase {name} …")
        try:
            results[name] = run_phase(name, data, work, n, args.batch_size, common)
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
            console.print(f"  [red]{name} failed[/]: {failed[name]}")
            continue
        results[name]["phase_s"] = round(time.monotonic() - t0, 1)
        console.print(f"  {name}: {results[name]}")
    settings = {
        "batch_size": args.batch_size,
        "inner_lr": args.inner_lr,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
    }
    result = report(results, n, h, rounds, settings)
    if failed:
        result["failed"] = failed
    save_result("train", result)


if __name__ == "__main__":
    main()
