"""Read weights for a layer span from a GGUF file or a Hugging Face directory (config.json + safetensors).

Both readers produce tensors under this project's parameter names (which are those of HF Llama
checkpoints without the `model.` prefix, layer indices made local to the span), so `LlamaSpan` loads
either with a plain `load_state_dict`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from swarmlm.core.files import atomic_directory
from swarmlm.model.model_config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, or of an unsupported kind."""


# GGUF tensor name suffix -> parameter name inside one block.
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SUPPORTED_GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def _wanted(layer: int | None, start: int, end: int) -> bool:
    return layer is None or start <= layer < end


class GGUFCheckpoint:
    """A GGUF file of the `llama` architecture (memory-mapped; tensors dequantized on demand)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the gguf package raises bare ValueErrors/asserts on corrupt files
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
        arch = self.field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        self.config = self._config()

    def field(self, key: str, default: object = None) -> object:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _config(self) -> ModelConfig:
        g = self.field
        heads = int(g("llama.attention.head_count"))
        hidden = int(g("llama.embedding_length"))
        tensor_names = {t.name for t in self.reader.tensors}
        vocab = g("llama.vocab_size") or len(g("tokenizer.ggml.tokens") or [])
        scaling = None
        if g("llama.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(g("llama.rope.scaling.factor"))}
        eos = g("tokenizer.ggml.eos_token_id")
        eot = g("tokenizer.ggml.eot_token_id")
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(g("llama.feed_forward_length")),
            num_layers=int(g("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(g("llama.attention.head_count_kv", heads)),
            head_dim=int(g("llama.rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(g("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(g("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=g("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(int(t) for t in (eos, eot) if t is not None),
        )

    def tensors(self, start: int, end: int, embed: bool, head: bool) -> Iterator[tuple[str, Tensor]]:
        from gguf.quants import dequantize

        cfg = self.config
        for t in self.reader.tensors:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
            if m:
                layer = int(m.group(1))
                if not _wanted(layer, start, end):
                    continue
                name = f"layers.{layer - start}.{_GGUF_BLOCK_NAMES[m.group(2)]}.weight"
            elif t.name == "token_embd.weight":
                # A tied head is the embedding matrix, so a head needs it too.
                if not (embed or (head and cfg.tie_word_embeddings)):
                    continue
                name = "embed_tokens.weight" if embed else "lm_head.weight"
            elif t.name == "output_norm.weight" and head:
                name = "norm.weight"
            elif t.name == "output.weight" and head:
                name = "lm_head.weight"
            else:
                continue
            qtype = t.tensor_type.name
            if qtype not in _SUPPORTED_GGUF_TYPES:
                raise CheckpointError(f"{self.path}: tensor {t.name} has unsupported type {qtype}")
            try:
                array = dequantize(t.data.view(np.ndarray), t.tensor_type)  # memmap indexing is slow
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor {t.name} is corrupt ({e})") from e
            shape = tuple(reversed(t.shape.tolist()))
            weight = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a writable copy
            # llama.cpp stores q/k rows interleaved for its rope; restore the HF rotate-half layout.
            if name.endswith("q_proj.weight"):
                weight = _unpermute_rope(weight, cfg.num_heads)
            elif name.endswith("k_proj.weight"):
                weight = _unpermute_rope(weight, cfg.num_kv_heads)
            yield name, weight


def _unpermute_rope(w: Tensor, heads: int) -> Tensor:
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


class HFCheckpoint:
    """A Hugging Face model directory: config.json plus *.safetensors (sharded or not)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable config.json ({e})") from e
        except ValueError as e:  # a family or feature swarmlm does not run
            raise CheckpointError(f"{path}: {e}") from e
        self.files = sorted(path.glob("*.safetensors"))
        if not self.files:
            raise CheckpointError(f"{path}: no *.safetensors weights found")

    def tensors(self, start: int, end: int, embed: bool, head: bool) -> Iterator[tuple[str, Tensor]]:
        from safetensors import SafetensorError, safe_open

        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        name = self._local_name(key, start, end, embed, head)
                        if name is not None:
                            # A copy in the file's dtype (converted when served): a view would keep the
                            # file mapped, and every page read through it resident, for the peer's life.
                            yield name, f.get_tensor(key).clone()
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupt safetensors file ({e})") from e

    def _local_name(self, key: str, start: int, end: int, embed: bool, head: bool) -> str | None:
        key = key.removeprefix("model.")
        if key.endswith("rotary_emb.inv_freq"):  # older Llama checkpoints saved this buffer; it is derived
            return None
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m:
            layer = int(m.group(1))
            return f"layers.{layer - start}.{m.group(2)}" if _wanted(layer, start, end) else None
        if key == "embed_tokens.weight":
            if embed:
                return key
            return "lm_head.weight" if head and self.config.tie_word_embeddings else None
        if key in ("norm.weight", "lm_head.weight") and head:
            return key
        return None


# Checkpoints store q/k/v and gate/up separately; `LlamaSpan` holds each group as one fused matrix (Phi-3
# checkpoints already do), and a mixture of experts' weights stacked over experts.
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# Mixtral's checkpoint names (w1: gate, w3: up, w2: down) -> the stacked `Experts` parameters.
_EXPERT = re.compile(r"(layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def fuse_projections(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint names (q_proj, k_proj, ..., experts.N.w1) to the model's fused ones (qkv_proj, gate_up_proj,
    experts.gate_up_proj). In place: each group's parts are freed as it is fused, so reading a span never
    holds its projections twice."""
    out = state
    for layer in sorted({k.split(".")[1] for k in state if k.startswith("layers.")}, key=int):
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"layers.{layer}.{p}.{kind}" for p in parts]
                if all(n in out for n in names):
                    out[f"layers.{layer}.{fused}.{kind}"] = torch.cat([out.pop(n) for n in names])
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    for name in [n for n in out if _EXPERT.fullmatch(n)]:
        m = _EXPERT.fullmatch(name)
        assert m is not None
        experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = out.pop(name)
    for layer, by_index in experts.items():
        ordered = [by_index[i] for i in sorted(by_index)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat((e["w1"], e["w3"])) for e in ordered])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([e["w2"] for e in ordered])
    for name in [n for n in out if ".block_sparse_moe.gate." in n]:
        out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = out.pop(name)
    return out


def split_projections(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The inverse of `fuse_projections` for a Llama model, for writing checkpoints in the standard layout."""
    sizes = {
        "self_attn.qkv_proj": [cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2],
        "mlp.gate_up_proj": [cfg.intermediate_size] * 2,
    }
    out = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"(layers\.\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.(weight|bias)", name)
        if m is None:
            out[name] = tensor
            continue
        for part, piece in zip(_FUSED[m.group(2)], tensor.split(sizes[m.group(2)]), strict=True):
            out[f"{m.group(1)}.{part}.{m.group(3)}"] = piece
    return out


@functools.lru_cache(maxsize=4)
def _open_gguf(path: Path, size: int, mtime_ns: int) -> GGUFCheckpoint:
    """One reader per file version and process: parsing a GGUF header (its 49k-token vocabulary) takes
    seconds, and a peer starting up opens its checkpoint several times (layer count, span, version)."""
    return GGUFCheckpoint(path)


def open_checkpoint(path: Path) -> GGUFCheckpoint | HFCheckpoint:
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        return _open_gguf(path.resolve(), st.st_size, st.st_mtime_ns)
    if path.is_dir() and (path / "config.json").exists():
        return HFCheckpoint(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return open_checkpoint(ggufs[0])
    raise CheckpointError(f"{path}: not a .gguf file or a directory with config.json and safetensors")


def save_hf_checkpoint(state: dict[str, Tensor], config: ModelConfig, out_dir: Path) -> None:
    """Write a whole model as a Hugging Face directory (config.json + model.safetensors) that both
    `HFCheckpoint` and transformers load. Written into a temporary sibling and renamed into place, so a
    crash never leaves a half-written directory."""
    from safetensors.torch import save_file

    with atomic_directory(out_dir) as tmp:
        tensors = {
            (name if name == "lm_head.weight" else f"model.{name}"): t.detach().to("cpu").contiguous()
            for name, t in split_projections(state, config).items()
            if not (name == "lm_head.weight" and config.tie_word_embeddings)
        }
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
