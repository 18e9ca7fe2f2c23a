"""A Llama-family decoder in plain PyTorch, readable in one sitting (after nanoGPT's model.py).

One definition serves inference and training. `LlamaSpan` holds the layers [start, end) of a model,
plus the embeddings when start == 0 and the final norm and head when end == num_layers, so a peer
never holds weights it does not serve.

Inference passes an `AttentionBackend` (the engine's KV cache) that sees every layer's new keys and
values and returns the attention output; training passes none and gets plain causal attention.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.model_config import ModelConfig


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [T, heads, D]; k, v: [T, kv_heads, D] for the T new tokens. Returns [T, heads, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused op instead of six: decoding a small model is dominated by per-op overhead.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Lower precisions normalise in fp32 and round before the weight, as the reference implementation.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Rotary inverse frequencies, with the config's rope scaling applied (linear or llama3)."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64, device="cpu") / cfg.head_dim)
    )
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [..., T, heads, D]; cos/sin: [T, 1, D] (the rotate-half convention of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v in one matmul (as vLLM does): a third of the kernel launches when decoding.
        self.qk_v_split = [(cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qk_v_split), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, backend: AttentionBackend | None) -> Tensor:
        *lead, _ = x.shape
        qk, v = self.qkv_proj(x).split(self.qk_v_split, dim=-1)
        # Queries and keys rotate together: one rope instead of two (per-op overhead again).
        qk = apply_rope(qk.reshape(*lead, self.heads + self.kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.heads, self.kv_heads], dim=-2)
        v = v.reshape(*lead, self.kv_heads, self.head_dim)
        if backend is not None:  # inference: x is [T, hidden], one row per new token of many sequences
            out = backend.attend(self.layer, q, k, v)
        else:  # training: x is [B, L, hidden], one causal sequence per row
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        return self.o_proj(out.reshape(*lead, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused, as qkv
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, backend: AttentionBackend | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaSpan(nn.Module):
    """Layers [start, end) of a Llama-family model; the whole model when the span is (0, num_layers).

    `edges` (default: by position) adds the token embeddings when the span starts at layer 0 and the final
    norm and head when it ends at the last layer. A swarm peer hosts blocks only (`edges=False`) and a
    swarm client holds the edges only (`LlamaSpan.edges_only`): see docs/architecture.md.
    """

    def __init__(self, cfg: ModelConfig, start: int = 0, end: int | None = None, edges: bool = True) -> None:
        super().__init__()
        end = cfg.num_layers if end is None else end
        if not (0 <= start < end <= cfg.num_layers or (edges and start == 0 and end == 0)):
            raise ValueError(f"layer span [{start}, {end}) is outside the model's {cfg.num_layers} layers")
        self.cfg, self.start, self.end = cfg, start, end
        self.has_embeddings = edges and start == 0
        self.has_head = edges and (end == cfg.num_layers or end == 0)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.has_embeddings else None
        self.layers = nn.ModuleList(Block(cfg, i - start) for i in range(start, end))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.has_head else None
        self.lm_head = None
        if self.has_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: `.to(bfloat16)` must not round the rotary frequencies.
        self.inv_freq = rope_inv_freq(cfg)

    @classmethod
    def edges_only(cls, cfg: ModelConfig) -> LlamaSpan:
        """Embeddings, final norm and head with no layers: what a swarm client runs locally."""
        return cls(cfg, 0, 0)

    @property
    def is_whole(self) -> bool:
        """Token ids in, logits out: every layer and both edges."""
        return self.has_embeddings and self.has_head and len(self.layers) == self.cfg.num_layers

    def head(self, h: Tensor) -> Tensor:
        """fp32 logits from final hidden states."""
        assert self.lm_head is not None and self.norm is not None
        return self.lm_head(self.norm(h)).float()

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]  # [T, 1, D]: broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        backend: AttentionBackend | None = None,
        logits_rows: Tensor | None = None,
        blocks: tuple[int, int] | None = None,
    ) -> Tensor:
        """Run the span (or only its blocks [i, j) when `blocks` is given: a swarm session that uses part
        of a peer's span).

        x: token ids ([T] or [B, L]) with embeddings, else hidden states ([T, hidden] or [B, L, hidden]).
        positions: each token's position in its sequence, shaped like x's leading dims ([T] or [L]).
        logits_rows: with a head, the rows whose logits are wanted (the head is the single largest
        matmul, and a prefill chunk needs logits for its last token only); all rows when None.
        Returns hidden states, or fp32 logits with a head.
        """
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        cos, sin = self.rope(positions, h.dtype)
        for block in self.layers if blocks is None else self.layers[blocks[0] : blocks[1]]:
            h = block(h, cos, sin, backend)
        if not self.has_head:
            return h
        if logits_rows is not None:
            h = h[logits_rows]
        return self.head(h)
