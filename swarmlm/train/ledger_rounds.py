"""Training rounds in the ledger: each member that completed a round signs it into its own copy (one
writer would not do: its side of the all-reduce may be the one that broke), then pulls from another
member, so each copy soon holds every round, attested by the members that took part."""

from __future__ import annotations

import math
import time

from swarmlm.ledger.sync import LedgerSync
from swarmlm.train.round_report import RoundReport
from swarmlm.train.train_config import TrainConfig


class RoundLedger:
    """This training peer's ledger copy (`RUN_DIR/ledger.jsonl`), served to and refreshed from the run's
    other members over P2P."""

    def __init__(self, sync: LedgerSync, cfg: TrainConfig, peer_id: str) -> None:
        self.sync, self.cfg, self.peer_id = sync, cfg, peer_id

    def record(self, report: RoundReport, group: list[str], update_digest: str | None) -> None:
        """Sign a round this peer completed with `group` (its members' peer ids), then pull the others'."""
        if not group:
            return
        cfg = self.cfg
        epsilon = report.epsilon if report.epsilon is not None and math.isfinite(report.epsilon) else None
        body = {"run": cfg.run_id, "round": report.round, "mode": cfg.mode, "participants": group}
        body |= {"aggregation": cfg.aggregation, "weights": report.digest, "epsilon": epsilon}
        self.sync.ledger.append("training_round", {**body, "update": update_digest})
        self.pull(group, report.round)

    def pull(self, group: list[str], round_: int, wait: float = 0.0) -> None:
        """Pull the entries we lack from another member of `group`. With `wait`, keep pulling for up to that
        many seconds until our copy holds `round_`: a peer that took its last round's result by download
        signed nothing itself, and the members that did only linger a few seconds."""
        if not group:
            return
        others = [p for p in group if p != self.peer_id]
        deadline = time.monotonic() + wait
        while True:
            self.sync.pull_from_any(others)
            if self.holds(round_) or time.monotonic() >= deadline:
                return
            time.sleep(1.0)

    def holds(self, round_: int) -> bool:
        return any(
            e.kind == "training_round" and e.body.get("run") == self.cfg.run_id and e.body.get("round") == round_
            for e in self.sync.ledger.entries
        )

    def close(self) -> None:
        self.sync.loop.stop(self.sync.p2p)
        self.sync.ledger.close()
