"""WAN benchmark: the swarm with real network distance between every host, outside swarmlm's code.

Each one-way delay in --delays gets a fresh `launch/wan.py` router: 4 network namespaces (3 peers of 10
layers each of SmolLM2-135M, fp32, 1 thread each, and the client), every packet between them (DHT, P2P
streams) held for that delay in user space, since this kernel has no netem. The client, in its own
namespace, decodes one greedy stream of --tokens tokens through the 3-peer chain (best of two).
Then the same chain at no delay plus a twin of its middle peer --nearer-ms away (one way), through which
the client joins: tok/s of the route the client chooses (the near twin, by measured round trips) and of
the route with the near twin excluded.

Beside each measured tok/s, two bounds from the 0 ms run's time per token (compute, C):
  round trips  C + 2·h·d: a client that sends each hop's input and reads its output (swarmlm before
               peers pushed to peers)
  push         C + (h+1)·d: peers forwarding to the next peer, the last answering the client (today's)
with h = 3 hops and d the one-way delay. The 0 ms row is the same router with no delay: its cost.

    make bench-wan                       # root, /dev/net/tun and iproute2
    .venv/bin/python bench/wan_bench.py [--delays 0,10,25,50] [--tokens 24] [--loss 0.01] [--rate-mbit 100]
        [--nearer-ms 50]

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/wan-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import PeerProcess, start_peers, stop_all
from swarmlm.launch.wan import WanRouter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result

ROOT = Path(__file__).resolve().parent.parent
SPANS = ("0:10", "10:20", "20:30")
PROMPT = "The river town woke slowly on winter mornings. Fishermen pushed their boats into the grey water"
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def client_rate(initial: str, tokens: int, avoid: str | None = None) -> dict[str, object]:
    """Run in the client's namespace: the best of two greedy streams' decode tok/s, the tokens and the
    peers the last one went through (`avoid`: a peer id the routes may not use)."""
    from swarmlm.engine.sampling import SamplingParams
    from swarmlm.swarm.client import ClientConfig, RemoteModel

    with RemoteModel(initial_peers=[initial]) as probe:  # the swarm's peers, for allowed_peers
        everyone = tuple(r.peer_id for r in probe.records() if r.peer_id != avoid)
    config = ClientConfig(allowed_peers=everyone if avoid else ())
    with RemoteModel(initial_peers=[initial], config=config) as client:
        ids = client.tokenizer.encode(PROMPT)
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        best, out, used = 0.0, [], []
        for _ in range(2):
            stamps, out = [], []
            for token in client.stream(ids, params):
                stamps.append(time.perf_counter())
                out.append(token)
                if len(out) == 2:
                    used = sorted(client.active_peers())
            best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"tok_s": best, "tokens": out, "peers": used}


def measure(delay: float, tokens: int, loss: float, rate: float | None) -> dict[str, object]:
    hosts = ["client", *(f"peer{i}" for i in range(len(SPANS)))]
    with WanRouter(hosts, delay=delay, loss=loss, rate=rate) as wan:

        def make(rank: int, boot: str | None) -> PeerProcess:
            host = f"peer{rank}"
            listen = ("--host-maddrs", f"/ip4/{wan.ip(host)}/tcp/0", "--rebalance-period", "0")
            return PeerProcess("--layers", SPANS[rank], *listen, initial=boot, prefix=wan.prefix(host))

        t0 = time.perf_counter()
        peers = start_peers(len(SPANS), make)
        started = time.perf_counter() - t0
        try:
            cmd = [*wan.prefix("client"), sys.executable, __file__, "--client", peers[0].maddr]
            done = subprocess.run([*cmd, "--tokens", str(tokens)], capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"client failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            stop_all(peers)
    return {"delay_ms": delay * 1000, "peers_ready_s": round(started, 1), **result}


def measure_nearer(tokens: int, far: float) -> dict[str, object]:
    """The chain of SPANS at no delay, plus a second peer of the middle span `far` seconds away one way,
    through which the client joins: its routes as chosen (they should take the near one), and with the
    near one excluded (what a route blind to distance risks)."""
    hosts = ["client", "far", *(f"peer{i}" for i in range(len(SPANS)))]
    with WanRouter(hosts, delay=0.0, distance={"far": far}, subnet="10.85.0") as wan:
        peers: list[PeerProcess] = []
        try:
            for host, span in (("far", SPANS[1]), *((f"peer{i}", s) for i, s in enumerate(SPANS))):
                listen = ("--host-maddrs", f"/ip4/{wan.ip(host)}/tcp/0", "--rebalance-period", "0")
                boot = peers[0].maddr if peers else None
                peers.append(PeerProcess("--layers", span, *listen, initial=boot, prefix=wan.prefix(host)))
                peers[-1].wait_ready()
            runs = {}
            for name, avoid in (("chosen", ()), ("via far", ("--client-avoid", peers[2].peer_id))):
                cmd = [*wan.prefix("client"), sys.executable, __file__, "--client", peers[0].maddr, *avoid]
                done = subprocess.run([*cmd, "--tokens", str(tokens)], capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    raise RuntimeError(f"client failed:\n{done.stderr[-3000:]}")
                runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            stop_all(peers)
    return {
        "far_ms": far * 1000,
        "chosen_tok_s": runs["chosen"]["tok_s"],
        "via_far_tok_s": runs["via far"]["tok_s"],
        "chosen_uses_far": peers[0].peer_id in runs["chosen"]["peers"],
        "via_far_uses_far": peers[0].peer_id in runs["via far"]["peers"],
        "identical": runs["chosen"]["tokens"] == runs["via far"]["tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="The swarm across emulated network distance")
    ap.add_argument("--delays", default="0,10,25,50", help="one-way delays in ms, comma separated")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--loss", type=float, default=0.0, help="share of packets dropped between hosts")
    ap.add_argument("--rate-mbit", type=float, help="each host's incoming bandwidth, Mbit/s (default: no cap)")
    ap.add_argument("--nearer-ms", type=float, default=50, help="the far twin's one-way distance (0: skip)")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the client in its namespace
    ap.add_argument("--client-avoid", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client_rate(args.client, args.tokens, args.client_avoid)), flush=True)
        return
    rate = args.rate_mbit * 1e6 if args.rate_mbit else None
    runs = [measure(int(d) / 1000, args.tokens, args.loss, rate) for d in args.delays.split(",")]
    base = next((r for r in runs if r["delay_ms"] == 0), None)
    compute = 1 / float(base["tok_s"]) if base else None
    hops = len(SPANS)
    table = Table(title=f"SmolLM2-135M, {hops} peers x 10 layers, one greedy stream, {args.tokens} tokens")
    for column in ("one-way delay", "tok/s", "bound: round trips", "bound: push", "identical to 0 ms", "peers up"):
        table.add_column(column)
    for r in runs:
        d = float(r["delay_ms"]) / 1000
        if compute is not None:
            r["bound_round_trips_tok_s"] = round(1 / (compute + 2 * hops * d), 2)
            r["bound_push_tok_s"] = round(1 / (compute + (hops + 1) * d), 2)
            r["identical_to_0ms"] = r["tokens"] == base["tokens"]
        table.add_row(
            f"{r['delay_ms']:.0f} ms",
            f"{float(r['tok_s']):.2f}",
            str(r.get("bound_round_trips_tok_s", "")),
            str(r.get("bound_push_tok_s", "")),
            str(r.get("identical_to_0ms", "")),
            f"{r['peers_ready_s']} s",
        )
    console.print(table)
    nearer = measure_nearer(args.tokens, args.nearer_ms / 1000) if args.nearer_ms else None
    if nearer is not None:
        twin = Table(
            title=f"two peers of layers {SPANS[1]}: one near, one {args.nearer_ms:.0f} ms away (joined through)"
        )
        for column in ("route", "tok/s", "through the far one", "tokens identical"):
            twin.add_column(column)
        twin.add_row(
            "as chosen", f"{nearer['chosen_tok_s']:.2f}", str(nearer["chosen_uses_far"]), str(nearer["identical"])
        )
        twin.add_row("near one excluded", f"{nearer['via_far_tok_s']:.2f}", str(nearer["via_far_uses_far"]), "")
        console.print(twin)
    result = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "hops": hops,
        "tokens": args.tokens,
        "loss": args.loss,
        "rate_mbit": args.rate_mbit,
        "runs": runs,
        "nearer": nearer,
    }
    save_result("wan", result)


if __name__ == "__main__":
    main()
