"""Training benchmark: DiLoCo against synchronous data-parallel, attacks, and a LoRA fine-tune.

Every phase starts from the same model: as in the DiLoCo paper, whose runs start from a model pretrained
for 24k steps, one peer first trains the tiny model alone (--warm-start-steps of 32 sequences; 0: start
from random weights). From scratch, the first few hundred steps fall so steeply that DiLoCo's noisier
per-peer steps (a peer's batch against DDP's 4 peers' batches) show as a gap that says little about a
real run.

Phases (all in one run, real `swarmlm train` processes on loopback, the same data and model):
  diloco     4 peers, H inner steps per round, R rounds, averaged with the plain mean
  ddp        4 peers, the same number of steps and tokens, gradients averaged every step in fp32 (the baseline)
  ddp-1      1 peer, the same steps with the 4 peers' batches in one: DDP as if no all-reduce ever broke
             (a diagnostic, run only when named in --phases)
  attack-*   4 peers of which one sends -10x its update, under mean / trimmed mean / CenteredClip
  lora       SmolLM2-135M with LoRA adapters on a small instruction set, 2 peers: val loss before/after

Reported: final validation loss DiLoCo / DDP and DiLoCo / ddp-1 (target <= 1.03); bytes sent per peer
DiLoCo / DDP (target <= 1.2 / H); DiLoCo compute utilization = training compute time / wall time over rounds 2..R
(round 1 also waits for the last peer to start; target >= 0.9); each attack's final loss against the
clean DiLoCo run (target within 5 % for the robust rules).

Settings, and why (2-core machine, warm start, 4 peers, the same tokens in each run; loss DiLoCo / DDP):
- per-peer batch 8 sequences, H=50, 8 rounds, inner lr 3e-3: 4.096 / 3.905 = 1.049; 16 rounds: 3.779 /
  3.616 = 1.045. No outer (lr, momentum) tried closed it: (1.0, 0.5) 4.124, (1.0, 0.7) 4.096, (1.0, 0.8)
  4.098, (0.7, 0.9) 4.141. At 8 sequences of 128 tokens a peer's AdamW steps are mostly noise, which DDP
  averages away before every step and DiLoCo only after H of them.
- per-peer batch 32, H=20, 5 rounds (the same tokens; a round's compute then dwarfs its ~1.5 s of
  averaging, evaluation and checkpointing, so H=20 keeps utilization above 0.9), by inner lr:
  3e-3: 4.321 / 4.352 = 0.993; 6e-3: 4.230 / 4.171; 1.2e-2: 4.231 / 4.064 = 1.041; DDP at 2.4e-2: 4.148.
  DiLoCo is best from 6e-3 on, DDP gains up to 1.2e-2 (the larger lr its 4x larger batch allows), so
  best against best DiLoCo stays ~4 % behind: the defaults are that comparison (inner lr 1.2e-2), not
  the lr at which DiLoCo wins.
- outer lr 1.0, momentum 0.5 (the product's defaults 0.7, 0.9 are the DiLoCo paper's, for H=500 over more
  than a hundred rounds). 5 rounds, inner lr 1.2e-2, DiLoCo alone by outer momentum: 0.0 4.236, 0.3 4.206,
  0.5 4.206, 0.7 4.231, 0.85 4.290; by outer lr at momentum 0.5: 1.0 4.206, 1.3 4.306 (1.3 at 0.3: 4.250);
  inner lr 8e-3 at (1.0, 0.5): 4.208.
- DDP averages ~3 MB of gradients every step. On this 2-core machine about one step's all-reduce in a few
  dozen breaks for one peer (one reducer's stream is cut: "received 90 % results") while the others
  apply it; that peer is out of step with its group for the rest of the round (its gradients, averaged
  into the others' steps, come from other weights) and re-syncs at the round's end. So DDP's final loss
  varies by run: at 5 rounds (fp16) 4.064, 4.080, 4.091, 4.147, 4.176 (DiLoCo, with 5 all-reduces in the
  run, repeats its 4.2064 to 4 digits). Against that spread, DiLoCo at 5 rounds is 1.007-1.035 of DDP.
- 10 rounds (200 steps; the gap narrows with training, as in the DiLoCo paper). DiLoCo 3.8801 (four runs,
  identical to 4 digits; with fp32 on the wire 3.8802). DDP with fp16 on the wire 3.849 and 3.905 (0.994-
  1.008); with fp32 3.759 (1.032): gradients rounded to fp16 without loss scaling lose their small entries,
  which AdamW would have scaled up, so `--mode ddp` sends fp32 by default (DiLoCo's pseudo-gradients,
  summed over H steps, do not suffer; bytes per peer DiLoCo / DDP was 0.0498 against DDP in fp16). ddp-1
  (no network): 3.667, 1.058. Why 4-peer DDP ends 0.09 above it is not established (the breaks above are
  one candidate; ddp-1 also draws its batches in another order). The defaults were then 10 rounds.
- warm start 600 steps (was 200; the paper's runs start from a well-trained model, and after 200 steps
  the tiny model is still in its steep early fall, where DiLoCo's per-peer steps lag DDP's most). 10
  rounds, the settings above, DDP in fp32: with 200 warm-start steps DiLoCo / DDP 3.8801 / 3.759 = 1.032;
  with 600 (val 3.906 at the start) 3.6153 / 3.5301 = 1.024 (utilization 0.946). Both runs first climb to
  4.26-4.28 in round 1: the warm start ends at a decayed lr 3e-3 and every phase restarts AdamW at 1.2e-2.
  The warm start takes ~13 min on this 2-core machine (one thread).

Full run 2026-12-03 (`make bench-train`, 600-step warm start; ~75 min): DiLoCo / DDP 3.6153 / 3.5271 =
1.025; bytes 0.025 (DDP in fp32); utilization 0.887 (one of the 4 single-thread peers on 2 cores computed
~10 % slower every round and the others waited for it; the attack phases, DiLoCo too, measured 0.943 and
0.946 in the same run, the diloco + ddp run before it 0.946); one peer sending -10x: mean 446x (diverges),
trimmed mean 1.043, CenteredClip 1.043; LoRA 4.871 -> 2.983. The previous full run (200-step warm start,
DDP in fp16): utilization 0.924, trimmed mean 1.030, CenteredClip 1.031.

Peers pinned to cores (each peer on core rank mod 2, so two share each core evenly; run 2026-12-03
19:01, stopped after the ddp phase): DiLoCo 3.6153 (identical again), utilization 0.957 (every peer
0.95-0.96 in every round from round 2: nobody waits for a straggler now); DDP 3.5039 (utilization
0.826), so DiLoCo / DDP 1.032; bytes 0.025. DDP ended ~0.025 below its unpinned runs (3.527, 3.530),
likely because peers computing at one pace break fewer of its per-step all-reduces. DiLoCo at inner lr
6e-3 (DDP's 1.2e-2 suits its 4x larger batch) 3.6104 (1.030): its curve no longer climbs in round 1
(4.097 against 4.278) but ends within 0.2 %, as the cosine decay brings both lrs down. So at 10 rounds
DiLoCo sits 3.0-3.2 % above the better DDP: closing it needs more rounds (the gap narrowed from 4 % at 5
rounds to 3 % at 10), hence 20 rounds below.

20 rounds, the defaults (400 steps; two full runs on 2026-12-04, `make bench-train`, ~41 min of phases
after the warm start, which is cached in .cache/): DiLoCo 3.4284 and DDP 3.3537 in both (each phase
repeats itself to 4 digits), DiLoCo / DDP 1.022; bytes 0.025 (63.0 MB against 2.52 GB per peer);
utilization 0.946 and 0.941; mean under attack 5086x and 5003x (diverges); trimmed mean 3.5996 and 3.5998,
1.0499 and 1.04998 of clean, right at the 5 % limit: with 4 contributions it averages the middle 2 of each
coordinate, so it keeps about two honest peers' worth of each round. CenteredClip as the paper has it
measured 1.052 in the first run (over the limit): at its fixed point the clipped attacker still pulls
the centre by tau / n along -g, a third of the honest spread off every outer step. Since it drops a
contribution that ends over 3 tau away and clips again without it (train/aggregation.py), the second run
measured 3.4603, 1.009 of clean: the mean of the 3 honest peers, the best any rule can do without the
fourth peer's data. LoRA 4.871 -> 2.983 in both.

    .venv/bin/python bench/train_bench.py [--inner-steps 20] [--rounds 20] [--batch-size 32] [--inner-lr 1.2e-2]
        [--peers 4] [--warm-start-steps 600] [--phases diloco,ddp,...]

The last line of output is `BENCH_JSON {...}`; the same JSON goes to bench/results/train-<time>.json.
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
