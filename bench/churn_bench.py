"""Churn benchmark: many peers, two gateways and streaming clients while a chaos loop kills peers.

--peers `swarmlm peer --layers auto --num-layers K` processes (SmolLM2-135M fp32, one thread each), each
in its own network namespace behind `launch/wan.py`'s router (no delay: a host each, as on a LAN), and
--gateways gateways serving no layers (`--wire-dtype fp32`: with bf16 between 4-5 hops, one of the four
prompts got another greedy answer than the fp32 single-process engine's, the same one every time).
--clients streaming clients in a namespace of their own send
greedy completions to the gateways in turn for --duration seconds, while every --kill-every seconds a
random serving peer (the bootstrap too) is killed with SIGKILL and restarted --restart-after seconds later
in the same namespace, joining through any two peers still alive. Every --status-every seconds the
clients' host times `swarmlm status`, a new process, in turns: through three live peers picked at random
(its own DHT node) and through a gateway (`--gateway`: no hivemind import, the gateway's DHT node).

Reported: requests done and failed, how many answers differ from the single-process engine's greedy
text, tokens/s over time (a PNG with the kills marked, bench/results/churn-<time>.png), each kill's
recovery (the longest pause between tokens of the streams in flight during the 10 s after it), status
times and exit codes (1: some layers had no live peer, a coverage gap), and each live peer's RSS at the
end. The same chaos for DiLoCo trainers: bench/train_churn_bench.py.

    make bench-churn                      # root, /dev/net/tun and iproute2; installs matplotlib
    .venv/bin/python bench/churn_bench.py [--peers 16] [--gateways 2] [--clients 16] [--duration 300]
        [--kill-every 15] [--restart-after 10] [--num-layers 8] [--tokens 24]

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/churn-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import PeerProcess, alive, stop_all
from swarmlm.launch.wan import WanRouter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module

from bench_output import save_result
from proc_stats import memory

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "The river town woke slowly on winter mornings.",
    "Once upon a time, in a quiet village,",
    "The capital of France is",
    "Write a short poem about the sea.",
]
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


# ----- the clients' host -----------------------------------------------------------------------------
def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the clients' namespace: the streaming load and the status probes; returns what happened."""
    import httpx

    stop_at = time.time() + spec["duration"]
    requests: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    turn = iter(range(10**9))
    lock = threading.Lock()

    def one_client(i: int) -> None:
        while time.time() < stop_at:
            with lock:
                n = next(turn)
            prompt = PROMPTS[n % len(PROMPTS)]
            gateway = spec["gateways"][n % len(spec["gateways"])]
            body = {"model": MODEL, "prompt": prompt, "max_tokens": spec["tokens"], "temperature": 0, "stream": True}
            record: dict[str, Any] = {"client": i, "gateway": gateway, "prompt": prompt, "start": time.time()}
            record |= {"times": [], "error": None}
            text = ""
            try:
                with httpx.stream("POST", f"http://{gateway}/v1/completions", json=body, timeout=300) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(str(chunk["error"])[:200])
                            text += chunk["choices"][0]["text"]
                            record["times"].append(time.time())
            except Exception as e:  # counted as a failed request, with its reason
                record["error"] = f"{type(e).__name__}: {e}"
            record["end"] = time.time()
            record["identical"], record["text"] = text == spec["reference"][prompt], text
            requests.append(record)

    def probe_status() -> None:
        for n in itertools.count():
            time.sleep(spec["status_every"])
            if time.time() >= stop_at:
                return
            if n % 2:  # through a gateway's warm DHT node: a small process that imports no hivemind
                via, args = "gateway", ["--gateway", spec["gateways"][n // 2 % len(spec["gateways"])]]
            else:  # its own DHT node, through three live peers
                live = json.loads(Path(spec["live_file"]).read_text())
                via, args = "dht", [a for b in random.sample(live, k=min(3, len(live))) for a in ("--initial-peers", b)]
            parts = {}
            if via == "gateway":  # where a gateway probe's time goes: the gateway's answer, a process's start
                t0 = time.time()
                httpx.get(f"http://{args[1]}/dashboard/state", timeout=60)
                parts["answer_seconds"] = time.time() - t0
                t0 = time.time()
                subprocess.run([sys.executable, "-c", "pass"], timeout=60)
                parts["python_seconds"] = time.time() - t0
            t0 = time.time()
            done = subprocess.run(
                [sys.executable, "-m", "swarmlm.cli", "status", *args], capture_output=True, timeout=120
            )
            probes.append({"at": t0, "via": via, "seconds": time.time() - t0, "exit": done.returncode, **parts})

    with ThreadPoolExecutor(spec["clients"] + 1) as pool:
        pool.submit(probe_status)
        list(pool.map(one_client, range(spec["clients"])))
    return {"requests": requests, "probes": probes}


# ----- the chaos --------------------------------------------------------------------------------------
def reference(tokens: int) -> dict[str, str]:
    """The single-process engine's greedy text for each prompt."""
    from swarmlm.engine.engine import Engine, EngineConfig
    from swarmlm.engine.sampling import SamplingParams
    from swarmlm.engine.scheduler import make_scheduler
    from swarmlm.model.loading import load_model

    model = load_model()
    engine = Engine(model, make_scheduler("fcfs"), EngineConfig(kv_budget_bytes=256 << 20))
    seqs = {
        p: engine.add(model.tokenizer.encode(p), SamplingParams(max_tokens=tokens, temperature=0))[0] for p in PROMPTS
    }
    while engine.has_work:
        engine.step()
    return {p: s.text for p, s in seqs.items()}


class Chaos:
    """The peers, their restarts, and the kill log."""

    def __init__(self, wan: WanRouter, args: argparse.Namespace, live_file: Path) -> None:
        self.wan, self.args, self.live_file = wan, args, live_file
        self.peers: dict[str, PeerProcess] = {}
        self.kills: list[dict[str, Any]] = []
        self.rng = random.Random(0)

    def start(self, host: str, initial: list[str]) -> PeerProcess:
        args = ["--layers", "auto", "--num-layers", str(self.args.num_layers)]
        args += ["--host-maddrs", f"/ip4/{self.wan.ip(host)}/tcp/0"]
        args += [a for m in initial[1:] for a in ("--initial-peers", m)]
        peer = PeerProcess(*args, initial=initial[0] if initial else None, prefix=self.wan.prefix(host))
        self.peers[host] = peer
        return peer

    def live_maddrs(self, k: int) -> list[str]:
        live = [p.maddr for p in self.peers.values() if p.proc.poll() is None and p.maddr]
        return self.rng.sample(live, k=min(k, len(live)))

    def publish_live(self) -> None:
        """Where the live peers listen, for the status probes (a restarted peer listens on a new port)."""
        for peer in self.peers.values():
            if not peer.maddr and peer.proc.poll() is None:
                with contextlib.suppress(TimeoutError, RuntimeError):
                    peer.wait_address(timeout=0.01)
        live = [p.maddr for p in self.peers.values() if p.proc.poll() is None and p.maddr]
        self.live_file.write_text(json.dumps(live))

    def run(self, until: float) -> None:
        """Kill a random peer every kill_every s; restart each restart_after s later."""
        restarts: list[tuple[float, str]] = []
        next_kill = time.time() + self.args.kill_every
        while time.time() < until:
            self.publish_live()
            now = time.time()
            for due, host in [r for r in restarts if r[0] <= now]:
                restarts.remove((due, host))
                self.start(host, self.live_maddrs(2))
            if now >= next_kill:
                host = self.rng.choice([h for h, p in self.peers.items() if p.proc.poll() is None])
                self.peers[host].crash()
                self.kills.append({"at": now, "host": host, "bootstrap": host == "peer0"})
                restarts.append((now + self.args.restart_after, host))
                next_kill += self.args.kill_every
            time.sleep(0.2)


def rss_bytes(peer: PeerProcess) -> int:
    """Resident memory of the peer and every process below it (its DHT process, p2pd)."""
    total = 0
    for pid in alive(peer.pids()):
        with contextlib.suppress(OSError):  # it may exit between the two reads
            total += memory(pid)["rss_bytes"]
    return total


def summarize(run: dict[str, Any], kills: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    requests, probes = run["requests"], run["probes"]
    times = sorted(t for r in requests for t in r["times"])
    seconds = int((max(times) - t0) + 1) if times else 0
    per_second = [0] * seconds
    for t in times:
        per_second[int(t - t0)] += 1
    for kill in kills:  # recovery: the longest pause between tokens of streams in flight after the kill
        gaps = []
        for r in requests:
            ts = [kill["at"], *[t for t in r["times"] if kill["at"] < t < kill["at"] + 10]]
            if r["start"] < kill["at"] < r["end"] and len(ts) > 1:
                gaps.append(max(b - a for a, b in itertools.pairwise(ts)))
        kill["longest_pause_s"] = max(gaps) if gaps else None
    pauses = [k["longest_pause_s"] for k in kills if k["longest_pause_s"] is not None]
    return {
        "requests": len(requests),
        "failed": sum(r["error"] is not None for r in requests),
        "errors": sorted({r["error"] for r in requests if r["error"]})[:10],
        "not_identical": sum(r["error"] is None and not r["identical"] for r in requests),
        # per prompt: how many answers differ, and how many different answers there were
        "not_identical_by_prompt": dict(
            Counter(r["prompt"] for r in requests if r["error"] is None and not r["identical"])
        ),
        "answers_by_prompt": {p: len({r["text"] for r in requests if r["prompt"] == p}) for p in PROMPTS},
        "tokens_streamed": len(times),
        "tok_s_per_second": per_second,
        "tok_s_mean": len(times) / seconds if seconds else 0.0,
        "kills": [{**k, "at": k["at"] - t0} for k in kills],
        "recovery_median_s": statistics.median(pauses) if pauses else None,
        "recovery_max_s": max(pauses) if pauses else None,
        "status_seconds": {via: sorted(p["seconds"] for p in probes if p["via"] == via) for via in ("dht", "gateway")},
        "status_exits": [p["exit"] for p in probes],
        "gateway_answer_seconds": sorted(p["answer_seconds"] for p in probes if "answer_seconds" in p),
        "python_start_seconds": sorted(p["python_seconds"] for p in probes if "python_seconds" in p),
        "coverage_gaps": sum(p["exit"] == 1 for p in probes),  # 3: none of the three answered
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(range(len(summary["tok_s_per_second"])), summary["tok_s_per_second"], lw=1, label="tokens/s (all clients)")
    for i, kill in enumerate(summary["kills"]):
        ax.axvline(kill["at"], color="red", lw=0.8, alpha=0.6, label="kill -9 of a peer" if i == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens/s")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description="swarmlm churn benchmark")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the clients' side from this JSON spec
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--kill-every", type=float, default=15)
    ap.add_argument("--restart-after", type=float, default=10)
    ap.add_argument("--num-layers", type=int, default=8, help="each peer's --num-layers (its span size)")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--status-every", type=float, default=20)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client_main(json.loads(Path(args.client).read_text()))))
        return

    console.rule("reference: the single-process engine's greedy texts")
    ref = reference(args.tokens)
    hosts = [f"peer{i}" for i in range(args.peers)] + [f"gateway{i}" for i in range(args.gateways)] + ["clients"]
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    live_file = results / "churn-live.json"
    with WanRouter(hosts, delay=0.0, subnet="10.83.0") as wan:
        chaos = Chaos(wan, args, live_file)
        gateways: list[PeerProcess] = []
        try:
            console.rule(f"{args.peers} peers, one after another (each picks its span from those announced)")
            t_start = time.time()
            chaos.start("peer0", []).wait_ready()
            for i in range(1, args.peers):
                chaos.start(f"peer{i}", chaos.live_maddrs(2)).wait_ready()
            spans = {h: p.span() for h, p in chaos.peers.items()}
            console.print(f"  up in {time.time() - t_start:.0f} s: " + ", ".join(f"{a}:{b}" for a, b in spans.values()))
            for i in range(args.gateways):
                host = f"gateway{i}"
                api = f"{wan.ip(host)}:8000"
                listen = ("--host-maddrs", f"/ip4/{wan.ip(host)}/tcp/0")
                boots = chaos.live_maddrs(2)
                extra = [a for m in boots[1:] for a in ("--initial-peers", m)]
                args_gw = ("--layers", "none", "--api", api, "--wire-dtype", "fp32", *listen, *extra)
                gw = PeerProcess(*args_gw, initial=boots[0], prefix=wan.prefix(host), threads=None)
                gateways.append(gw)
            for gw in gateways:
                gw.wait_ready()
            spec = {
                "duration": args.duration,
                "clients": args.clients,
                "tokens": args.tokens,
                "status_every": args.status_every,
                "gateways": [gw.api for gw in gateways],
                "live_file": str(live_file),
                "reference": ref,
            }
            chaos.publish_live()
            spec_path = results / "churn-spec.json"
            spec_path.write_text(json.dumps(spec))
            console.rule(f"{args.clients} clients for {args.duration:.0f} s; a kill every {args.kill_every:.0f} s")
            t0 = time.time()
            cmd = [*wan.prefix("clients"), sys.executable, __file__, "--client", str(spec_path)]
            load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            chaos.run(t0 + args.duration)
            out, err = load.communicate(timeout=args.duration + 600)
            if load.returncode != 0:
                raise RuntimeError(f"the clients failed:\n{err[-3000:]}")
            run = json.loads(out.strip().splitlines()[-1])
            rss = {h: rss_bytes(p) for h, p in chaos.peers.items() if p.proc.poll() is None}
        finally:
            stop_all([*chaos.peers.values(), *gateways])
    summary = summarize(run, chaos.kills, t0)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = ROOT / "bench" / "results" / f"churn-{stamp}.png"
    plot(summary, png)
    result = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{
            k: getattr(args, k)
            for k in ("peers", "gateways", "clients", "duration", "kill_every", "restart_after", "num_layers", "tokens")
        },
        **summary,
        "peer_rss_bytes": rss,
        "png": str(png.relative_to(ROOT)),
    }
    table = Table(title=f"Churn: {args.peers} peers, {args.gateways} gateways, {args.clients} streaming clients")
    table.add_column("measure")
    table.add_column("value")
    table.add_row(
        "requests (failed, not identical)", f"{summary['requests']} ({summary['failed']}, {summary['not_identical']})"
    )
    table.add_row("tokens/s, mean", f"{summary['tok_s_mean']:.1f}")
    table.add_row(
        "kills (bootstrap among them)", f"{len(summary['kills'])} ({sum(k['bootstrap'] for k in summary['kills'])})"
    )
    if summary["recovery_median_s"] is not None:
        table.add_row(
            "longest pause after a kill: median, max",
            f"{summary['recovery_median_s']:.2f} s, {summary['recovery_max_s']:.2f} s",
        )
    for via, seconds in summary["status_seconds"].items():
        if seconds:
            table.add_row(
                f"swarmlm status via {via}: median, slowest",
                f"{statistics.median(seconds):.2f} s, {seconds[-1]:.2f} s",
            )
    for name, key in (
        ("its gateway's answer", "gateway_answer_seconds"),
        ("a bare Python start", "python_start_seconds"),
    ):
        if seconds := summary[key]:
            table.add_row(
                f"  beside it, {name}: median, slowest", f"{statistics.median(seconds):.2f} s, {seconds[-1]:.2f} s"
            )
    table.add_row(
        "status probes showing a coverage gap", f"{summary['coverage_gaps']} of {len(summary['status_exits'])}"
    )
    if rss:
        table.add_row(
            "peer RSS (tree): min, max", f"{min(rss.values()) / 1e9:.2f} GB, {max(rss.values()) / 1e9:.2f} GB"
        )
    table.add_row("plot", result["png"])
    console.print(table)
    save_result("churn", result)


if __name__ == "__main__":
    main()
