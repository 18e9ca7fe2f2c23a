"""Run one batched forward pass over many sequences' new tokens (prefill chunks and decode tokens).

All new tokens of a step are concatenated into one [T] (or [T, hidden]) batch, so every matmul reads the
weights once per step whatever the number of sequences. Attention is the only per-sequence part: each
sequence attends over its own contiguous KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from swarmlm.engine.kv_cache import SequenceKV
from swarmlm.model.llama import LlamaSpan


@dataclass
class Segment:
    kv: SequenceKV
    start: int  # position of the first new token (= tokens already in the cache)
    length: int  # new tokens this step


class BatchAttention:
    """The `AttentionBackend` for one step: writes new K/V into each sequence's cache and attends."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if len(self.segments) == 1:  # a lone sequence (single-stream decoding): no scatter into a batch
            return self._attend_one(self.segments[0], layer, q, k, v)
        out = torch.empty_like(q)
        row = 0
        for seg in self.segments:
            rows = slice(row, row + seg.length)
            out[rows] = self._attend_one(seg, layer, q[rows], k[rows], v[rows])
            row += seg.length
        return out

    @staticmethod
    def _attend_one(seg: Segment, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One sequence's new tokens: store their K/V, attend over the cache. Returns [length, heads, D]."""
        end = seg.start + seg.length
        seg.kv.k[layer, :, seg.start : end] = k.transpose(0, 1)
        seg.kv.v[layer, :, seg.start : end] = v.transpose(0, 1)
        keys = seg.kv.k[layer, :, :end].unsqueeze(0)
        values = seg.kv.v[layer, :, :end].unsqueeze(0)
        if seg.length == 1:
            mask, causal = None, False
        elif seg.start == 0:
            mask, causal = None, True
        else:  # a later prefill chunk: causal within the chunk, full view of the cached prefix
            pos = torch.arange(end, device=q.device)
            mask, causal = pos[None, :] <= pos[seg.start :, None], False
        query = q.transpose(0, 1).unsqueeze(0)
        att = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return att[0].transpose(0, 1)


class ModelRunner:
    """Owns the model span and turns (segments, inputs) into logits or hidden states."""

    def __init__(self, span: LlamaSpan) -> None:
        self.span = span
        p = next(span.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.inference_mode()
    def forward(
        self,
        segments: list[Segment],
        inputs: Tensor,
        logits_rows: list[int] | None = None,
        blocks: tuple[int, int] | None = None,
    ) -> Tensor:
        positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments]).to(self.device)
        rows = None if logits_rows is None else torch.tensor(logits_rows, dtype=torch.long, device=self.device)
        out = self.span(inputs.to(self.device), positions, BatchAttention(segments), rows, blocks)
        for seg in segments:
            seg.kv.length = seg.start + seg.length
        return out
