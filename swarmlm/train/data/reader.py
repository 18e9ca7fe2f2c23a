"""The training side of a prepared data directory: a split's blocks, checked against the manifest and
memory-mapped, split into disjoint parts per peer, in seeded resumable batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swarmlm.core.files import sha256_file
from swarmlm.train.data.manifest import DataError, Manifest


class TokenShards:
    """One split of a prepared data directory: blocks of token ids, memory-mapped from its shards.

    A view (`part`) holds a subset of the split's blocks; indices are positions in the view."""

    def __init__(self, data_dir: Path, manifest: Manifest, split: str, indices: np.ndarray | None = None) -> None:
        self.data_dir = data_dir
        self.manifest = manifest
        self.split = split
        self._shards = manifest.splits.get(split, [])
        self._offsets = np.cumsum([0] + [s.blocks for s in self._shards])
        total = int(self._offsets[-1])
        self._indices = np.arange(total, dtype=np.int64) if indices is None else indices
        self._maps: list[np.memmap] | None = None

    @classmethod
    def open(cls, data_dir: Path | str, split: str = "train", verify: bool = True) -> TokenShards:
        """Check the split's shards (present, of the right size, and with `verify` their sha256) and map
        them. Raises DataError naming the shard that is missing, truncated or corrupt."""
        data_dir = Path(data_dir)
        manifest = Manifest.load(data_dir)
        if split not in manifest.splits:
            raise DataError(f"{data_dir}: no split {split!r} (has {sorted(manifest.splits)})")
        itemsize = np.dtype(manifest.dtype).itemsize
        for shard in manifest.splits[split]:
            path = data_dir / shard.file
            if not path.is_file():
                raise DataError(f"shard {path}: missing")
            size, expected = path.stat().st_size, shard.blocks * manifest.block_size * itemsize
            if size != expected:
                raise DataError(f"shard {path}: wrong size ({size} bytes, expected {expected})")
            if verify and (digest := sha256_file(path)) != shard.sha256:
                raise DataError(f"shard {path}: checksum mismatch (sha256 {digest}, manifest says {shard.sha256})")
        return cls(data_dir, manifest, split)

    @property
    def block_size(self) -> int:
        return self.manifest.block_size

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def __len__(self) -> int:
        return int(self._indices.size)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for a DataLoader worker: send the paths, not the mapped data (maps reopen lazily).
        return {**self.__dict__, "_maps": None}

    def _mapped(self) -> list[np.memmap]:
        if self._maps is None:
            dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
            self._maps = [
                np.memmap(self.data_dir / s.file, dtype=dtype, mode="r", shape=(s.blocks, self.block_size))
                for s in self._shards
            ]
        return self._maps

    def blocks(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Blocks at these positions as a LongTensor [n, block_size] (only those blocks are read)."""
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        g = self._indices[pos % n] if n else pos
        shard = np.searchsorted(self._offsets, g, side="right") - 1
        out = np.empty((pos.size, self.block_size), dtype=np.int64)
        maps = self._mapped()
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = maps[s][g[mask] - self._offsets[s]]
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks([i])[0]

    def part(self, rank: int, world: int) -> TokenShards:
        """The blocks at positions i with i % world == rank: disjoint parts, one per peer, covering all."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, not rank {rank} of {world}")
        return TokenShards(self.data_dir, self.manifest, self.split, self._indices[rank::world])

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Endless batches over seeded per-epoch permutations: yields (position, LongTensor[batch_size,
        block_size]) where `position` counts the batches drawn so far, this one included. Store it in a
        checkpoint; `batches(batch_size, seed, start=position)` continues with the next batch.

        The stream is epoch 0's permutation, then epoch 1's, ...; batch p is its items
        [p * batch_size, (p + 1) * batch_size), so a batch may span two epochs and none is dropped."""
        n = len(self)
        if n == 0:
            raise DataError(f"{self.data_dir}: the {self.split} split has no blocks")
        if batch_size < 1 or start < 0:
            raise ValueError(f"need batch_size >= 1 and start >= 0, not {batch_size} and {start}")
        epoch, perm = -1, np.empty(0, dtype=np.int64)
        position = start
        while True:
            items = np.arange(position * batch_size, (position + 1) * batch_size, dtype=np.int64)
            picked = np.empty_like(items)
            for e in np.unique(items // n):
                if e != epoch:
                    epoch, perm = int(e), np.random.default_rng([seed, int(e)]).permutation(n)
                mask = items // n == e
                picked[mask] = perm[items[mask] % n]
            position += 1
            yield position, self.blocks(picked)
