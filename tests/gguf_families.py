"""Write the tiny HF models of tests/model_families.py as GGUF files, the way llama.cpp's converter
(convert_hf_to_gguf.py) writes each family: the same architecture name, metadata keys, tensor names (from
the `gguf` package's name map) and tensor changes: q/k rows interleaved for the `llama` and `smollm3`
architectures, Gemma's norms stored as 1 + w, Mixtral's experts stacked, Llama 3's rotary scaling as a
`rope_freqs` tensor and Phi-3's LongRoPE as `rope_factors_long/short` tensors.

The tokenizer is written as llama.cpp writes a byte-level BPE one (its `_set_vocab_gpt2`), for every
family, since every test model carries SmolLM2's; llama.cpp names its pre-tokenizer "smollm".

Two keys go beyond what the converter writes, where llama.cpp's format would lose a property of these
models: Mistral's sliding window (llama.cpp's `llama` architecture has none, so the converter drops it),
and a Gemma 3 window pattern other than the five-in-six llama.cpp implies (`gemma3.attention.
sliding_window_pattern`, which llama.cpp reads as the period).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_TENSOR, GGMLQuantizationType

# HF model_type -> the architecture llama.cpp's converter writes it as.
ARCHITECTURES = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,
    "mixtral": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
    "smollm3": MODEL_ARCH.SMOLLM3,
    "gemma2": MODEL_ARCH.GEMMA2,
    "gemma3_text": MODEL_ARCH.GEMMA3,
    "phi3": MODEL_ARCH.PHI3,
}
_PERMUTED = (MODEL_ARCH.LLAMA, MODEL_ARCH.SMOLLM3)
_GEMMA = (MODEL_ARCH.GEMMA2, MODEL_ARCH.GEMMA3)
_FILE_TYPES = {
    GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def write_gguf(hf_dir: Path, out: Path, qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """Convert the HF model directory `hf_dir` into the GGUF file `out`, its matrices in `qtype` (F32 or
    Q8_0; vectors stay F32, as the converter keeps them); returns `out`."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCHITECTURES[cfg["model_type"]]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(hf_dir.name)
    _hyperparameters(writer, arch, cfg)
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(writer, hf_dir, cfg["vocab_size"])
    for name, array in _tensors(arch, cfg, hf_dir):
        # Like the converter: vectors and the experts' router stay F32.
        if qtype == GGMLQuantizationType.F32 or array.ndim < 2 or ".ffn_gate_inp." in name:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _rope(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, sliding) rotary parameters from either config format (transformers 5's rope_parameters,
    per layer type for Gemma 3, or rope_theta + rope_scaling)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    local = params.get("sliding_attention", {})
    params = params.get("full_attention", params)
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    return params, local


def _sliding_period(layer_types: list[str]) -> int:
    """The period p of llama.cpp's window pattern (all but the last of each p layers slide) that these
    layer types follow."""
    for period in range(1, len(layer_types) + 1):
        slides = [i % period < period - 1 for i in range(len(layer_types))]
        if slides == [t == "sliding_attention" for t in layer_types]:
            return period
    raise ValueError(f"layer types {layer_types} follow no period llama.cpp can express")


def _hyperparameters(w: gguf.GGUFWriter, arch: MODEL_ARCH, cfg: dict[str, Any]) -> None:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rope, local_rope = _rope(cfg)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch != MODEL_ARCH.GEMMA2:  # Gemma 2's converter leaves the base at llama.cpp's default, 10,000
        w.add_rope_freq_base(rope["rope_theta"])
    if cfg.get("head_dim") or arch in _GEMMA:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in (*_PERMUTED, MODEL_ARCH.PHI3):
        w.add_rope_dimension_count(head_dim)
    if arch in _PERMUTED:
        w.add_vocab_size(cfg["vocab_size"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if "rope_theta" in local_rope:
        w.add_rope_freq_base_swa(local_rope["rope_theta"])
    if cfg.get("num_local_experts"):
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == MODEL_ARCH.GEMMA2:
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    if arch == MODEL_ARCH.GEMMA3:
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        if cfg.get("sliding_window_pattern") != 1:
            w.add_sliding_window(cfg["sliding_window"])
        if cfg.get("layer_types") and (period := _sliding_period(cfg["layer_types"])) != 6:
            w.add_sliding_window_pattern(period)  # beyond the converter (see the module's docstring)
    if arch == MODEL_ARCH.PHI3:
        original = rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_sliding_window(cfg.get("sliding_window") or 0)  # 0 for none
        if rope.get("long_factor"):  # LongRoPE's attention factor, from the context's growth
            scale = cfg["max_position_embeddings"] / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    if arch == MODEL_ARCH.LLAMA and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])  # beyond the converter (see the module's docstring)


def _vocab(w: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    """Tokens, their types, merges, special tokens and the chat template, as llama.cpp writes a byte-level
    BPE tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)  # and the chat template


def _permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Interleave each head's rotary halves (llama.cpp's rotary pairs adjacent dimensions)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _tensors(arch: MODEL_ARCH, cfg: dict[str, Any], hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors.torch import load_file

    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    names = gguf.get_tensor_name_map(arch, layers)
    experts: dict[str, torch.Tensor] = {}
    for hf_name, t in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        if arch in _GEMMA and hf_name == "lm_head.weight":
            continue  # the converter skips it: llama.cpp ties Gemma's head
        if arch in _PERMUTED and ".self_attn.q_proj." in hf_name:
            t = _permute(t, heads)
        if arch in _PERMUTED and ".self_attn.k_proj." in hf_name:
            t = _permute(t, cfg.get("num_key_value_heads") or heads)
        if arch in _GEMMA and hf_name.endswith("norm.weight"):
            t = t + 1
        if ".block_sparse_moe.experts." in hf_name:
            experts[hf_name] = t
            continue
        yield _gguf_name(names, hf_name), t.float().numpy()
    for layer in range(layers if experts else 0):  # experts.E.w1 (gate), w2 (down), w3 (up), stacked
        for part in ("w1", "w2", "w3"):
            stacked = torch.stack(
                [
                    experts[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{part}.weight"]
                    for e in range(cfg["num_local_experts"])
                ]
            )
            yield _gguf_name(names, f"layers.{layer}.feed_forward.experts.{part}.weight"), stacked.float().numpy()
    yield from _rope_tensors(arch, cfg)


def _gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF name for {hf_name}")
    return name


def _rope_tensors(arch: MODEL_ARCH, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Llama 3's rotary scaling as per-frequency divisors; Phi-3's LongRoPE factors."""
    rope, _ = _rope(cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if rope.get("rope_type") == "llama3":
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_context = rope["original_max_position_embeddings"]
        divisors = []
        for wavelength in (2 * math.pi / inv_freq).tolist():
            if wavelength < old_context / high:
                divisors.append(1.0)
            elif wavelength > old_context / low:
                divisors.append(factor)
            else:
                smooth = (old_context / wavelength - low) / (high - low)
                divisors.append(1 / ((1 - smooth) / factor + smooth))
        yield f"{gguf.TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight", np.array(divisors, dtype=np.float32)
    if arch == MODEL_ARCH.PHI3 and rope.get("long_factor"):
        for kind in (MODEL_TENSOR.ROPE_FACTORS_LONG, MODEL_TENSOR.ROPE_FACTORS_SHORT):
            factors = rope["long_factor" if kind == MODEL_TENSOR.ROPE_FACTORS_LONG else "short_factor"]
            yield f"{gguf.TENSOR_NAMES[kind]}.weight", np.array(factors, dtype=np.float32)
