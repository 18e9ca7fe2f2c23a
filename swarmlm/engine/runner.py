"""Run one batched forward pass over many sequences' new tokens (prefill chunks and decode tokens).

All new tokens of a step are concatenated into one [T] (or [T, hidden]) batch, so every matmul reads the
weights once per step whatever the number of sequences. Attention is the only per-sequence part: each
sequence attends over its own contiguous KV cache. A sequence with a LoRA adapter adds it to its own rows
(sequences with different adapters share the step: model/lora.py's `LoraRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from swarmlm.engine.kv_cache import SequenceKV
from swarmlm.model.llama import AttentionSpec, LlamaSpan, LoraBackend, attention
from swarmlm.model.lora import LoraAdapter, LoraRows


@dataclass
class Segment:
    kv: SequenceKV
    start: int  # position of the first new token (= tokens already in the cache)
    length: int  # new tokens this step
    adapter: LoraAdapter | None = None


class BatchAttention:
    """The `AttentionBackend` for one step: writes new K/V into each sequence's cache and attends."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
        if len(self.segments) == 1:  # a lone sequence (single-stream decoding): no scatter into a batch
            return self._attend_one(self.segments[0], layer, q, k, v, spec)
        out = torch.empty_like(q)
        row = 0
        for seg in self.segments:
            rows = slice(row, row + seg.length)
            out[rows] = self._attend_one(seg, layer, q[rows], k[rows], v[rows], spec)
            row += seg.length
        return out

    @staticmethod
    def _attend_one(seg: Segment, layer: int, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
        """One sequence's new tokens: store their K/V, attend over the cache. Returns [length, heads, D]."""
        end = seg.start + seg.length
        seg.kv.k[layer, :, seg.start : end] = k.transpose(0, 1)
        seg.kv.v[layer, :, seg.start : end] = v.transpose(0, 1)
        keys = seg.kv.k[layer, :, :end].unsqueeze(0)
        values = seg.kv.v[layer, :, :end].unsqueeze(0)
        return attention(q.transpose(0, 1).unsqueeze(0), keys, values, seg.start, spec)[0].transpose(0, 1)


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
        lora = self._lora(segments)
        out = self.span(inputs.to(self.device), positions, BatchAttention(segments), rows, blocks, lora)
        for seg in segments:
            seg.kv.length = seg.start + seg.length
        return out

    def _lora(self, segments: list[Segment]) -> LoraBackend | None:
        """The step's adapters: none, one for every row, or each adapter's rows."""
        rows: dict[LoraAdapter, list[Tensor]] = {}
        at = 0
        for seg in segments:
            if seg.adapter is not None:
                rows.setdefault(seg.adapter, []).append(torch.arange(at, at + seg.length))
            at += seg.length
        if not rows:
            return None
        if len(rows) == 1 and all(seg.adapter is not None for seg in segments):
            return next(iter(rows))
        return LoraRows([(adapter, torch.cat(r).to(self.device)) for adapter, r in rows.items()])
