"""KV cache under a memory budget in bytes, with a prefix cache of hashed token blocks.

Each sequence owns one contiguous key tensor and one value tensor per span ([layers, kv_heads,
capacity, head_dim]) so attention reads a plain view, with no gather. Capacity grows in whole blocks.
Everything the manager hands out is counted against the budget; the prefix cache's blocks are the first
thing evicted when a sequence needs room.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def empty(self, tokens: int) -> tuple[Tensor, Tensor]:
        shape = (self.layers, self.kv_heads, tokens, self.head_dim)
        return (
            torch.empty(shape, dtype=self.dtype, device=self.device),
            torch.empty(shape, dtype=self.dtype, device=self.device),
        )


class SequenceKV:
    """One sequence's keys and values; `length` tokens are valid."""

    def __init__(self, layout: KVLayout, capacity: int) -> None:
        self.k, self.v = layout.empty(capacity)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def resize(self, layout: KVLayout, capacity: int) -> None:
        k, v = layout.empty(capacity)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v


class KVCacheError(ValueError):
    pass


class KVCacheManager:
    def __init__(self, layout: KVLayout, budget_bytes: int, block_size: int = 16) -> None:
        if budget_bytes < layout.bytes_per_token * block_size:
            raise KVCacheError(f"KV budget of {budget_bytes} bytes holds less than one block of {block_size} tokens")
        self.layout = layout
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self.used_tokens = 0  # capacity handed to sequences
        self.prefix = PrefixCache(layout, block_size)
        self.prefix_hits = 0  # tokens served from the prefix cache
        self.prefix_queries = 0  # prompt tokens looked up

    @property
    def capacity_tokens(self) -> int:
        """Whole blocks only, so any length up to this can be allocated (allocations round up to blocks)."""
        return self.budget_bytes // self.layout.bytes_per_token // self.block_size * self.block_size

    @property
    def usage(self) -> float:
        return (self.used_tokens + self.prefix.tokens) / self.capacity_tokens

    def _round_up(self, tokens: int) -> int:
        return -(-tokens // self.block_size) * self.block_size

    def _make_room(self, tokens: int) -> bool:
        free = self.capacity_tokens - self.used_tokens - self.prefix.tokens
        while free < tokens and self.prefix.tokens:
            free += self.prefix.evict_one()
        return free >= tokens

    def ensure(self, kv: SequenceKV | None, length: int) -> SequenceKV | None:
        """Grow (or create) a sequence's cache to hold `length` tokens; None when the budget forbids it."""
        current = kv.capacity if kv is not None else 0
        if length <= current:
            return kv
        # Grow geometrically so a decoding sequence reallocates O(log n) times, but never past the budget.
        want = self._round_up(max(length, min(2 * current, length + 256)))
        need = self._round_up(length)
        for target in (want, need):
            if self._make_room(target - current):
                break
        else:
            return None
        self.used_tokens += target - current
        if kv is None:
            return SequenceKV(self.layout, target)
        kv.resize(self.layout, target)
        return kv

    def free(self, kv: SequenceKV | None) -> None:
        if kv is not None:
            self.used_tokens -= kv.capacity
            kv.k = kv.v = torch.empty(0)

    def offload(self, kv: SequenceKV) -> SequenceKV:
        """A host-memory copy of a preempted sequence's cache (it does not count against the budget)."""
        host = SequenceKV.__new__(SequenceKV)
        host.k = kv.k[:, :, : kv.length].to("cpu")
        host.v = kv.v[:, :, : kv.length].to("cpu")
        host.length = kv.length
        return host

    def restore(self, kv: SequenceKV, host: SequenceKV) -> int:
        """Copy an offloaded cache back into `kv` (already sized); returns the tokens restored."""
        kv.k[:, :, : host.length] = host.k.to(kv.k.device, non_blocking=True)
        kv.v[:, :, : host.length] = host.v.to(kv.v.device, non_blocking=True)
        kv.length = host.length
        return host.length

    def reuse_prefix(self, kv: SequenceKV, prompt: list[int], salt: str = "") -> int:
        """Copy cached blocks of the prompt's prefix into `kv`; return how many tokens were filled.
        At least the last prompt token is always left to compute, since its logits are needed. `salt`
        tells apart caches of the same tokens computed by other weights (a LoRA adapter's name)."""
        self.prefix_queries += len(prompt)
        filled = 0
        for key, end in self.prefix.keys(prompt[:-1], salt):
            block = self.prefix.get(key)
            if block is None or end > kv.capacity:
                break
            kv.k[:, :, filled:end] = block[0]
            kv.v[:, :, filled:end] = block[1]
            filled = end
        kv.length = filled
        self.prefix_hits += filled
        return filled

    def store_prefix(self, kv: SequenceKV, prompt: list[int], salt: str = "") -> None:
        """Remember the prompt's full blocks (whose KV is now computed) if the budget has room."""
        start = 0
        for key, end in self.prefix.keys(prompt[: kv.length], salt):
            if key not in self.prefix and self.capacity_tokens - self.used_tokens - self.prefix.tokens >= end - start:
                self.prefix.put(key, kv.k[:, :, start:end].clone(), kv.v[:, :, start:end].clone())
            start = end


class PrefixCache:
    """LRU map from the hash of a whole token prefix (a chain over blocks) to that last block's KV."""

    def __init__(self, layout: KVLayout, block_size: int) -> None:
        self.layout = layout
        self.block_size = block_size
        self.blocks: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def __contains__(self, key: bytes) -> bool:
        return key in self.blocks

    def keys(self, tokens: list[int], salt: str = "") -> list[tuple[bytes, int]]:
        """(chained hash, end offset) for each full block of `tokens`, the chain starting from `salt`."""
        out, digest = [], salt.encode()
        for end in range(self.block_size, len(tokens) + 1, self.block_size):
            block = tokens[end - self.block_size : end]
            digest = hashlib.blake2b(digest + str(block).encode(), digest_size=16).digest()
            out.append((digest, end))
        return out

    def get(self, key: bytes) -> tuple[Tensor, Tensor] | None:
        block = self.blocks.get(key)
        if block is not None:
            self.blocks.move_to_end(key)
        return block

    def put(self, key: bytes, k: Tensor, v: Tensor) -> None:
        self.blocks[key] = (k, v)

    def evict_one(self) -> int:
        self.blocks.popitem(last=False)
        return self.block_size
