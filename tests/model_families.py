"""Tiny random-weight models of every supported family, built from transformers' own config classes and
saved as HF directories with the embedded SmolLM2 tokenizer (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}
# The family -> (config class, its own settings). Windows are small so that test prompts slide past them.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": 12}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 1, 1, 0]}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 12}),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 12,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        },
    ),
    "phi3": (
        "Phi3Config",
        {
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + i / 16 for i in range(8)],
                "long_factor": [2.0 + i / 4 for i in range(8)],
            },
        },
    ),
}


def hf_config(family: str, vocab_size: int) -> Any:
    import transformers

    cls, own = FAMILIES[family]
    return getattr(transformers, cls)(**(SMALL | {"vocab_size": vocab_size} | own))


def write_family(family: str, out: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Save a seeded random model of `family` (with `tokenizer`, an HF tokenizer) under `out`; returns it."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():  # random norms, so that Gemma's `1 + w` and the q/k norms are really exercised
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if "gemma" in family else 1.0, 0.1)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # A template of this family's own, so a test can tell that serving used the checkpoint's template.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("FAMILY", family))
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} (FAMILY)\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
