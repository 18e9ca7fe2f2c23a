"""A decoder model in plain PyTorch, readable in one sitting (after nanoGPT's model.py).

One definition covers every supported family (families.py): a Llama block, with the switches that
Mistral, Mixtral, Qwen2/3, SmolLM3, Gemma 2/3 and Phi-3 add (biases, q/k norms, sliding windows, soft
caps, Gemma's norms, rotary variants, a mixture of experts) read from `ModelConfig`.

One definition serves inference and training. `LlamaSpan` holds the layers [start, end) of a model,
plus the embeddings when start == 0 and the final norm and head when end == num_layers, so a peer
never holds weights it does not serve.

Inference passes an `AttentionBackend` (the engine's KV cache) that sees every layer's new keys and
values and returns the attention output; training passes none and gets plain causal attention. LoRA
adapters come in the same way, as a `LoraBackend` that adds its part to each adaptable linear layer's
output (model/lora.py: one adapter for a whole batch, or one per sequence of a batched step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.model_config import ModelConfig


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends, beyond causality: the score scale (None: 1/√head_dim), a soft cap on the
    scores (Gemma 2), and a sliding window (keys less than `window` positions back)."""

    scale: float | None = None
    softcap: float | None = None
    window: int | None = None


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
        """q: [T, heads, D]; k, v: [T, kv_heads, D] for the T new tokens. Returns [T, heads, D]."""
        ...


class LoraBackend(Protocol):
    def add(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        """`out`, the output of linear layer `name` (e.g. layers.3.mlp.down_proj) for input `x`, with the
        adapters' part added."""
        ...


def project(linear: nn.Module, x: Tensor, lora: LoraBackend | None, name: str) -> Tensor:
    out = linear(x)
    return out if lora is None else lora.add(name, x, out)


def attention(q: Tensor, k: Tensor, v: Tensor, q_start: int, spec: AttentionSpec) -> Tensor:
    """Causal attention of queries at positions q_start.. over keys at positions 0..; q: [B, heads, Tq, D],
    k and v: [B, kv_heads, Tk, D] with Tk = q_start + Tq. Returns [B, heads, Tq, D]."""
    tq, tk = q.shape[-2], k.shape[-2]
    windowed = spec.window is not None and tk > spec.window  # else the window excludes nothing
    mask, causal = None, False
    if windowed or spec.softcap is not None or (tq > 1 and q_start > 0):
        q_pos = torch.arange(q_start, tk, device=q.device)[:, None]
        k_pos = torch.arange(tk, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if windowed:
            mask &= k_pos > q_pos - spec.window
    elif tq > 1:
        causal = True
    if spec.softcap is None:  # the fused kernel
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=spec.scale, enable_gqa=True
        )
    # Soft-capped scores (Gemma 2) need the scores themselves, which the fused kernel never forms.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (spec.scale or q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset  # offset: Gemma scales by 1 + w, its weights start at 0
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight + 1 if self.offset else self.weight
        # One fused op instead of six: decoding a small model is dominated by per-op overhead.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:  # Gemma multiplies in fp32 and rounds once
            return (normed * weight.float()).to(x.dtype)
        return weight * normed.to(x.dtype)  # Llama rounds before the weight


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, long: bool = False) -> Tensor:
    """Rotary inverse frequencies with a rope scaling applied (linear, llama3, or longrope's short or
    `long` factors)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type")
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
    elif kind == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64, device="cpu")
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq.float()


class Rotary:
    """The cos/sin tables of one rotary base. LongRoPE (Phi-3) rotates positions past the original
    context with its long factors and scales both tables by its attention factor."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.long_inv_freq: Tensor | None = None
        self.factor, self.original = 1.0, 0
        if scaling and scaling.get("rope_type") == "longrope":
            self.long_inv_freq = rope_inv_freq(head_dim, theta, scaling, long=True)
            self.original = scaling["original_max_position_embeddings"]
            ratio = scaling.get("factor") or max_positions / self.original
            default = math.sqrt(1 + math.log(ratio) / math.log(self.original)) if ratio > 1 else 1.0
            self.factor = scaling.get("attention_factor") or default

    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin, [T, 1, D] (broadcast over heads), for each position."""
        if self.inv_freq.device != positions.device:  # once: no copy to the device per step
            self.inv_freq = self.inv_freq.to(positions.device)
            if self.long_inv_freq is not None:
                self.long_inv_freq = self.long_inv_freq.to(positions.device)
        pos = positions.float()[..., None]
        freqs = pos * self.inv_freq
        if self.long_inv_freq is not None:
            long = pos * self.long_inv_freq
            freqs = torch.where(pos >= self.original, long, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return (emb.cos() * self.factor).to(dtype), (emb.sin() * self.factor).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [..., T, heads, D]; cos/sin: [T, 1, D] (the rotate-half convention of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


Rope = tuple[Tensor, Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, local: int) -> None:
        super().__init__()
        self.layer, self.rope_kind = local, cfg.rope_kind(layer)  # local: the index in the span's KV cache
        self.name = f"layers.{layer}.self_attn."  # of its linear layers, for LoRA: by the model's layer index
        self.spec = AttentionSpec(cfg.attn_scale, cfg.attn_softcap, cfg.window(layer))
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v in one matmul (as vLLM does): a third of the kernel launches when decoding.
        self.qk_v_split = [(cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qk_v_split), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.gemma_norms)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.gemma_norms)

    def forward(
        self, x: Tensor, ropes: dict[str, Rope], backend: AttentionBackend | None, lora: LoraBackend | None
    ) -> Tensor:
        *lead, _ = x.shape
        qk, v = project(self.qkv_proj, x, lora, self.name + "qkv_proj").split(self.qk_v_split, dim=-1)
        qk = qk.reshape(*lead, self.heads + self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.heads, self.kv_heads], dim=-2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=-2)
        if self.rope_kind is not None:  # queries and keys rotate together: one rope instead of two
            qk = apply_rope(qk, *ropes[self.rope_kind])
        q, k = qk.split([self.heads, self.kv_heads], dim=-2)
        v = v.reshape(*lead, self.kv_heads, self.head_dim)
        if backend is not None:  # inference: x is [T, hidden], one row per new token of many sequences
            out = backend.attend(self.layer, q, k, v, self.spec)
        else:  # training: x is [B, L, hidden], one causal sequence per row
            out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, self.spec).transpose(1, 2)
        return project(self.o_proj, out.reshape(*lead, self.heads * self.head_dim), lora, self.name + "o_proj")


def activation(name: str, x: Tensor) -> Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.act, self.name = cfg.hidden_act, f"layers.{layer}.mlp."
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # fused
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, lora: LoraBackend | None) -> Tensor:
        gate, up = project(self.gate_up_proj, x, lora, self.name + "gate_up_proj").chunk(2, dim=-1)
        return project(self.down_proj, activation(self.act, gate) * up, lora, self.name + "down_proj")


class Experts(nn.Module):
    """Every expert's MLP weights stacked (the layout of transformers' own mixture-of-experts models)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n, hidden, inner = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inner))


class SparseMoE(nn.Module):
    """Mixtral's feed-forward: a router picks each token's top-k experts and mixes their outputs, weighted
    by the router's softmax renormalised over the chosen k. Only the chosen experts compute."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act, self.top_k = cfg.hidden_act, cfg.experts_per_token
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg)

    def forward(self, x: Tensor, lora: LoraBackend | None) -> Tensor:  # experts take no adapters
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat).softmax(dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for expert in chosen.unique().tolist():
            rows, slot = torch.where(chosen == expert)
            gate, up = F.linear(flat[rows], self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(activation(self.act, gate) * up, self.experts.down_proj[expert])
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, local: int) -> None:
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, local)
        self.post_attention_layernorm = norm()  # Gemma: on the attention output; others: before the MLP
        self.mlp = SparseMoE(cfg) if cfg.num_experts else MLP(cfg, layer)
        # Gemma's "sandwich": norms before and after the MLP as well.
        self.pre_feedforward_layernorm = norm() if cfg.gemma_norms else None
        self.post_feedforward_layernorm = norm() if cfg.gemma_norms else None

    def forward(
        self, x: Tensor, ropes: dict[str, Rope], backend: AttentionBackend | None, lora: LoraBackend | None = None
    ) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), ropes, backend, lora)
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x), lora)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), lora))


class LlamaSpan(nn.Module):
    """Layers [start, end) of a model; the whole model when the span is (0, num_layers).

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
        self.layers = nn.ModuleList(Block(cfg, i, i - start) for i in range(start, end))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms) if self.has_head else None
        self.lm_head = None
        if self.has_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight
        # Plain attributes, not buffers: `.to(bfloat16)` must not round the rotary frequencies.
        kinds = {cfg.rope_kind(i) for i in range(start, end)} - {None}
        self.rotary = {
            kind: Rotary(
                cfg.head_dim,
                cfg.local_rope_theta if kind == "local" else cfg.rope_theta,  # type: ignore[arg-type]
                None if kind == "local" else cfg.rope_scaling,
                cfg.max_position_embeddings,
            )
            for kind in kinds
        }

    @classmethod
    def edges_only(cls, cfg: ModelConfig) -> LlamaSpan:
        """Embeddings, final norm and head with no layers: what a swarm client runs locally."""
        return cls(cfg, 0, 0)

    @property
    def is_whole(self) -> bool:
        """Token ids in, logits out: every layer and both edges."""
        return self.has_embeddings and self.has_head and len(self.layers) == self.cfg.num_layers

    def embed(self, ids: Tensor) -> Tensor:
        assert self.embed_tokens is not None
        h = self.embed_tokens(ids)
        if self.cfg.gemma_norms:  # Gemma scales embeddings by √hidden, rounded to their dtype first
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        return h

    def head(self, h: Tensor) -> Tensor:
        """fp32 logits from final hidden states."""
        assert self.lm_head is not None and self.norm is not None
        logits = self.lm_head(self.norm(h)).float()
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        backend: AttentionBackend | None = None,
        logits_rows: Tensor | None = None,
        blocks: tuple[int, int] | None = None,
        lora: LoraBackend | None = None,
        normed_hidden: bool = False,
    ) -> Tensor:
        """Run the span (or only its blocks [i, j) when `blocks` is given: a swarm session that uses part
        of a peer's span).

        x: token ids ([T] or [B, L]), or hidden states ([T, hidden] or [B, L, hidden]): a span without
        embeddings takes only those, one with them takes both (hidden states skip the embeddings, e.g. a
        tuned prompt's rows put before the tokens').
        positions: each token's position in its sequence, shaped like x's leading dims ([T] or [L]).
        logits_rows: with a head, the rows whose logits are wanted (the head is the single largest
        matmul, and a prefill chunk needs logits for its last token only); all rows when None.
        lora: LoRA adapters to apply (model/lora.py), if any.
        normed_hidden: with a head, return the final norm's output instead of the logits (embeddings).
        Returns hidden states, or fp32 logits with a head.
        """
        h = x if x.is_floating_point() else self.embed(x)
        ropes = {kind: rotary.tables(positions, h.dtype) for kind, rotary in self.rotary.items()}
        for block in self.layers if blocks is None else self.layers[blocks[0] : blocks[1]]:
            h = block(h, ropes, backend, lora)
        if not self.has_head:
            return h
        if logits_rows is not None:
            h = h[logits_rows]
        if normed_hidden:
            assert self.norm is not None
            return self.norm(h)
        return self.head(h)
