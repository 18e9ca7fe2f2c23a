"""What one training round gives: a line of the run's `rounds.jsonl`, the progress display's input, and
a term of the summary printed when the run ends."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class RoundReport:
    round: int
    train_loss: float
    val_loss: float
    group_size: int
    digest: str
    tokens: int
    compute_s: float
    wall_s: float
    bytes_sent: int
    epsilon: float | None
    averaged: bool

    def to_json(self) -> str:
        return json.dumps(self.__dict__)
