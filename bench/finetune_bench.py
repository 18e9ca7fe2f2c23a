"""Fine-tuning SmolLM2 through a 3-peer swarm against the same run in one process, with a peer killed.

Four peers on loopback (layers 0:10, 10:20, 20:30 and a second 10:20), each on one thread; a client
tunes --prompt-tokens prompt rows and rank --rank LoRA adapters on every layer with AdamW, fp32 on the
wire, through the swarm (`RemoteModel.fine_tuning`); its one-process twin (`launch/peft_twin.py`: peft's
LoRA on the whole model here) starts from the same values and takes the same steps on the same batches.
At step --kill-step the middle peer of that step's route is killed between its forward and backward
pass. Reported per step: both losses, their difference, and each step's time (the twin on one thread).

    make bench-finetune
    .venv/bin/python bench/finetune_bench.py [--steps 8] [--rows 4] [--length 64] [--kill-step 4]

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/finetune-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import PeerProcess, stop_all
from swarmlm.launch.peft_twin import PeftTwin
from swarmlm.model.loading import load_model
from swarmlm.swarm.client import ClientConfig, RemoteModel
from swarmlm.train.data.sources import default_corpus_files

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result

console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def main() -> None:
    ap = argparse.ArgumentParser(description="fine-tuning through the swarm against one process")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kill-step", type=int, default=4, help="-1: no kill")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(device="cpu", dtype="fp32")
    text = default_corpus_files()[0].read_text(encoding="utf-8")[:20000]
    ids = torch.tensor(model.tokenizer.encode(text))
    span = args.rows * args.length
    batches = [ids[s * span : (s + 1) * span].view(args.rows, args.length) for s in range(args.steps)]
    peers: dict[str, PeerProcess] = {}
    try:
        peers["a"] = PeerProcess("--layers", "0:10").wait_address()
        for name, layers in (("b", "10:20"), ("c", "20:30"), ("d", "10:20")):
            peers[name] = PeerProcess("--layers", layers, initial=peers["a"].maddr)
        for peer in peers.values():
            peer.wait_ready()
        config = ClientConfig(wire_dtype="fp32", ban_seconds=600)
        with RemoteModel(initial_peers=[peers["a"].maddr], config=config) as remote:
            rows = run(args, model, remote, peers, batches)
            recovery = remote.stats.recovery_seconds
    finally:
        stop_all(list(peers.values()))
    report(args, rows, recovery)


def run(
    args: argparse.Namespace,
    model: object,
    remote: RemoteModel,
    peers: dict[str, PeerProcess],
    batches: list[torch.Tensor],
) -> list[dict[str, float]]:
    tuned = remote.fine_tuning(prompt_tokens=args.prompt_tokens, lora_rank=args.rank, seed=0)
    twin = PeftTwin(model.span, tuned)  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=args.lr)
    twin_optimizer = torch.optim.AdamW(twin.params, lr=args.lr)
    rows = []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = tuned.loss(batch)
        if step == args.kill_step:
            victim = next(peers[n] for n in ("b", "d") if peers[n].peer_id in tuned.body.last_peers)
            victim.crash()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        swarm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        twin_loss = twin.loss(batch)
        twin_loss.backward()
        twin_optimizer.step()
        twin_optimizer.zero_grad()
        local_s = time.perf_counter() - t0
        rows.append(
            {
                "step": step,
                "swarm_loss": loss.item(),
                "local_loss": twin_loss.item(),
                "diff": abs(loss.item() - twin_loss.item()),
                "swarm_s": swarm_s,
                "local_s": local_s,
                "killed": step == args.kill_step,
            }
        )
    return rows


def report(args: argparse.Namespace, rows: list[dict[str, float]], recovery: list[float]) -> None:
    table = Table(
        title=f"fine-tuning SmolLM2-135M: {args.rows}x{args.length} tokens a step, prompt "
        f"{args.prompt_tokens} + LoRA rank {args.rank}, fp32 wire; swarm 3 peers vs one process"
    )
    for column in ("step", "swarm loss", "one process", "|difference|", "swarm s", "one process s", ""):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r["step"]),
            f"{r['swarm_loss']:.6f}",
            f"{r['local_loss']:.6f}",
            f"{r['diff']:.1e}",
            f"{r['swarm_s']:.2f}",
            f"{r['local_s']:.2f}",
            "peer killed mid-step" if r["killed"] else "",
        )
    console.print(table)
    calm = [r for r in rows if not r["killed"] and r["step"] > 0]
    summary = {
        "max_diff": max(r["diff"] for r in rows),
        "swarm_step_s": sum(r["swarm_s"] for r in calm) / len(calm),
        "local_step_s": sum(r["local_s"] for r in calm) / len(calm),
        "recovery_s": recovery,
    }
    summary["swarm_vs_local"] = summary["swarm_step_s"] / summary["local_step_s"]
    console.print(
        f"max |loss difference| {summary['max_diff']:.1e}; step {summary['swarm_step_s']:.2f} s through the swarm, "
        f"{summary['local_step_s']:.2f} s in one process ({summary['swarm_vs_local']:.2f}x); failovers {recovery}"
    )
    save_result("finetune", {"args": vars(args), "steps": rows, **summary})


if __name__ == "__main__":
    main()
