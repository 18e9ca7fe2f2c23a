"""Packing the token stream into fixed blocks, and the blocks into checksummed shard files.

    OUT/train-00000.bin ...   raw little-endian token ids, [blocks, block_size], uint16 or uint32
    OUT/val-00000.bin ...

The stream is cut into blocks of `block_size`; the trailing remainder is dropped (and counted).
Split: block i goes to validation when blake2b(f"{seed}:{i}") / 2**64 < val_fraction, except that the
last block goes to whichever split would otherwise be empty (so a small corpus still gets a validation
block when val_fraction > 0, and a training block always).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np

from swarmlm.core.files import temp_sibling
from swarmlm.train.data.manifest import SPLITS, DataError, PrepareStats, Shard


class ShardWriter:
    """Writes one split's blocks into shards of at most `shard_blocks` blocks, each streamed to a temporary
    sibling (hashed as written) that is fsynced and renamed into place when full; the caller fsyncs the
    folder once all are in place."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_blocks: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_blocks = out_dir, split, dtype, shard_blocks
        self.shards: list[Shard] = []
        self._file: IO[bytes] | None = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._blocks = 0

    @property
    def blocks(self) -> int:
        return sum(s.blocks for s in self.shards) + self._blocks

    def add(self, block: np.ndarray) -> None:
        if self._file is None:
            self._tmp = temp_sibling(self.out_dir / self.split)
            self._file = self._tmp.open("wb")
        data = block.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._blocks += 1
        if self._blocks == self.shard_blocks:
            self._finish()

    def _finish(self) -> None:
        assert self._file is not None and self._tmp is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append(Shard(name, self._blocks, self._hash.hexdigest()))
        self._file, self._tmp, self._hash, self._blocks = None, None, hashlib.sha256(), 0

    def close(self) -> list[Shard]:
        if self._file is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


def _is_val(seed: int, index: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def write_shards(
    batches: Iterable[np.ndarray],
    out_dir: Path,
    *,
    vocab_size: int,
    block_size: int,
    shard_blocks: int,
    seed: int,
    val_fraction: float,
    stats: PrepareStats,
) -> dict[str, list[Shard]]:
    """Cut the token stream into blocks, split them and write each split's shards into `out_dir`."""
    writers = {s: ShardWriter(out_dir, s, token_dtype(vocab_size), shard_blocks) for s in SPLITS}
    try:
        carry = np.empty(0, dtype=np.int64)
        index = 0
        last: np.ndarray | None = None  # the newest block, held back: its split is settled at the end
        for ids in batches:
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise DataError(f"the tokenizer produced ids outside its vocabulary of {vocab_size}")
            stats.tokens += int(ids.size)
            carry = np.concatenate([carry, ids]) if carry.size else ids
            full = carry.size // block_size
            for row in carry[: full * block_size].reshape(full, block_size):
                if last is not None:
                    writers["val" if _is_val(seed, index - 1, val_fraction) else "train"].add(last)
                last, index = row, index + 1
            carry = carry[full * block_size :]
        stats.tail_tokens_dropped = int(carry.size)
        if last is None:
            raise DataError(
                f"the corpus makes {stats.tokens} tokens, fewer than one block of {block_size}: "
                "add text or lower --block-size"
            )
        if val_fraction > 0 and index == 1:
            raise DataError(
                f"the corpus makes a single block of {block_size} tokens: a validation split needs two "
                "(lower --block-size, or --val-fraction 0)"
            )
        if writers["val"].blocks == 0 and val_fraction > 0:
            writers["val"].add(last)
        elif writers["train"].blocks == 0:
            writers["train"].add(last)
        else:
            writers["val" if _is_val(seed, index - 1, val_fraction) else "train"].add(last)
        splits = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    stats.train_blocks = sum(s.blocks for s in splits["train"])
    stats.val_blocks = sum(s.blocks for s in splits["val"])
    return splits
