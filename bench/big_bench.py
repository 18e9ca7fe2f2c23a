"""Big-model benchmark: SmolLM2-1.7B's shape (seeded random weights, `make big-model`) that no capped peer holds.

Phases, one at a time (each one's processes stopped before the next starts: 2 cores and 24 GiB shared):
  refuse  `swarmlm serve --max-memory CAP`, CAP below the whole model: its exit code and its one line
  swarm   three `swarmlm peer --layers auto --max-memory CAP --kv-budget KV` (CAP: KV and a third of the
          layers and a half, so each takes a third; far below the whole model), started one after another
          so each sees the spans already taken (an auto peer announces its span once loaded), then a gateway
          (`--layers none --api`): a fixed prompt's greedy completion, streamed; decode tok/s. Then each
          peer's RSS (VmRSS of the peer process, /proc/PID/status) against its span's weight bytes
          (`model/memory.py`, which equals what loading allocates) and its KV budget; its peak (VmHWM) beside
          it, and whether it signed the model version (reading every layer once, one at a time)
  single  one uncapped `swarmlm serve` of the whole model: the same request, decode tok/s, and its RSS

Targets: the swarm's greedy text is the single process's, token for token; each peer's RSS <= 1.3 x its
span's weights + its KV budget. Every process runs bf16 (the checkpoint's dtype: 3.4 GB for the whole
model; on this CPU a bf16 matrix-vector product reads weights at about fp32's bandwidth, so twice the
tokens/s) with 2 compute threads and GOMP_SPINCOUNT=10000 (see bench/swarm_bench.py: in one stream one
peer computes at a time). Each tok/s comes with the share of the CPU other processes took meanwhile
(bench/foreign_cpu.py): on a shared machine that is what a reader needs to discount a slow run.

    make bench-big
    .venv/bin/python bench/big_bench.py [--tokens 24] [--kv-budget-mib 256] [--model DIR]

Output: a table of the figures (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes
to bench/results/big-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import PeerProcess, alive, free_port, stop_all
from swarmlm.launch.random_model import DEFAULT_DIR, write_random_model
from swarmlm.launch.servers import ServerProcess
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.memory import layer_weight_bytes, span_weight_bytes
from swarmlm.model.model_config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result
from foreign_cpu import ForeignCpu
from proc_stats import memory

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
PROMPT = "The river town woke slowly on winter mornings. Fishermen pushed their boats into the grey water"
DTYPE = "bf16"
THREADS = "2"
MIB = 1 << 20


def greedy(base: str, model_id: str, tokens: int) -> tuple[str, float]:
    """(text, decode tok/s) of the prompt's greedy completion, streamed: tokens after the first over the
    time between the first and the last."""
    body = {
        "model": model_id,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, times, used = "", [], 0
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base} answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                text += chunk["choices"][0]["text"]
                times.append(time.perf_counter())
    if used != tokens:
        raise RuntimeError(f"{base} generated {used} tokens, not {tokens}")
    return text, (tokens - 1) / (times[-1] - times[0])


def refuse(model: Path, cap: int, kv_budget: int) -> dict[str, object]:
    """`swarmlm serve --max-memory cap`: its exit code and its error lines."""
    cmd = [sys.executable, "-m", "swarmlm.cli", "serve", "--model", str(model), "--dtype", DTYPE]
    cmd += ["--port", str(free_port()), "--max-memory", str(cap), "--kv-budget", str(kv_budget)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    return {"exit_code": done.returncode, "line": " / ".join(errors), "stderr_lines": len(done.stderr.splitlines())}


def swarm(model: Path, cfg: ModelConfig, cap: int, kv_budget: int, tokens: int) -> dict[str, object]:
    """Three capped `--layers auto` peers and a gateway: the greedy completion and each peer's memory."""
    common = ("--model", str(model), "--dtype", DTYPE, "--threads", THREADS, "--kv-budget", str(kv_budget))
    auto = ("--layers", "auto", "--max-memory", str(cap), "--rebalance-period", "0", *common)
    peers: list[PeerProcess] = []
    try:
        for i in range(3):  # one after another: an auto peer chooses among the spans already announced
            peers.append(PeerProcess(*auto, initial=peers[0].maddr if peers else None, threads=None))
            peers[-1].wait_ready(timeout=900)
            console.print(f"  peer {i}: layers {peers[-1].span()}")
        api = f"127.0.0.1:{free_port()}"
        gateway = PeerProcess("--layers", "none", "--api", api, *common, initial=peers[0].maddr, threads=None)
        peers.append(gateway)
        gateway.wait_ready(timeout=600)
        base = f"http://{api}"
        greedy(base, model.name, 4)  # warm-up
        meter = ForeignCpu(*(p.proc.pid for p in peers))  # each peer leads its process group
        text, rate = greedy(base, model.name, tokens)
        other_cpu = meter.share()
        spans = []
        for p in peers[:3]:
            start, end = p.span()
            spans.append(
                {
                    "layers": f"{start}:{end}",
                    "weight_bytes": span_weight_bytes(cfg, start, end, False, DTYPE, "none"),
                    "kv_budget_bytes": kv_budget,
                    # The peer that signs the model version reads every layer once, one at a time, to digest it.
                    "signed_model_version": "signed the model version" in p.log.read_text(),
                    # Its DHT process (forked: shares pages with the peer), p2pd, torch's shm manager.
                    "children_rss_bytes": sum(memory(c)["rss_bytes"] for c in alive(p.pids() - {p.proc.pid})),
                    **memory(p.proc.pid),
                }
            )
        gateway_rss = memory(gateway.proc.pid)["rss_bytes"]
    finally:
        stop_all(peers)
    for s in spans:
        s["target_bytes"] = int(1.3 * s["weight_bytes"] + s["kv_budget_bytes"])
        s["rss_over_weights"] = s["rss_bytes"] / s["weight_bytes"]
        s["meets_target"] = s["rss_bytes"] <= s["target_bytes"]
    return {"text": text, "tok_s": rate, "other_cpu": other_cpu, "peers": spans, "gateway_rss_bytes": gateway_rss}


def single(model: Path, kv_budget: int, tokens: int) -> dict[str, object]:
    server = ServerProcess("--model", str(model), "--dtype", DTYPE, "--kv-budget", str(kv_budget))
    try:
        server.wait_ready(timeout=600)
        greedy(server.base, model.name, 4)  # warm-up
        meter = ForeignCpu(server.proc.pid)
        text, rate = greedy(server.base, model.name, tokens)
        other_cpu = meter.share()
        mem = memory(server.proc.pid)
    finally:
        server.stop()
    return {"text": text, "tok_s": rate, "other_cpu": other_cpu, **mem}


def gb(n: float) -> str:
    """Decimal gigabytes, as swarmlm prints sizes (core/sizes.py), with the two decimals a ratio needs."""
    return f"{n / 1e9:.2f} GB"


def cpu(share: object) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description="swarmlm big-model benchmark")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--kv-budget-mib", type=int, default=256)
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup: no peer outlives us
    os.environ["GOMP_SPINCOUNT"] = "10000"  # read by each process's OpenMP runtime when it starts
    if args.model == DEFAULT_DIR:
        write_random_model()  # skipped when complete (`make big-model`)
    cfg = open_checkpoint(args.model).config
    whole = span_weight_bytes(cfg, 0, cfg.num_layers, True, DTYPE, "none")
    kv = args.kv_budget_mib * MIB
    # Room for the KV budget and a third of the layers and a half (`--layers auto` takes whole layers).
    cap = kv + max(layer_weight_bytes(cfg, DTYPE, "none")) * (2 * -(-cfg.num_layers // 3) + 1) // 2
    console.print(f"model {args.model.name}: {gb(whole)} of weights ({DTYPE}); each peer's cap {gb(cap)}")

    console.rule("refuse: serve under the cap")
    refused = refuse(args.model, cap, kv)
    console.print(f"  exit {refused['exit_code']}: {refused['line']}")
    console.rule("swarm: 3 capped --layers auto peers and a gateway")
    swarmed = swarm(args.model, cfg, cap, kv, args.tokens)
    console.print(f"  {swarmed['tok_s']:.2f} tok/s")
    console.rule("single: one uncapped serve process")
    alone = single(args.model, kv, args.tokens)
    console.print(f"  {alone['tok_s']:.2f} tok/s")

    result = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": args.model.name,
        "dtype": DTYPE,
        "whole_weight_bytes": whole,
        "cap_bytes": cap,
        "tokens": args.tokens,
        "refused": refused,
        "swarm": swarmed,
        "single": alone,
        "texts_identical": swarmed["text"] == alone["text"],
        "swarm_over_single": swarmed["tok_s"] / alone["tok_s"],
    }
    table = Table(title=f"Big model ({args.model.name}, {DTYPE}, {gb(whole)}; 2 CPU cores)")
    for col in ("measure", "figure", "target"):
        table.add_column(col)
    table.add_row("serve --max-memory " + gb(cap), f"exit {refused['exit_code']}: {refused['line']}", "one line")
    for name, phase in (("3 capped peers + gateway", swarmed), ("one uncapped serve", alone)):
        table.add_row(f"tok/s: {name}", f"{phase['tok_s']:.2f} (other processes' CPU {cpu(phase['other_cpu'])})", "")
    table.add_row("greedy texts identical", str(result["texts_identical"]), "True")
    for s in swarmed["peers"]:  # type: ignore[union-attr]
        rss = f"{gb(s['rss_bytes'])} ({gb(s['peak_rss_bytes'])})"
        table.add_row(
            f"peer {s['layers']} RSS (peak)",
            f"{rss} = {s['rss_over_weights']:.2f} x weights {gb(s['weight_bytes'])}",
            f"<= {gb(s['target_bytes'])} (1.3 x weights + KV {gb(s['kv_budget_bytes'])})",
        )
    table.add_row("single serve RSS (peak)", f"{gb(alone['rss_bytes'])} ({gb(alone['peak_rss_bytes'])})", "")
    console.print(table)
    if not result["texts_identical"]:
        console.print(f"swarm:  {swarmed['text']!r}\nsingle: {alone['text']!r}")
    save_result("big", result)


if __name__ == "__main__":
    main()
