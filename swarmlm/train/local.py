"""Training peers as real `swarmlm train` processes on this machine (for the demo, tests, benchmarks)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from swarmlm.swarm.local import PeerProcess


class TrainerProcess(PeerProcess):
    """One `swarmlm train` in its own process group; ready once it printed its multiaddr."""

    command = "train"

    def __init__(self, *args: str, run_dir: Path, **kwargs: Any) -> None:
        self.args, self.run_dir, self.kwargs = args, run_dir, kwargs
        super().__init__(*args, "--run-dir", str(run_dir), **kwargs)

    def restart(self, initial: str | None) -> TrainerProcess:
        """The same peer started again (after a crash): same settings, same run folder."""
        return TrainerProcess(*self.args, run_dir=self.run_dir, **{**self.kwargs, "initial": initial})

    def _ready(self, text: str) -> re.Match[str] | None:
        return re.search(r"swarmlm train: peer (\S+) at (\S+)", text)

    def rounds(self) -> list[dict[str, Any]]:
        """This peer's round reports so far (its `rounds.jsonl`), across restarts."""
        path = self.run_dir / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def finish(self, timeout: float = 600) -> int:
        """Wait for the run to end; the exit code."""
        return self.proc.wait(timeout=timeout)
