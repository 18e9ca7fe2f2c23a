"""One place for a decoder model's hyper-parameters, read from GGUF metadata or an HF config.json.

The fields past `eos_token_ids` are what the supported families (`families.py`) add to a Llama decoder;
their defaults are Llama's, so a Llama model sets none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # with "rope_type": linear, llama3 or longrope
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    model_type: str = "llama"
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma's GeGLU)
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before the rotary
    gemma_norms: bool = False  # Gemma: `1 + w` RMSNorm, pre/post-feed-forward norms, embeddings × √hidden
    attn_scale: float | None = None  # None: 1/√head_dim (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: scores = cap · tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    sliding_window: int | None = None  # keys within this many positions, on the layers that slide
    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention" per layer; () = all full
    rope_layers: tuple[bool, ...] = ()  # False on layers without rotary embeddings (SmolLM3); () = all
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' rotary base (no scaling there)
    num_experts: int = 0  # mixture of experts (Mixtral): experts per layer; 0 = a dense MLP
    experts_per_token: int = 0

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size) if self.gemma_norms else 1.0

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer (the model's index), or None where it attends to everything."""
        sliding = not self.layer_types or self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    def rope_kind(self, layer: int) -> str | None:
        """Which rotary table a layer uses: "global", "local" (Gemma 3's sliding layers) or None."""
        if self.rope_layers and not self.rope_layers[layer]:
            return None
        if self.local_rope_theta is not None and self.window(layer) is not None:
            return "local"
        return "global"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` of a supported family (raises ValueError otherwise)."""
        from swarmlm.model.families import config_fields

        return cls(**config_fields(cfg))

    def to_hf(self) -> dict[str, Any]:
        """The inverse of `from_hf` for Llama models (what training produces), for exporting a checkpoint
        that transformers loads."""
        if self.model_type != "llama":
            raise ValueError(f"export writes Llama checkpoints; this model is {self.model_type!r}")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "hidden_act": "silu",
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
        }
