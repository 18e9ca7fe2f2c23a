"""The model families swarmlm runs, and how each one's HF `config.json` maps onto `ModelConfig`.

Every family is a Llama-style decoder plus a few switches (see `ModelConfig`): one definition of the
model (llama.py) serves them all, and a `model_type` not listed here is refused rather than approximated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_ROPE_TYPES = ("linear", "llama3", "longrope")


def _attention_bias(cfg: dict[str, Any]) -> dict[str, Any]:
    bias = bool(cfg.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias}


def _llama(cfg: dict[str, Any]) -> dict[str, Any]:
    return _attention_bias(cfg) | {"mlp_bias": bool(cfg.get("mlp_bias", False))}


def _mixtral(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"num_experts": int(cfg["num_local_experts"]), "experts_per_token": int(cfg["num_experts_per_tok"])}


def _smollm3(cfg: dict[str, Any]) -> dict[str, Any]:
    layers = cfg["num_hidden_layers"]
    flags = cfg.get("no_rope_layers")  # 1: the layer uses rotary embeddings, 0: it does not
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    return _attention_bias(cfg) | {"rope_layers": tuple(bool(f) for f in flags)}


def _gemma(cfg: dict[str, Any]) -> dict[str, Any]:
    scalar = cfg.get("query_pre_attn_scalar")
    return {
        "gemma_norms": True,
        "hidden_act": cfg.get("hidden_activation") or "gelu_pytorch_tanh",
        "attn_scale": scalar**-0.5 if scalar else None,
        "attn_softcap": cfg.get("attn_logit_softcapping"),
        "final_softcap": cfg.get("final_logit_softcapping"),
    } | _attention_bias(cfg)


def _gemma3(cfg: dict[str, Any]) -> dict[str, Any]:
    return _gemma(cfg) | {"qk_norm": True}


# model_type -> the fields that family sets beyond the common ones.
FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": lambda cfg: {},
    "mixtral": _mixtral,
    "qwen2": lambda cfg: {"qkv_bias": True},
    "qwen3": lambda cfg: _attention_bias(cfg) | {"qk_norm": True},
    "smollm3": _smollm3,
    "gemma2": _gemma,
    "gemma3_text": _gemma3,
    "phi3": lambda cfg: {},
}


def _layer_types(arch: str, cfg: dict[str, Any], layers: int) -> tuple[str, ...]:
    """Which layers slide. transformers 5 writes `layer_types`; older configs imply them per family."""
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    if not cfg.get("sliding_window"):
        return ()
    slide, full = "sliding_attention", "full_attention"
    if arch == "gemma2":  # alternating, the first layer sliding
        return tuple(slide if i % 2 == 0 else full for i in range(layers))
    if arch == "gemma3_text":  # five sliding layers, then a global one
        pattern = cfg.get("sliding_window_pattern", 6)
        return tuple(full if (i + 1) % pattern == 0 else slide for i in range(layers))
    if arch in ("qwen2", "qwen3"):
        first = cfg.get("max_window_layers", layers)
        return tuple(slide if cfg.get("use_sliding_window") and i >= first else full for i in range(layers))
    return (slide,) * layers  # Mistral, Mixtral, Phi-3: every layer


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_scaling and local_rope_theta from either config format: transformers 5's
    `rope_parameters` (per layer type for Gemma 3) or the older `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    local_theta = cfg.get("rope_local_base_freq")
    if isinstance(params, dict) and "full_attention" in params:
        local_theta = params.get("sliding_attention", {}).get("rope_theta", local_theta)
        params = params["full_attention"]
    if isinstance(params, dict):
        theta, scaling = params.get("rope_theta", cfg.get("rope_theta", 10000.0)), dict(params)
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), dict(cfg.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = "longrope" if kind == "su" else kind
    if kind == "default":
        scaling_out = None
    elif kind in _ROPE_TYPES:
        scaling_out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")} | {"rope_type": kind}
        original = scaling.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        if original is not None:
            scaling_out["original_max_position_embeddings"] = original
    else:
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if float(scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    return {"rope_theta": float(theta), "rope_scaling": scaling_out, "local_rope_theta": local_theta}


def config_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """`ModelConfig` keyword arguments from an HF config.json; ValueError for what swarmlm cannot run."""
    arch = cfg.get("model_type", "llama")
    if arch not in FAMILIES:
        raise ValueError(f"model_type {arch!r} is not supported; swarmlm runs: {', '.join(FAMILIES)}")
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    eos = cfg.get("eos_token_id")
    fields = {
        "model_type": arch,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_ids": tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        "hidden_act": cfg.get("hidden_act", "silu"),
        "sliding_window": cfg.get("sliding_window"),
        "layer_types": _layer_types(arch, cfg, layers),
    }
    fields |= _rope(cfg) | FAMILIES[arch](cfg)
    # Only Gemma 3 gives its sliding layers a rotary base of their own (10,000 unless the config says).
    fields["local_rope_theta"] = (fields["local_rope_theta"] or 10000.0) if arch == "gemma3_text" else None
    if fields["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"activation {fields['hidden_act']!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    if len(fields["layer_types"]) not in (0, layers) or len(fields.get("rope_layers", ())) not in (0, layers):
        raise ValueError("config.json: per-layer lists (layer_types, no_rope_layers) do not match num_hidden_layers")
    return fields
