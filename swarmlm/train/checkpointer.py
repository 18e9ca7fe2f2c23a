"""Training checkpoints: written atomically every round, verified by checksum on resume.

A checkpoint is two files in the run's `checkpoints/` folder:

- `round-000012.safetensors`: every tensor of the training state (global and local weights, the inner
  and outer optimizers' buffers), named by their place in `TrainState`;
- `round-000012.json`: everything else (round, data position, RNG states, optimizer hyper-parameters,
  metrics) plus the sha256 of the tensor file. It is written last, so it marks the checkpoint complete.

Each file is written to a temporary name, fsynced, and renamed: a crash leaves either the old checkpoint
or the new one, never half of one. On resume the newest checkpoint whose files are present and whose
checksum matches is used; a corrupt one is reported and skipped for the one before it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from swarmlm.core.files import atomic_write, sha256_file

logger = logging.getLogger(__name__)

_NAME = re.compile(r"round-(\d{6})\.json")


class CheckpointCorrupt(ValueError):
    """A checkpoint whose files are missing, truncated or do not match their checksum."""


def save_checkpoint(folder: Path, round_: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 3) -> Path:
    """Write round `round_`'s checkpoint and drop all but the newest `keep` (and `best.json`'s round)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"round-{round_:06d}.safetensors"
    atomic_write(weights, lambda p: save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(p)))
    record = {**meta, "round": round_, "tensors": weights.name, "sha256": sha256_file(weights)}
    marker = folder / f"round-{round_:06d}.json"
    atomic_write(marker, lambda p: p.write_text(json.dumps(record, indent=1)))
    _prune(folder, keep)
    return marker


def mark_best(folder: Path, round_: int, val_loss: float) -> None:
    atomic_write(folder / "best.json", lambda p: p.write_text(json.dumps({"round": round_, "val_loss": val_loss})))


def best_round(folder: Path) -> tuple[int, float] | None:
    """(round, validation loss) of the best checkpoint kept in `folder`, or None."""
    try:
        best = json.loads((folder / "best.json").read_text())
        return int(best["round"]), float(best["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_rounds(folder: Path) -> list[int]:
    """The rounds with a complete checkpoint record in `folder`, oldest first."""
    return sorted(int(m.group(1)) for p in folder.glob("round-*.json") if (m := _NAME.fullmatch(p.name)))


def _prune(folder: Path, keep: int) -> None:
    rounds = saved_rounds(folder)
    best = best_round(folder)
    protected = set(rounds[-keep:]) | ({best[0]} if best else set())
    for r in rounds:
        if r not in protected:
            (folder / f"round-{r:06d}.json").unlink(missing_ok=True)
            (folder / f"round-{r:06d}.safetensors").unlink(missing_ok=True)


def load_checkpoint(marker: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read one checkpoint, verifying its checksum. Raises CheckpointCorrupt naming the bad file."""
    try:
        meta = json.loads(marker.read_text())
        weights = marker.parent / meta["tensors"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointCorrupt(f"{marker}: unreadable checkpoint record ({e})") from e
    if not weights.exists():
        raise CheckpointCorrupt(f"{weights}: missing")
    if sha256_file(weights) != meta.get("sha256"):
        raise CheckpointCorrupt(f"{weights}: checksum mismatch (the file is corrupt)")
    try:
        return load_file(str(weights)), meta
    except SafetensorError as e:
        raise CheckpointCorrupt(f"{weights}: unreadable ({e})") from e


def latest_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest intact checkpoint in `folder` (corrupt ones are logged and skipped), or None."""
    for r in reversed(saved_rounds(folder)):
        try:
            return load_checkpoint(folder / f"round-{r:06d}.json")
        except CheckpointCorrupt as e:
            logger.warning("skipping corrupt checkpoint: %s", e)
    return None
