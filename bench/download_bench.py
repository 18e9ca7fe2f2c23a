"""A newcomer's memory while it downloads a training state: swarmlm's streamed download
(train/state_download.py) against hivemind's `load_state_from_peers`, side by side in one run.

Training peers of the --size preset (DiLoCo with outer momentum: weights and momentum travel; a 512-token
BPE of one embedded play) on loopback, each its own process: one at round 1 offers its state; another, its
averager's buffers and momentum already written as a peer's are mid-run, downloads it (a fresh one for
each download: --repeats each way, the ways alternating). hivemind's way is what swarmlm did before: the
averager's process gathers the state and hands it over in shared memory, the trainer checks the weights'
digest and copies it in.

Reported per way: the downloader's summed PSS (trainer, forked DHT and averager, p2pd: sampled as fast as
/proc allows) above what it held just before, at the peak and once done, against the state's size; and the
seconds a download took.

    make bench-download
    .venv/bin/python bench/download_bench.py [--size base] [--repeats 2]

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/download-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling modules
from bench_output import save_result
from proc_stats import tree_pss

WAYS = ("hivemind", "swarmlm")
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def peer(role: str, work: Path, size: str, way: str) -> None:
    """One of the two peers (a subprocess of the bench): `ahead` offers round 1 until told to stop;
    `behind` downloads it the `way` given once it reads a line, and answers `seconds state_bytes`."""
    import torch

    from swarmlm.core.heap import hold_little_freed_memory
    from swarmlm.model.loading import tensors_digest
    from swarmlm.train.outer import copy_into
    from swarmlm.train.train_config import TrainConfig
    from swarmlm.train.trainer import Trainer

    hold_little_freed_memory()  # as `swarmlm train` does
    common = dict(data=work / "data", size=size, batch_size=2, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    if role == "ahead":
        trainer = Trainer(TrainConfig(run_dir=work / "ahead", **common))
        link = trainer.connect()
        trainer.outer.step([torch.full_like(g, 1e-3) for g in trainer.global_params])  # a momentum to carry
        trainer.round = 1
        trainer.publish()
        (work / "maddrs").write_text(json.dumps(link.visible_maddrs()))
        sys.stdin.read()  # until the bench closes our stdin
        link.close()
        return
    maddrs = json.loads((work / "maddrs").read_text())
    trainer = Trainer(TrainConfig(run_dir=work / "behind", initial_peers=maddrs, seed=1, **common))
    link = trainer.connect()
    with link.update_buffers() as buffers:  # resident, as a peer's are after its first round
        for b in buffers:
            b.fill_(1.0)
    for m in trainer.outer.momentum():
        m.fill_(1.0)
    weights, momentum = trainer.global_params, trainer.outer.momentum()
    state_bytes = sum(t.numel() * t.element_size() for t in weights + momentum)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    if way == "hivemind":
        assert link.averager is not None
        meta, tensors = link.averager.load_state_from_peers(timeout=30)
        downloaded = tensors[len(momentum) :]
        assert tensors_digest(zip(trainer.model.names, downloaded, strict=True)) == meta["digest"]
        copy_into(momentum + weights, list(tensors))
        del meta, tensors, downloaded
        link.offer(1)  # its next command: hivemind's loop lets go of the result
    else:
        assert link.catch_up(at_least=1)
    print(f"{time.perf_counter() - start:.3f} {state_bytes}", flush=True)
    sys.stdin.read()
    link.close()


def measure(cmd: list[str], way: str) -> dict[str, Any]:
    """One download by a fresh peer: its summed PSS before, at the peak and after, its seconds."""
    behind = subprocess.Popen([*cmd, "behind", "--way", way], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert behind.stdin is not None and behind.stdout is not None
    try:
        assert behind.stdout.readline().strip() == "ready", "the downloading peer did not start"
        time.sleep(2.0)  # its start's memory settled
        return sample_download(behind)
    finally:
        behind.stdin.close()
        behind.wait(60)


def sample_download(behind: subprocess.Popen[str]) -> dict[str, Any]:
    assert behind.stdin is not None and behind.stdout is not None
    first = tree_pss(behind.pid)
    behind.stdin.write("go\n")
    behind.stdin.flush()
    at_peak, reply = first, []
    reader = threading.Thread(target=lambda: reply.append(behind.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    while reader.is_alive():
        now = tree_pss(behind.pid)
        at_peak = max(at_peak, now, key=lambda by: sum(by.values()))
    time.sleep(1.0)
    after = sum(tree_pss(behind.pid).values())
    seconds, state = reply[0].split()
    growth = {name: at_peak[name] - first.get(name, 0) for name in at_peak}  # by process (name:pid)
    before, peak = sum(first.values()), sum(at_peak.values())
    return {"before": before, "peak": peak, "after": after, "seconds": float(seconds), "state": int(state)} | {
        "peak_growth_by_process": growth
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--role", choices=("ahead", "behind"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        peer(args.role, args.work, args.size, args.way)
        return
    from swarmlm.train.data import default_corpus_files, prepare

    with tempfile.TemporaryDirectory(prefix="swarmlm-download-") as tmp:
        work = Path(tmp)
        prepare(default_corpus_files()[:1], work / "data", train_tokenizer=512, block_size=64)
        cmd = [sys.executable, __file__, "--size", args.size, "--work", str(work), "--role"]
        ahead = subprocess.Popen([*cmd, "ahead"], stdin=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not (work / "maddrs").exists():
                assert ahead.poll() is None and time.monotonic() < deadline, "the offering peer did not start"
                time.sleep(0.5)
            runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
            for _ in range(args.repeats):
                for way in WAYS:
                    runs[way].append(measure(cmd, way))
        finally:
            assert ahead.stdin is not None
            ahead.stdin.close()
            ahead.wait(60)
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    state = runs["swarmlm"][0]["state"]
    table = Table(title=f"a {args.size} state download ({state / 1e6:.0f} MB of weights and momentum)")
    table.add_column("")
    for way in WAYS:
        table.add_column(way)
    rows = {
        "PSS above before, at the peak (MB)": lambda r: (r["peak"] - r["before"]) / 1e6,
        "the same, / the state's size": lambda r: (r["peak"] - r["before"]) / state,
        "PSS above before, once done (MB)": lambda r: (r["after"] - r["before"]) / 1e6,
        "seconds per download": lambda r: r["seconds"],
    }
    for label, figure in rows.items():
        table.add_row(label, *(" ".join(f"{figure(r):.2f}" for r in runs[way]) for way in WAYS))
    console.print(table)
    medians = {way: statistics.median((r["peak"] - r["before"]) / state for r in runs[way]) for way in WAYS}
    settings = {"size": args.size, "repeats": args.repeats}
    save_result("download", {"settings": settings, "state_bytes": state, "runs": runs, "peak_over_state": medians})


if __name__ == "__main__":
    main()
