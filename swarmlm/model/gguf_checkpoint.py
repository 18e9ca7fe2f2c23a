"""Read a layer span's weights from a GGUF file (llama.cpp's format) under this project's parameter names.

The file's tensors are named and laid out as llama.cpp's converter (convert_hf_to_gguf.py) writes them;
reading undoes its changes: the `llama` and `smollm3` architectures store q/k rows interleaved for
llama.cpp's rotary (restored to the rotate-half layout), Gemma stores its norms as `1 + w` (the model
adds the 1 itself), and a mixture of experts' gate and up projections are stacked apart (fused here).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from swarmlm.model.checkpoint import CheckpointError
from swarmlm.model.gguf_config import ARCHITECTURES, gguf_config

# GGUF tensor name within a block -> the model's parameter (before `fuse_projections`).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3 keeps q, k and v in one matrix
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",  # the norm before the feed-forward
    "post_attention_norm": "post_attention_layernorm",  # Gemma: on the attention output
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the experts' router
    "ffn_gate_exps": "mlp.experts.gate_proj",  # stacked over experts; fused with up below
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_ARCH_BLOCK_NAMES = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm"},  # Gemma's post-attention norm is its own tensor
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # gate and up in one matrix
}
_PERMUTED_ARCHS = ("llama", "smollm3")  # whose q/k rows llama.cpp's converter interleaves
_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def _open_reader(path: Path) -> Any:
    """gguf's GGUFReader, parsing through a plain ndarray view of its memory map. The reader slices the map
    for every value of every metadata array (SmolLM2's 49k tokens and 48k merges: about 250k slices), and
    each slice of numpy's memmap subclass runs Python code: 3.1 s to open SmolLM2-135M's file, 1.2 s through
    the view (every peer and server opens one). The view maps the same pages; nothing is read earlier."""
    import gguf  # here: a machine that reads only HF directories needs no gguf package

    class Reader(gguf.GGUFReader):
        # GGUFReader.__init__ assigns `self.data = np.memmap(...)` and parses; this keeps the plain view.
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)

    return Reader(str(path))


class GGUFCheckpoint:
    """A GGUF file of a supported architecture (memory-mapped; tensors dequantized on demand)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.reader = _open_reader(path)
        except Exception as e:  # the gguf package raises bare ValueErrors/asserts on corrupt files
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise CheckpointError(
                f"{path}: GGUF architecture {self.arch!r} is not supported; swarmlm reads: {', '.join(ARCHITECTURES)}"
            )
        self._tensors = {t.name: t for t in self.reader.tensors}
        shapes = {name: tuple(reversed(t.shape.tolist())) for name, t in self._tensors.items()}
        try:
            self.config = gguf_config(self.arch, self.field, shapes, lambda name: self._array(name).tolist())
        except CheckpointError:  # a rotary factor tensor that cannot be read: already says where
            raise
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e

    def field(self, key: str, default: object = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _array(self, name: str) -> np.ndarray:
        """A tensor's values as a writable fp32 array in PyTorch's (row-major) shape."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        if t.tensor_type.name not in _SUPPORTED_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported type {t.tensor_type.name}")
        try:
            array = dequantize(t.data.view(np.ndarray), t.tensor_type)  # memmap indexing is slow
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor {name} is corrupt ({e})") from e
        return np.array(array, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))

    def _local_name(self, name: str, start: int, end: int, embed: bool, head: bool) -> str | None:
        """The span's parameter name for a GGUF tensor, or None where the span does not hold it."""
        cfg = self.config
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m:
            layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
            if not start <= layer < end:
                return None
            names = _ARCH_BLOCK_NAMES.get(self.arch, {})
            local = names.get(part) or _BLOCK_NAMES.get(part)
            if local is None:
                raise CheckpointError(f"{self.path}: tensor {name} is not supported in a {self.arch} model")
            # Stacked expert tensors are parameters themselves, without a .weight suffix.
            return f"layers.{layer - start}.{local}" + ("" if "experts." in local else f".{kind}")
        if name == "token_embd.weight":
            # A tied head is the embedding matrix, so a head needs it too.
            if embed:
                return "embed_tokens.weight"
            return "lm_head.weight" if head and cfg.tie_word_embeddings else None
        if name == "output_norm.weight" and head:
            return "norm.weight"
        if name == "output.weight" and head:
            return "lm_head.weight"
        return None  # the other edge's tensors, and rotary factors (read into the config)

    def tensors(self, start: int, end: int, embed: bool, head: bool) -> Iterator[tuple[str, Tensor]]:
        cfg = self.config
        gates: dict[str, Tensor] = {}  # a layer's stacked expert gates, until its up projections come
        ups: dict[str, Tensor] = {}
        for gguf_name in self._tensors:
            name = self._local_name(gguf_name, start, end, embed, head)
            if name is None:
                continue
            weight = torch.from_numpy(self._array(gguf_name))
            if self.arch in _PERMUTED_ARCHS and ".self_attn.q_proj." in name:
                weight = _unpermute_rope(weight, cfg.num_heads)
            elif self.arch in _PERMUTED_ARCHS and ".self_attn.k_proj." in name:
                weight = _unpermute_rope(weight, cfg.num_kv_heads)
            elif cfg.gemma_norms and name.endswith("norm.weight"):
                weight = weight - 1  # the model adds it back: exactly the stored value where it is in [0.5, 2]
            if name.endswith(("experts.gate_proj", "experts.up_proj")):
                layer, _, part = name.rpartition(".mlp.experts.")
                (gates if part == "gate_proj" else ups)[layer] = weight
                if layer in gates and layer in ups:
                    yield f"{layer}.mlp.experts.gate_up_proj", torch.cat((gates.pop(layer), ups.pop(layer)), dim=1)
                continue
            yield name, weight


def _unpermute_rope(w: Tensor, heads: int) -> Tensor:
    """llama.cpp's converter interleaves each head's q/k rows (weights and biases) for its rotary; restore
    the rotate-half layout of HF checkpoints."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


@functools.lru_cache(maxsize=4)
def _open_gguf(path: Path, size: int, mtime_ns: int) -> GGUFCheckpoint:
    """One reader per file version and process: parsing a GGUF header (its 49k-token vocabulary) takes
    seconds, and a peer starting up opens its checkpoint several times (layer count, span, version)."""
    return GGUFCheckpoint(path)


def open_gguf(path: Path) -> GGUFCheckpoint:
    st = path.stat()
    return _open_gguf(path.resolve(), st.st_size, st.st_mtime_ns)
