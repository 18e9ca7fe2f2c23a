"""Pipeline-parallel training (`swarmlm train --pipeline-stages 3`) against the same model in one process.

The model: the `--size` preset (default base: 12 layers of 576; in small's, 6 of 256, each peer's fixed
cost of three Python processes outweighs its stage) with the embedded tokenizer's 49,152-token
vocabulary and untied embeddings, trained from the same seeded weights on the embedded plays (64-token
blocks). Both phases train the same number of micro-batches of --batch-size blocks:

  (a) one process: `--pipeline-stages 1`, one peer holding every layer, --rounds x 6 rounds;
  (b) 3 stages x 2 peers (--peers-per-stage), each driving its share of micro-batches through all three
      stages, --rounds rounds; one stage-1 peer is killed (kill -9) once the run is --kill-at of the way
      through and restarted 5 s later (it resumes its stage from its checkpoint).

For a model no one process here can train (SmolLM2-1.7B's shape: 43.5 GB of fp32 AdamW + DiLoCo state),
--no-one-process skips (a), and the lean recipe (--dtype bf16 --optimizer adafactor, no outer momentum)
with one peer per stage fits three stages on this machine; --memory-cap-gb puts each peer in a memory
cgroup (root) smaller than the whole model's state, so that no peer could have held it.

Reported: each phase's final validation loss (b: the median over its peers, each evaluating the whole
pipeline once no peer trains any more, every stage still served) and their ratio (target <= 1.05), wall
time and micro-batch tokens per second, each peer's peak memory (the summed PSS of its processes: the
trainer, its forked DHT and averager, p2pd, sampled every 0.5 s; when, and by process) against (a)'s
(target <= 0.5), its main process's peak RSS, the state's size counted from the parameters, each peer's
CPU utilization (CPU seconds / wall seconds) by stage, and whether every round of every peer completed
across the kill. Peers are left to the OS scheduler on this machine's cores, as `make bench-train`
leaves DiLoCo's.

    make bench-pipeline
    .venv/bin/python bench/pipeline_bench.py [--size base] [--rounds 2] [--inner-steps 8] [--batch-size 4]
    .venv/bin/python bench/pipeline_bench.py --size 1.7b --no-one-process --peers-per-stage 1 --dtype bf16 \
        --optimizer adafactor --inner-lr 0.3 --outer-lr 1 --outer-momentum 0 --memory-cap-gb 8 \
        --rounds 2 --inner-steps 4 --batch-size 2 --eval-blocks 8

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/pipeline-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import stop_all
from swarmlm.launch.trainers import TrainerProcess, start_run
from swarmlm.model.memory import span_weight_bytes
from swarmlm.train.data import default_corpus_files, prepare
from swarmlm.train.pipeline_stage import stage_layers
from swarmlm.train.pipeline_trainer import FINAL_EVAL
from swarmlm.train.train_config import PRESETS, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling modules
from bench_output import save_result
from proc_stats import capped_cgroup_exists, cpu_seconds, memory, memory_cap_prefix, release_cap, tree_pss

console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
VOCAB = 49152  # the embedded SmolLM2 tokenizer's
STAGE = re.compile(r"pipeline stage (\d+) of \d+")


def state_bytes(args: argparse.Namespace, stages: int) -> list[int]:
    """Per stage: weights, gradients, the inner optimizer's moments (AdamW: two; Adafactor: next to none),
    DiLoCo's global copy and its momentum (if any), at the run's dtype, counted from the model's shapes
    (the stages `swarmlm train` splits it into)."""
    config = dataclasses.replace(preset_config(args.size, VOCAB, 64, None), tie_word_embeddings=False)
    copies = 3 + (2 if args.optimizer == "adamw" else 0) + (1 if args.outer_momentum else 0)
    return [span_weight_bytes(config, a, b, True, args.dtype, "none") * copies for a, b in stage_layers(config, stages)]


class Watch:
    """Samples each trainer's peak RSS and CPU time while it runs (a killed one keeps its last figures)."""

    def __init__(self) -> None:
        self.peers: list[TrainerProcess] = []
        self.figures: dict[int, dict[str, float]] = {}  # index in `peers` -> peak_rss, cpu_s, wall_s
        self.started: dict[int, float] = {}
        self.pids: dict[int, int] = {}  # index -> the process its figures were last sampled from
        self.peak_pss_by_process: dict[int, dict[str, int]] = {}  # index -> its processes' PSS at its peak
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, index: int, peer: TrainerProcess) -> None:
        if index == len(self.peers):
            self.peers.append(peer)
        else:
            self.peers[index] = peer
        self.started.setdefault(index, time.monotonic())

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for i, peer in enumerate(list(self.peers)):
                try:
                    mem, cpu = memory(peer.proc.pid), cpu_seconds(peer.proc.pid)
                    pss = tree_pss(peer.proc.pid)
                except (OSError, KeyError):
                    continue
                f = self.figures.setdefault(i, {"peak_rss": 0.0, "peak_pss": 0.0, "cpu_before": 0.0, "cpu_last": 0.0})
                if self.pids.setdefault(i, peer.proc.pid) != peer.proc.pid:  # restarted: CPU time starts again
                    f["cpu_before"], f["cpu_last"], self.pids[i] = f["cpu_before"] + f["cpu_last"], 0.0, peer.proc.pid
                f["cpu_last"], f["cpu_s"] = cpu, f["cpu_before"] + cpu
                if (total := sum(pss.values())) > f["peak_pss"]:
                    f["peak_pss"], f["peak_pss_at"] = total, time.monotonic() - self.t0
                    self.peak_pss_by_process[i] = pss
                f["peak_rss"] = max(f["peak_rss"], mem["peak_rss_bytes"])
                f["wall_s"] = time.monotonic() - self.started[i]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def final_val(peer: TrainerProcess) -> float:
    """The peer's evaluation of the pipeline once no peer trained (pipeline_trainer.FINAL_EVAL); NaN if it
    made none (a stage had left)."""
    path = peer.run_dir / FINAL_EVAL
    return json.loads(path.read_text())["val_loss"] if path.exists() else float("nan")


def run_phase(
    data: Path, root: Path, n: int, args: tuple[str, ...], kill_at: float | None, rounds: int, cap: int | None = None
) -> dict[str, Any]:
    """`cap`: each peer runs in a memory cgroup of this many bytes (proc_stats.memory_cap_prefix)."""
    watch = Watch()
    t0 = time.monotonic()
    peers = start_run(data, root, n, args, prefix=memory_cap_prefix(cap) if cap else ())
    pids = [p.proc.pid for p in peers]
    for i, peer in enumerate(peers):
        watch.add(i, peer)
    watch.start()
    killed = None
    try:
        if kill_at is not None:
            stages = [int(STAGE.search(p.log.read_text()).group(1)) for p in peers]  # type: ignore[union-attr]
            victim = stages.index(1)
            while max((r["round"] for r in peers[victim].rounds()), default=0) < max(1, round(kill_at * rounds)):
                time.sleep(0.5)
            peers[victim].crash()
            killed = {"peer": victim, "at": time.monotonic() - t0}
            time.sleep(5)
            peers[victim] = peers[victim].restart(peers[(victim + 1) % n].maddr)
            pids.append(peers[victim].proc.pid)
            watch.add(victim, peers[victim])
        codes = [p.finish(3600) for p in peers]
    finally:
        watch.stop()
        stop_all(peers)
        for pid in pids:
            release_cap(pid)
    wall = time.monotonic() - t0
    stages = [int(m.group(1)) if (m := STAGE.search(p.log.read_text())) else 0 for p in peers]
    losses = [final_val(p) for p in peers]
    return {
        "wall_s": wall,
        "exit_codes": codes,
        "val_loss": statistics.median([v for v in losses if v == v] or [float("nan")]),  # NaN: none made
        "val_losses": losses,
        "stages": stages,
        "rounds_done": [max((r["round"] for r in p.rounds()), default=0) for p in peers],
        "peak_rss": [watch.figures.get(i, {}).get("peak_rss", 0) for i in range(n)],
        "peak_pss": [watch.figures.get(i, {}).get("peak_pss", 0) for i in range(n)],
        "peak_pss_at_s": [watch.figures.get(i, {}).get("peak_pss_at", 0) for i in range(n)],
        "peak_pss_by_process": [watch.peak_pss_by_process.get(i, {}) for i in range(n)],
        "utilization": [watch.figures[i]["cpu_s"] / watch.figures[i]["wall_s"] for i in range(n)],
        "killed": killed,
        "logs": [str(p.log) for p in peers],  # in the system temporary folder, kept: what each peer did
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="pipeline-parallel training against one process")
    ap.add_argument("--size", default="base", choices=tuple(PRESETS))
    ap.add_argument("--rounds", type=int, default=2, help="(b)'s rounds; (a) runs 6x as many")
    ap.add_argument("--inner-steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--inner-lr", type=float, default=3e-3)
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--eval-blocks", type=int, default=32, help="validation blocks each peer evaluates a round")
    ap.add_argument("--peers-per-stage", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument(
        "--no-one-process", dest="one_process", action="store_false", help="skip (a): the whole model does not fit"
    )
    ap.add_argument("--memory-cap-gb", type=float, help="(b): each peer in a memory cgroup of this size (root)")
    args = ap.parse_args()
    if args.memory_cap_gb and not capped_cgroup_exists():
        raise SystemExit("--memory-cap-gb needs root and a writable cgroup v1 memory controller")
    # The runs' checkpoints (every peer keeps its last rounds': 7-24 GB a run) go when the bench ends.
    with tempfile.TemporaryDirectory(prefix="swarmlm-pipeline-bench-") as folder:
        measure(args, Path(folder))


def measure(args: argparse.Namespace, root: Path) -> None:
    data = root / "data"
    prepare(default_corpus_files()[:4], data, block_size=64)
    common = ("--size", args.size, "--inner-steps", str(args.inner_steps), "--batch-size", str(args.batch_size))
    common += ("--inner-lr", str(args.inner_lr), "--eval-blocks", str(args.eval_blocks), "--matchmaking-time", "2")
    common += ("--min-group-size", "1", "--dtype", args.dtype, "--optimizer", args.optimizer)
    common += ("--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum))
    # A stage of one peer waits for its restart: the others' calls to it retry that long.
    common += ("--averaging-timeout", "60" if args.peers_per_stage > 1 else "600")
    tokens_per_batch = args.batch_size * 63
    n = 3 * args.peers_per_stage
    micro_batches = n * args.rounds * args.inner_steps
    one = None
    if args.one_process:
        console.print("(a) one process ...")
        rounds = n * args.rounds
        one = run_phase(
            data, root / "one", 1, ("--pipeline-stages", "1", "--rounds", str(rounds), *common), None, rounds
        )
    console.print(f"(b) 3 stages x {args.peers_per_stage} peers ...")
    pipe = run_phase(
        data,
        root / "pipe",
        n,
        ("--pipeline-stages", "3", "--rounds", str(args.rounds), "--min-peers", str(args.peers_per_stage), *common),
        args.kill_at,
        args.rounds,
        int(args.memory_cap_gb * 1e9) if args.memory_cap_gb else None,
    )
    state = {"one": state_bytes(args, 1)[0], "stages": state_bytes(args, 3)}
    tokens = micro_batches * tokens_per_batch
    result = {
        "settings": vars(args),
        "micro_batches": micro_batches,
        "tokens": tokens,
        "one": one,
        "pipeline": pipe,
        "loss_ratio": pipe["val_loss"] / one["val_loss"] if one else None,
        # a peer's memory: its processes' summed PSS (main, averager, p2pd); without (a), the largest
        # peer against the whole model's counted state, which no peer held
        "memory_ratio": max(pipe["peak_pss"]) / (one["peak_pss"][0] if one else state["one"]),
        "state_bytes": state,
        "tokens_per_s": {"one": tokens / one["wall_s"] if one else None, "pipeline": tokens / pipe["wall_s"]},
    }
    report(result)
    save_result("pipeline", result)


def report(r: dict[str, Any]) -> None:
    one, pipe, k = r["one"], r["pipeline"], r["settings"]["peers_per_stage"]
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    table = Table(title=f"pipeline training, {r['micro_batches']} micro-batches ({r['tokens']:,} tokens) each way")
    for column in ("", "(a) one process", f"(b) 3 stages x {k} peers", "(b)/(a)"):
        table.add_column(column)
    a_loss = f"{one['val_loss']:.4f}" if one else "not run"
    ratio = f"{r['loss_ratio']:.3f}" if one else ""
    table.add_row("final val loss", a_loss, f"{pipe['val_loss']:.4f}", ratio)
    tps = r["tokens_per_s"]
    a_tps, tps_ratio = (f"{tps['one']:.0f}", f"{tps['pipeline'] / tps['one']:.2f}") if one else ("", "")
    table.add_row("tokens/s", a_tps, f"{tps['pipeline']:.0f}", tps_ratio)
    state = r["state_bytes"]
    table.add_row(
        "peak memory (largest peer: PSS of its processes)",
        gb(one["peak_pss"][0]) if one else f"(counted state {gb(state['one'])})",
        gb(max(pipe["peak_pss"])),
        f"{r['memory_ratio']:.2f}",
    )
    a_rss = one["peak_rss"][0] if one else None
    table.add_row(
        "peak RSS (largest main process)",
        gb(a_rss) if a_rss else "",
        gb(max(pipe["peak_rss"])),
        f"{max(pipe['peak_rss']) / a_rss:.2f}" if a_rss else "",
    )
    if cap := r["settings"]["memory_cap_gb"]:
        table.add_row("memory cap (each peer)", "", f"{cap:.1f} GB", "")
    table.add_row(
        "training state (counted)",
        gb(state["one"]),
        gb(max(state["stages"])),
        f"{max(state['stages']) / state['one']:.2f}",
    )
    for s in range(3):
        util = [u for u, st in zip(pipe["utilization"], pipe["stages"], strict=True) if st == s]
        table.add_row(f"stage {s} CPU utilization", "", " ".join(f"{u:.2f}" for u in util), "")
    if one:
        table.add_row("(a) CPU utilization", f"{one['utilization'][0]:.2f}", "", "")
    table.add_row("rounds done (every peer)", str(one["rounds_done"]) if one else "", str(pipe["rounds_done"]), "")
    table.add_row("exit codes", str(one["exit_codes"]) if one else "", str(pipe["exit_codes"]), "")
    console.print(table)
    for name, phase in (("(a)", one), ("(b)", pipe)):
        if phase:  # the largest peer's processes at its peak
            i = max(range(len(phase["peak_pss"])), key=phase["peak_pss"].__getitem__)
            parts = ", ".join(f"{p} {gb(b)}" for p, b in sorted(phase["peak_pss_by_process"][i].items()))
            console.print(f"{name} peer {i} peaked {phase['peak_pss_at_s'][i]:.0f} s into the phase: {parts}")
    if pipe["killed"]:
        console.print(
            f"killed peer {pipe['killed']['peer']} (stage 1) at {pipe['killed']['at']:.0f} s, restarted 5 s later"
        )


if __name__ == "__main__":
    main()
