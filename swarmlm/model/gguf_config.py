"""GGUF metadata -> `ModelConfig`, for the GGUF architectures of the supported families.

llama.cpp leaves part of a family's hyper-parameters out of the file and implies them per architecture
(its src/llama-model.cpp); this module applies the same rules, so that a file reads as llama.cpp runs it:
Gemma 2 slides on alternate layers (a 4096 window and soft caps of 50 and 30 unless the file says),
Gemma 3 on five layers in six (unless `gemma3.attention.sliding_window_pattern` gives another period)
with a local rotary base of 10,000, Gemma's attention scale is 1/√head_dim except for the 27B models
(1/√(hidden/heads), the query_pre_attn_scalar those use), and SmolLM3 has no rotary embeddings on every
fourth layer. Biases, q/k norms and an untied head are known by their tensors being there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from swarmlm.model.model_config import ModelConfig

# GGUF architecture -> the HF model_type of the family (the `llama` architecture is also Mistral's).
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "smollm3": "smollm3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
SLIDE, FULL = "sliding_attention", "full_attention"
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp tells the 27B models by their layer count

Metadata = Callable[[str], Any]  # a key's value, or None where the file lacks it
Vector = Callable[[str], list[float]]  # a 1-D tensor's values by name


def _period(period: int, layers: int) -> tuple[str, ...]:
    """llama.cpp's `set_swa_pattern`: in each run of `period` layers, all but the last slide."""
    return tuple(SLIDE if i % period < period - 1 else FULL for i in range(layers))


def _windows(arch: str, key: Metadata, layers: int) -> tuple[int | None, tuple[str, ...]]:
    window = key("attention.sliding_window")
    if arch == "gemma2":
        return int(window or 4096), _period(2, layers)
    if arch == "gemma3" and window:
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # one flag per layer, True where it slides
            return int(window), tuple(SLIDE if p else FULL for p in pattern)
        return int(window), _period(int(pattern or 6), layers)
    # Every layer slides (Mistral, Phi-3). llama.cpp itself runs these without a window: its `llama`
    # architecture has none, and it turns Phi-3's off; the files we read keep the model's semantics.
    if arch in ("llama", "phi3") and window:
        return int(window), (SLIDE,) * layers
    return None, ()


def _rope_scaling(key: Metadata, tensors: set[str], vector: Vector, context: int) -> dict[str, Any] | None:
    """The global rotary scaling. Llama 3's and Phi-3's are tensors of per-frequency divisors (rope_freqs,
    rope_factors_long/short), as llama.cpp applies them; LongRoPE with equal long and short factors and an
    attention factor of 1 is exactly Llama 3's division."""
    if "rope_factors_long.weight" in tensors:
        scaling = {
            "rope_type": "longrope",
            "short_factor": vector("rope_factors_short.weight"),
            "long_factor": vector("rope_factors_long.weight"),
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length") or context),
        }
        attention_factor = key("rope.scaling.attn_factor")
        return scaling if attention_factor is None else scaling | {"attention_factor": float(attention_factor)}
    if "rope_freqs.weight" in tensors:
        factors = vector("rope_freqs.weight")
        return {
            "rope_type": "longrope",
            "short_factor": factors,
            "long_factor": factors,
            "original_max_position_embeddings": context,
            "attention_factor": 1.0,
        }
    kind = key("rope.scaling.type") or "linear"  # llama.cpp's default, as 0 (or no factor) means 1
    factor = float(key("rope.scaling.factor") or 1.0)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear, Llama 3's and Phi-3's factors)")


def gguf_config(arch: str, meta: Metadata, shapes: dict[str, tuple[int, ...]], vector: Vector) -> ModelConfig:
    """The config of a GGUF file of architecture `arch` (a key of ARCHITECTURES), from its metadata and its
    tensors' names and shapes (row-major, as PyTorch's). Raises ValueError for what swarmlm cannot run."""

    def key(name: str) -> Any:
        return meta(f"{arch}.{name}")

    def need(name: str) -> Any:
        value = key(name)
        if value is None:
            raise ValueError(f"metadata {arch}.{name} is missing")
        return value

    if "token_embd.weight" not in shapes:
        raise ValueError("the token embeddings (token_embd.weight) are missing")
    heads, hidden, layers = int(need("attention.head_count")), int(need("embedding_length")), int(need("block_count"))
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // heads)
    context = int(key("context_length") or 2048)
    experts = int(key("expert_count") or 0)
    window, layer_types = _windows(arch, key, layers)
    gemma = arch in _GEMMA_27B_LAYERS
    eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    fields: dict[str, Any] = {
        "model_type": "mixtral" if arch == "llama" and experts else ARCHITECTURES[arch],
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": int(key("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_theta": float(key("rope.freq_base") or 10000.0),
        "rope_scaling": _rope_scaling(key, set(shapes), vector, context),
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": tuple(int(t) for t in eos if t is not None),
        "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
        "qkv_bias": "blk.0.attn_q.bias" in shapes or "blk.0.attn_qkv.bias" in shapes,
        "o_bias": "blk.0.attn_output.bias" in shapes,
        "mlp_bias": "blk.0.ffn_down.bias" in shapes,
        "qk_norm": "blk.0.attn_q_norm.weight" in shapes,
        "gemma_norms": gemma,
        "sliding_window": window,
        "layer_types": layer_types,
        "num_experts": experts,
        "experts_per_token": int(key("expert_used_count") or 0),
    }
    if gemma:
        big = layers == _GEMMA_27B_LAYERS[arch]
        fields["attn_scale"] = (hidden // heads if big else head_dim) ** -0.5
        final_cap = key("final_logit_softcapping") or (30.0 if arch == "gemma2" else None)
        fields["final_softcap"] = float(final_cap) if final_cap else None
    if arch == "gemma2":
        fields["attn_softcap"] = float(key("attn_logit_softcapping") or 50.0)
    if arch == "gemma3":
        fields["local_rope_theta"] = float(key("rope.freq_base_swa") or 10000.0)
    if arch == "smollm3":
        fields["rope_layers"] = tuple((i + 1) % 4 != 0 for i in range(layers))
    return ModelConfig(**fields)
