"""Swarm benchmark: a 3-peer chain on loopback against the single-process engine, and failover recovery.

Phases (all in one run, side by side on this machine, SmolLM2-135M fp32):
  single     one stream, greedy: decode tokens/s through the chain vs the local engine
  concurrent 16 HTTP clients at once through a gateway (`swarmlm peer --layers none --api`): aggregate
             tokens/s through the swarm vs the local engine's batching of 16 sequences
             (the gateway's --micro-batches 0 makes one group here: every peer is on this machine)
  pinned     pipeline parallelism on two cores: two peers of 15 layers, each pinned to its own core
             (taskset, one thread each), and their gateway (--micro-batches 2: two groups, one at each
             peer), against `swarmlm serve` pinned to one core; 16 HTTP clients each. Each process's CPU
             seconds over the phase (/proc) give how busy it was
  failover   kill -9 of the middle peer a session is using, N times: time from the failure being seen to
             the failed step answered by the new route (replay included), median and p95
Network distance is `make bench-wan`'s (delays outside swarmlm, in namespaces).

Targets: single stream through the swarm >= 0.7 of the local engine; 16 clients through the 3-peer gateway
>= 0.8 of the local engine; pinned 2 peers >= 1.6 of one pinned process; failover median <= 1 s + replay.

All peers share this machine's cores. In a single stream only one peer computes at a time, so each uses
--peer-threads 2 with GOMP_SPINCOUNT=--spin 10000: idle peers' OpenMP workers stop spinning soon enough
to leave the cores to the next peer (libgomp's default spins ~30x longer; 0 pays a wake-up per parallel
region; the sweep behind that value: bench/RESULTS.md).

    make bench-swarm
    .venv/bin/python bench/swarm_bench.py [--kills 20] [--tokens 48] [--clients 16] [--peer-threads 2] [--spin 10000]
        [--micro-batches 2] [--concurrent-micro-batches 0] [--phases single,concurrent,pinned,failover]

Output: a table of the figures (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes
to bench/results/swarm-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.table import Table

from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.launch.peers import PeerProcess, free_port, start_swarm
from swarmlm.launch.servers import ServerProcess
from swarmlm.model.loading import load_model
from swarmlm.swarm.client import RemoteModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result
from proc_stats import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The river town woke slowly on winter mornings. Fishermen pushed their boats into the grey water"


def local_rates(tokens: int, clients: int) -> tuple[float, float]:
    """(single-stream decode tok/s, aggregate tok/s with `clients` sequences) of the whole model in-process."""
    model = load_model()
    engine = Engine(model, make_scheduler("fcfs"), EngineConfig(kv_budget_bytes=1 << 30))
    ids = model.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    def run(n: int) -> tuple[float, float]:
        seqs = [engine.add(ids, params)[0] for _ in range(n)]
        t0 = time.perf_counter()
        while engine.has_work:
            engine.step()
        first = max(s.first_token for s in seqs)  # type: ignore[type-var]
        wall = time.perf_counter() - t0
        decode = (max(s.last_token for s in seqs) - first) / (tokens - 1)  # type: ignore[type-var, operator]
        return 1 / decode, n * tokens / wall

    run(1)  # warm-up
    single = max(run(1)[0] for _ in range(2))  # best of two, as for the swarm
    _, aggregate = run(clients)
    return single, aggregate


def remote_single(client: RemoteModel, tokens: int) -> float:
    ids = client.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    best = 0.0
    for _ in range(2):
        times = [time.perf_counter() for _ in client.stream(ids, params)]
        best = max(best, (len(times) - 1) / (times[-1] - times[0]))
    return best


def http_concurrent(base: str, tokens: int, clients: int) -> float:
    """Aggregate completion tokens/s of `clients` simultaneous HTTP requests to a gateway or server."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}

    def one(_: int) -> int:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
        if r.status_code != 200:  # reported, never silently dropped
            raise RuntimeError(f"gateway answered {r.status_code}: {r.text[:300]}")
        return r.json()["usage"]["completion_tokens"]

    one(0)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(one, range(clients)))
    return done / (time.perf_counter() - t0)


def failover(client: RemoteModel, peers: dict[str, PeerProcess], kills: int, tokens: int, threads: int) -> list[float]:
    """Kill the middle peer in use `kills` times; a fresh peer replaces it before the next round."""
    ids = client.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    boot = peers["first"].maddr
    for i in range(kills):
        before = len(client.stats.recovery_seconds)
        victim = ""
        for n, _ in enumerate(client.stream(ids, params)):
            if n == tokens // 3:
                victim = next(k for k in ("mid", "spare") if peers[k].peer_id in client.active_peers())
                peers[victim].crash()
        # A replacement joins before the next round, so there is always a spare to fail over to.
        peers[victim] = PeerProcess("--layers", "10:20", initial=boot, threads=threads).wait_ready()
        if len(client.stats.recovery_seconds) == before:
            raise RuntimeError("the killed peer's session did not fail over")
        console.print(f"  kill {i + 1}/{kills}: recovered in {client.stats.recovery_seconds[-1] * 1000:.0f} ms")
    return client.stats.recovery_seconds[-kills:]


def busy(procs: dict[str, int], run: Callable[[], float]) -> tuple[float, dict[str, float]]:
    """`run()`'s result, and the share of the wall time each process spent on a CPU meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    t0 = time.perf_counter()
    result = run()
    wall = time.perf_counter() - t0
    return result, {name: (cpu_seconds(pid) - before[name]) / wall for name, pid in procs.items()}


def pinned(tokens: int, clients: int, micro_batches: int) -> dict[str, Any]:
    """Two peers of 15 layers on cores 0 and 1 with their gateway, against one server pinned to core 0."""
    server = ServerProcess("--scheduler", "fcfs", prefix=("taskset", "-c", "0")).wait_ready()
    try:
        one, one_busy = busy({"server": server.proc.pid}, lambda: http_concurrent(server.base, tokens, clients))
    finally:
        server.stop()
    console.print(f"  one process on core 0: {clients} clients {one:.1f} tok/s")
    peers: list[PeerProcess] = []
    try:
        for core, layers in enumerate(("0:15", "15:30")):
            initial = peers[0].maddr if peers else None
            prefix = ("taskset", "-c", str(core))
            peers.append(PeerProcess("--layers", layers, initial=initial, threads=1, prefix=prefix).wait_ready())
        api = f"127.0.0.1:{free_port()}"
        args = ("--layers", "none", "--api", api, "--micro-batches", str(micro_batches))
        gateway = PeerProcess(*args, initial=peers[0].maddr, threads=1).wait_ready()
        peers.append(gateway)
        procs = {"peer 0:15": peers[0].proc.pid, "peer 15:30": peers[1].proc.pid, "gateway": gateway.proc.pid}
        two, two_busy = busy(procs, lambda: http_concurrent(f"http://{api}", tokens, clients))
    finally:
        for peer in peers:
            peer.stop()
    console.print(f"  two pinned peers: {clients} clients {two:.1f} tok/s ({two / one:.2f}x)")
    return {"one_core_tok_s": one, "two_cores_tok_s": two, "ratio": two / one, "busy": one_busy | two_busy}


def main() -> None:
    ap = argparse.ArgumentParser(description="swarmlm swarm benchmark")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--peer-threads", type=int, default=2, help="compute threads per peer (they share the cores)")
    ap.add_argument("--spin", default="10000", help="GOMP_SPINCOUNT of the peers (see the module docstring)")
    ap.add_argument("--micro-batches", type=int, default=2, help="the pinned phase gateway's --micro-batches")
    ap.add_argument("--concurrent-micro-batches", type=int, default=0, help="the 3-peer gateway's (0: automatic)")
    ap.add_argument("--phases", default="single,concurrent,pinned,failover", help="which phases to run")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: no peer outlives us
    torch.set_num_threads(2)
    result: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tokens": args.tokens,
        "clients": args.clients,
        "peer_threads": args.peer_threads,
        "gomp_spincount": args.spin,
        "micro_batches_pinned": args.micro_batches,
        "micro_batches_concurrent": args.concurrent_micro_batches,
    }
    table = Table(title="Swarm benchmark (SmolLM2-135M fp32 on loopback, 2 CPU cores)")
    for col in ("measure", "one process", "swarm", "ratio / target"):
        table.add_column(col)

    if phases & {"single", "concurrent", "failover"}:
        console.rule("local engine (one process, whole model)")
        local_single, local_agg = local_rates(args.tokens, args.clients)
        console.print(f"  single {local_single:.1f} tok/s, {args.clients} streams {local_agg:.1f} tok/s")
        result |= {"local_single_tok_s": local_single, "local_aggregate_tok_s": local_agg}
        three_peers(args, phases, result)
        if "single" in phases:
            swarm_single = result["swarm_single_tok_s"]
            result["single_ratio"] = ratio = swarm_single / local_single
            table.add_row("single stream tok/s", f"{local_single:.1f}", f"{swarm_single:.1f}", f"{ratio:.2f} (>= 0.7)")
        if "concurrent" in phases:
            swarm_agg = result["swarm_aggregate_tok_s"]
            result["aggregate_ratio"] = ratio = swarm_agg / local_agg
            row = f"{args.clients} clients tok/s (3-peer gateway)"
            table.add_row(row, f"{local_agg:.1f}", f"{swarm_agg:.1f}", f"{ratio:.2f} (>= 0.8)")
        if recoveries := result.get("recoveries"):
            result["kills"] = len(recoveries)
            result["recovery_median_s"] = median = statistics.median(recoveries)
            result["recovery_p95_s"] = p95 = sorted(recoveries)[max(0, round(0.95 * len(recoveries)) - 1)]
            shown = f"median {median * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
            table.add_row(f"failover over {len(recoveries)} kills", "", shown, "median <= 1 s + replay")
    if "pinned" in phases:
        console.rule("pinned: two peers on two cores against one process on one core")
        result["pinned"] = pin = pinned(args.tokens, args.clients, args.micro_batches)
        row = f"{args.clients} clients tok/s, pinned 2 peers vs 1 core"
        two, one = pin["two_cores_tok_s"], pin["one_core_tok_s"]
        table.add_row(row, f"{one:.1f}", f"{two:.1f}", f"{pin['ratio']:.2f} (>= 1.6)")
        shares = ", ".join(f"{name} {share:.0%}" for name, share in pin["busy"].items())
        table.add_row("  CPU busy during the phase", "", shares, "")
    console.print(table)
    save_result("swarm", result)


def three_peers(args: argparse.Namespace, phases: set[str], result: dict[str, Any]) -> None:
    """The single, concurrent and failover phases, on one 3-peer chain (a spare joins for failover)."""
    console.rule("swarm: 3 peers on loopback, then a gateway, then a spare middle peer for failover")
    os.environ["GOMP_SPINCOUNT"] = args.spin  # read by each peer's OpenMP runtime when it starts
    started = start_swarm(["0:10", "10:20", "20:30"], threads=args.peer_threads)
    peers = dict(zip(("first", "mid", "last"), started, strict=True))
    try:
        with RemoteModel(initial_peers=[peers["first"].maddr]) as client:
            client.generate(client.tokenizer.encode(PROMPT), SamplingParams(max_tokens=4, temperature=0))  # warm-up
            if "single" in phases:
                result["swarm_single_tok_s"] = remote_single(client, args.tokens)
                console.print(f"  single {result['swarm_single_tok_s']:.1f} tok/s")
            if "concurrent" in phases:
                # Only now the gateway: on 2 cores even idle extra processes slowed the single stream in
                # some runs (the phase measures the 3-peer chain).
                api = f"127.0.0.1:{free_port()}"
                gw_args = ("--layers", "none", "--api", api, "--micro-batches", str(args.concurrent_micro_batches))
                gateway = PeerProcess(*gw_args, initial=peers["first"].maddr, threads=None)
                peers["gateway"] = gateway.wait_ready()
                result["swarm_aggregate_tok_s"] = agg = http_concurrent(f"http://{api}", args.tokens, args.clients)
                console.print(f"  {args.clients} clients through the gateway {agg:.1f} tok/s")
                gateway.stop()  # the failover phase drives sessions from this process
            if "failover" in phases and args.kills > 0:
                spare = PeerProcess("--layers", "10:20", initial=peers["first"].maddr, threads=args.peer_threads)
                peers["spare"] = spare.wait_ready()
                result["recoveries"] = failover(client, peers, args.kills, args.tokens, args.peer_threads)
    finally:
        for p in peers.values():
            p.stop()


if __name__ == "__main__":
    main()
