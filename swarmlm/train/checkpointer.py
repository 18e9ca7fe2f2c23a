"""Training checkpoints: written atomically every round, verified by checksum on resume.

`Checkpointer` persists anything `Stateful` (as torchtitan's checkpointer does its trainer): the tensors
of its `state_dict()` go to one file, the rest to another, and `load_state_dict()` gets both back as one
dict. A checkpoint is two files in the run's `checkpoints/` folder:

- `round-000012.safetensors`: every tensor of the training state (for a `Trainer`: global and local
  weights, the inner and outer optimizers' buffers);
- `round-000012.json`: everything else (round, data position, RNG states, optimizer hyper-parameters,
  metrics) plus the sha256 of the tensor file. It is written last, so it marks the checkpoint complete.

Each file is written to a temporary name, fsynced, and renamed: a crash leaves either the old checkpoint
or the new one, never half of one. On resume the newest checkpoint whose files are present and whose
checksum matches is used; a corrupt one is reported and skipped for the one before it.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any, Protocol

import torch
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


def flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """An optimizer's buffers as named tensors (`prefix.index.key`), for a checkpoint's tensor file: the
    buffers themselves, not copies (the caller keeps the optimizer still while it writes them)."""
    return {
        f"{prefix}.{index}.{key}": value.detach() if torch.is_tensor(value) else torch.tensor(value)
        for index, state in opt.state_dict()["state"].items()
        for key, value in state.items()
    }


def rng_state() -> str:
    """PyTorch's global RNG state as text, for a checkpoint's JSON (`restore_rng_state` reads it back)."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def restore_rng_state(text: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))


def restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, Any]) -> None:
    """The reverse of `flatten_optimizer`: the buffers named `prefix.*` in `tensors` back into `opt`."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Stateful(Protocol):
    """What a checkpoint holds: tensors and JSON values, under names the object chooses."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """The checkpoints of one run folder: saves a `Stateful` after each round, restores the newest intact
    one, and keeps track of the best validation loss (`best.json`), which pruning spares."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.best_val = float("inf")
        self.last: tuple[int, float, Path] | None = None  # (round, val loss, record) of the newest one

    def save(self, state: Stateful, round_: int, val_loss: float, keep: int) -> Path:
        items = state.state_dict()
        tensors = {k: v for k, v in items.items() if isinstance(v, Tensor)}
        meta = {k: v for k, v in items.items() if not isinstance(v, Tensor)} | {"val_loss": val_loss}
        marker = save_checkpoint(self.folder, round_, tensors, meta, keep=keep)
        self.last = (round_, val_loss, marker)
        if val_loss < self.best_val:
            self.best_val = val_loss
            mark_best(self.folder, round_, val_loss)
        return marker

    def holds(self, round_: int) -> bool:
        return round_ in saved_rounds(self.folder)

    def best(self) -> tuple[int, float] | None:
        return best_round(self.folder)

    def restore(self, state: Stateful) -> int | None:
        """Load the newest intact checkpoint (a corrupt one is skipped) into `state`; its round, or None."""
        found = latest_checkpoint(self.folder)
        if found is None:
            return None
        tensors, meta = found
        try:
            state.load_state_dict({**meta, **tensors})
        except ValueError as e:
            raise ValueError(f"{self.folder}: {e}") from e
        if (best := best_round(self.folder)) is not None:
            self.best_val = best[1]
        round_ = int(meta["round"])
        self.last = (round_, float(meta.get("val_loss", float("nan"))), self.folder / f"round-{round_:06d}.json")
        logger.info("resumed from %s at round %d", self.folder, round_)
        return round_
