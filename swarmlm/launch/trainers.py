"""Training peers as real `swarmlm train` processes on this machine (for the demo, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from swarmlm.launch.peers import PeerProcess, start_peers
from swarmlm.train.checkpointer import saved_rounds


class TrainerProcess(PeerProcess):
    """One `swarmlm train` in its own process group; ready once it printed its multiaddr."""

    command = "train"

    def __init__(self, *args: str, run_dir: Path, **kwargs: Any) -> None:
        self.args, self.run_dir, self.kwargs = args, run_dir, kwargs
        super().__init__(*args, "--run-dir", str(run_dir), **kwargs)

    def restart(self, initial: str | None, *more_initial: str) -> TrainerProcess:
        """The same peer started again (after a crash): same settings, same run folder; `more_initial`:
        further --initial-peers (any one that answers will do)."""
        args = list(self.args)
        while "--initial-peers" in args:  # an earlier restart's: those peers may be gone
            del args[args.index("--initial-peers") : args.index("--initial-peers") + 2]
        more = [a for m in more_initial for a in ("--initial-peers", m)]
        return TrainerProcess(*args, *more, run_dir=self.run_dir, **{**self.kwargs, "initial": initial})

    def _ready(self, text: str) -> re.Match[str] | None:
        return re.search(r"swarmlm train: peer (\S+) at (\S+)", text)

    _address = _ready  # a trainer prints its address once it has joined the run's swarm

    def rounds(self) -> list[dict[str, Any]]:
        """This peer's round reports so far (its `rounds.jsonl`), across restarts."""
        path = self.run_dir / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def checkpointed_round(self) -> int:
        """The newest round this peer has a checkpoint of (0: none yet)."""
        return max(saved_rounds(self.run_dir / "checkpoints"), default=0)

    def finish(self, timeout: float = 600) -> int:
        """Wait for the run to end; the exit code."""
        return self.proc.wait(timeout=timeout)


def start_run(
    data: Path,
    root: Path,
    n: int,
    args: tuple[str, ...],
    per_peer: dict[int, tuple[str, ...]] | None = None,
    threads: int = 1,
    pin: bool = False,
    prefix: tuple[str, ...] = (),
) -> list[TrainerProcess]:
    """`n` peers of one run, each training on its own slice of `data` (`--data-part rank/n`) in
    `root/peer<rank>`, started by `start_peers`. `pin`: peer `rank` runs on core `rank mod cores` only, so
    peers sharing the cores share them evenly, as peers on machines of their own would compute at one
    pace (left to the OS scheduler, 4 peers on 2 cores ran ~10 % apart, and every round waits for the
    slowest). The peers of a fresh run wait for one another at round 1 (`--min-peers n`, unless `args`
    say otherwise). `prefix`: a command every peer runs under (after `taskset`)."""
    cores = sorted(os.sched_getaffinity(0))

    def make(rank: int, boot: str | None) -> TrainerProcess:
        own = (per_peer or {}).get(rank, ())
        peer_args = ("--data", str(data), "--data-part", f"{rank}/{n}", "--min-peers", str(n), *args, *own)
        pinned = ("taskset", "--cpu-list", str(cores[rank % len(cores)])) if pin else ()
        return TrainerProcess(
            *peer_args, run_dir=root / f"peer{rank}", initial=boot, threads=threads, prefix=(*pinned, *prefix)
        )

    return start_peers(n, make)
