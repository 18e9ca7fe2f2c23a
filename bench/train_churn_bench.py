"""Training churn benchmark: DiLoCo trainers, each on a host of its own, while a chaos loop kills them.

--trainers `swarmlm train` processes (the tiny model from scratch on four plays, one thread each), each in
its own network namespace behind `launch/wan.py`'s router (no delay: a host each, as on a LAN), train
--rounds DiLoCo rounds in groups of whoever is there (--min-group-size 2). From --kill-after seconds on,
every --kill-every seconds a random live trainer (the bootstrap too) is killed with SIGKILL and restarted
--restart-after seconds later with the same run folder, joining through two live trainers. Once the chaos
stops (--chaos-for seconds), every trainer runs to the last round.

Reported: rounds that some group averaged (target: all); per round, how many different weight digests
the trainers that averaged it hold afterwards (target: 1 for every round); for each kill, the round the
swarm was at, the round the restarted trainer resumed from (its checkpoint) and the first round it
averaged again, the rounds of its own work it lost (target: 0, beyond the round in flight) and the swarm's
longest stall (seconds without a new averaged round) around it; the final digests (target: one) and
validation loss; each trainer's RSS.

    make bench-train-churn                 # root, /dev/net/tun and iproute2
    .venv/bin/python bench/train_churn_bench.py [--trainers 8] [--rounds 40] [--kill-every 15]
        [--restart-after 10] [--kill-after 20] [--chaos-for 240]

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/train-churn-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import stop_all
from swarmlm.launch.trainers import TrainerProcess
from swarmlm.launch.wan import WanRouter
from swarmlm.train.data import default_corpus_files, prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling modules
from bench_output import save_result
from churn_bench import rss_bytes

console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
RESUMED = re.compile(r"resumed from \S+ at round (\d+)")
DOWNLOADED = re.compile(r"caught up: downloaded round (\d+)")
FAST = ("--inner-steps", "10", "--batch-size", "8", "--inner-lr", "3e-3")


class TrainChaos:
    """The trainers, their restarts, the kill log, and the swarm's averaged rounds over time."""

    def __init__(self, wan: WanRouter, args: argparse.Namespace, data: Path, root: Path) -> None:
        self.wan, self.args, self.data, self.root = wan, args, data, root
        self.trainers: dict[str, TrainerProcess] = {}
        self.kills: list[dict[str, Any]] = []
        self.progress: list[tuple[float, int]] = []  # (time, highest round some trainer averaged)
        self.rss: dict[str, int] = {}  # the most each trainer's process tree held, sampled every 5 s
        self.rng = random.Random(0)

    def start(self, rank: int, initial: str | None) -> TrainerProcess:
        host, n = f"trainer{rank}", self.args.trainers
        args = ("--data", str(self.data), "--data-part", f"{rank}/{n}", "--rounds", str(self.args.rounds), *FAST)
        args += ("--matchmaking-time", str(self.args.matchmaking_time))
        args += ("--target-group-size", str(n), "--min-group-size", "2", "--min-peers", str(n))
        args += ("--host-maddrs", f"/ip4/{self.wan.ip(host)}/tcp/0")
        trainer = TrainerProcess(*args, run_dir=self.root / host, initial=initial, prefix=self.wan.prefix(host))
        self.trainers[host] = trainer
        return trainer

    def live(self) -> list[TrainerProcess]:
        return [t for t in self.trainers.values() if t.proc.poll() is None and t.maddr]

    def global_round(self) -> int:
        return max((r["round"] for t in self.trainers.values() for r in t.rounds() if r["averaged"]), default=0)

    def run(self, chaos_until: float) -> None:
        """Kill a random live trainer every kill_every s until `chaos_until`, restart each restart_after s
        later; then wait for every trainer to finish."""
        restarts: list[tuple[float, dict[str, Any]]] = []  # (when, the kill it undoes)
        next_kill = time.time() + self.args.kill_after
        while True:
            now = time.time()
            self.progress.append((now, self.global_round()))
            if len(self.progress) % 10 == 0:
                for host, t in self.trainers.items():
                    if t.proc.poll() is None:
                        self.rss[host] = max(self.rss.get(host, 0), rss_bytes(t))
            for due, kill in [r for r in restarts if r[0] <= now]:
                restarts.remove((due, kill))
                live = [t.maddr for t in self.live()]
                boots = self.rng.sample(live, k=min(2, len(live)))  # two: one may die while we join
                self.trainers[kill["host"]] = self.trainers[kill["host"]].restart(*boots)
                kill["log"] = self.trainers[kill["host"]].log
            if next_kill <= now < chaos_until:
                candidates = [h for h, t in self.trainers.items() if t.proc.poll() is None and t.maddr]
                if len(candidates) > 2:  # a group needs two
                    host = self.rng.choice(candidates)
                    if len(self.kills) == 1 and "trainer0" in candidates:  # the bootstrap, once at least
                        host = "trainer0"
                    rounds = [r["round"] for r in self.trainers[host].rounds() if r["averaged"]]
                    self.trainers[host].crash()
                    kill = {"at": now, "host": host, "bootstrap": host == "trainer0"}
                    kill |= {"global_round": self.progress[-1][1], "victim_round": max(rounds, default=0)}
                    self.kills.append(kill)
                    restarts.append((now + self.args.restart_after, kill))
                next_kill += self.args.kill_every
            if not restarts and now >= chaos_until and all(t.proc.poll() is not None for t in self.trainers.values()):
                return
            time.sleep(0.5)


def summarize(chaos: TrainChaos, rounds: int, t0: float) -> dict[str, Any]:
    reports = {h: t.rounds() for h, t in chaos.trainers.items()}
    digests: dict[int, set[str]] = defaultdict(set)
    for peer in reports.values():
        for r in peer:
            if r["averaged"]:
                digests[r["round"]].add(r["digest"])
    advances = [t for (_, g0), (t, g) in itertools.pairwise(chaos.progress) if g > g0]
    for kill in chaos.kills:
        log = kill.pop("log").read_text()
        resumed, downloaded = RESUMED.search(log), DOWNLOADED.search(log)
        kill["resumed_from"] = int(resumed.group(1)) if resumed else 0  # its newest intact checkpoint
        kill["downloaded"] = int(downloaded.group(1)) if downloaded else None  # caught up from a peer
        kill["lost_rounds"] = kill["victim_round"] - kill["resumed_from"]  # averaged, then not in its checkpoints
        after = [r["round"] for r in reports[kill["host"]] if r["averaged"] and r["round"] > kill["victim_round"]]
        kill["first_averaged_after"] = min(after, default=None)
        before = [t for t in advances if t <= kill["at"]]
        after_kill = [t for t in advances if t > kill["at"]]
        # the gap between two new averaged rounds that holds the kill (a round takes `round_s` without one)
        kill["stall_s"] = after_kill[0] - before[-1] if before and after_kill else None
        kill["at"] -= t0
    finals = {h: p[-1] for h, p in reports.items() if p}
    return {
        "rounds": rounds,
        "rounds_averaged": sorted(digests),
        "rounds_missing": [r for r in range(1, rounds + 1) if r not in digests],
        "rounds_with_several_digests": {r: len(d) for r, d in digests.items() if len(d) > 1},
        "final_round": {h: f["round"] for h, f in finals.items()},
        "final_digests": len({f["digest"] for f in finals.values()}),
        "final_val_loss": max((f["val_loss"] for f in finals.values()), default=None),
        "round_s": statistics.median(b - a for a, b in itertools.pairwise(advances)) if len(advances) > 1 else None,
        "kills": chaos.kills,
        "exit_codes": {h: t.proc.returncode for h, t in chaos.trainers.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="swarmlm training churn benchmark")
    ap.add_argument("--trainers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--kill-after", type=float, default=20, help="seconds of training before the first kill")
    ap.add_argument("--kill-every", type=float, default=15)
    ap.add_argument("--restart-after", type=float, default=10)
    ap.add_argument("--matchmaking-time", type=float, default=5.0, help="each trainer's --matchmaking-time")
    ap.add_argument("--chaos-for", type=float, default=240, help="seconds after which no trainer is killed")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="swarmlm-train-churn-") as tmp:
        root = Path(tmp)
        data = root / "data"
        prepare(default_corpus_files()[:4], data, train_tokenizer=512, block_size=64)
        hosts = [f"trainer{i}" for i in range(args.trainers)]
        with WanRouter(hosts, delay=0.0, subnet="10.84.0") as wan:
            chaos = TrainChaos(wan, args, data, root)
            try:
                console.rule(f"{args.trainers} trainers, {args.rounds} rounds; a kill every {args.kill_every:.0f} s")
                boot = chaos.start(0, None).wait_address().maddr
                for rank in range(1, args.trainers):
                    chaos.start(rank, boot)
                for t in list(chaos.trainers.values()):
                    t.wait_ready()
                t0 = time.time()
                chaos.run(t0 + args.chaos_for)
            finally:
                stop_all(list(chaos.trainers.values()))
            wall = time.time() - t0
            summary = summarize(chaos, args.rounds, t0)
    result = {"settings": vars(args), "wall_s": wall, **summary, "rss_bytes": chaos.rss}
    table = Table(title=f"training churn: {args.trainers} DiLoCo trainers, kill -9 every {args.kill_every:.0f} s")
    table.add_column("figure")
    table.add_column("value")
    table.add_row(
        "rounds averaged (missing)",
        f"{len(summary['rounds_averaged'])} of {args.rounds} ({summary['rounds_missing'] or 'none'})",
    )
    table.add_row(
        "rounds whose averagers hold different weights", str(summary["rounds_with_several_digests"] or "none")
    )
    table.add_row(
        "final digests (trainers), val loss",
        f"{summary['final_digests']} ({len(summary['final_round'])}), {summary['final_val_loss']:.4f}",
    )
    table.add_row("exit codes", " ".join(str(c) for c in summary["exit_codes"].values()))
    kills = summary["kills"]
    table.add_row("kills (bootstrap among them)", f"{len(kills)} ({sum(k['bootstrap'] for k in kills)})")
    lost = [k["lost_rounds"] for k in kills if k["lost_rounds"] is not None]
    stalls = [k["stall_s"] for k in kills if k["stall_s"] is not None]
    if lost:
        table.add_row("averaged rounds lost per kill, beyond the one in flight: max", str(max(lost)))
    if stalls:
        table.add_row(
            "longest stall around a kill: median, max", f"{sorted(stalls)[len(stalls) // 2]:.1f} s, {max(stalls):.1f} s"
        )
    if summary["round_s"] is not None:
        table.add_row("seconds between new rounds: median", f"{summary['round_s']:.1f} s")
    if chaos.rss:
        table.add_row("trainer RSS (tree), max", f"{max(chaos.rss.values()) / 1e9:.2f} GB")
    table.add_row("wall time", f"{wall:.0f} s")
    console.print(table)
    save_result("train-churn", result)


if __name__ == "__main__":
    main()
