"""A Llama checkpoint with seeded random weights at a given shape, written as a Hugging Face directory.

`make big-model` writes SmolLM2-1.7B's shape (about 1.7B parameters, bf16 on disk like the real
checkpoint) to `.cache/smollm2-1.7b-random/`: a model too large for one capped peer, for `make bench-big`.
Tests write small shapes with the same function. The tokenizer, chat template and special tokens are the
embedded SmolLM2-135M's (SmolLM2 shares one vocabulary across its sizes), so the directory serves text.

The weights are drawn tensor by tensor (normal, std 0.02, as transformers initialises Llama; norms are
ones) from a generator seeded by the seed and the tensor's name, so values do not depend on the sharding,
and one shard of layers at a time is in memory, never the model. Shards hold whole layers (a peer reads
the files of its own span) and the embeddings have a file of their own.

    .venv/bin/python -m swarmlm.launch.random_model [--out DIR] [--seed N] [--tokenizer-from CHECKPOINT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from swarmlm.core.files import atomic_directory
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.loading import default_model_path
from swarmlm.model.tokenizer import load_tokenizer

INIT_STD = 0.02  # transformers' initializer_range for Llama
INDEX = "model.safetensors.index.json"
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Shape:
    """A Llama model's sizes; the defaults are SmolLM2-1.7B's (its config.json on the Hugging Face hub)."""

    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 8192
    rope_theta: float = 130000.0
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5


SMOLLM2_1_7B = Shape()
DEFAULT_DIR = ROOT / ".cache" / "smollm2-1.7b-random"


def hf_config(shape: Shape, vocab_size: int, bos: int | None, eos: tuple[int, ...]) -> dict[str, object]:
    """config.json as transformers' `save_pretrained` writes it for this shape (tied embeddings, bf16
    weights), in its JSON form (so it compares equal to the file read back)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
        bos_token_id=bos,
        eos_token_id=list(eos) if len(eos) > 1 else eos[0],
        pad_token_id=eos[0],
        dtype="bfloat16",
    )
    return json.loads(config.to_json_string(use_diff=True))


def _layer_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    head_dim = shape.hidden_size // shape.num_heads
    h, kv, ff = shape.hidden_size, shape.num_kv_heads * head_dim, shape.intermediate_size
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (shape.num_heads * head_dim, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, shape.num_heads * head_dim),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ff, h),
        "mlp.up_proj.weight": (ff, h),
        "mlp.down_proj.weight": (h, ff),
    }


def random_tensor(name: str, size: tuple[int, ...], seed: int, dtype: torch.dtype) -> Tensor:
    """Ones for a norm, else normal(0, INIT_STD) drawn from a generator seeded by (seed, name)."""
    if len(size) == 1:
        return torch.ones(size, dtype=dtype)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8]) >> 1)
    return torch.empty(size).normal_(0.0, INIT_STD, generator=g).to(dtype)


def shard_plan(shape: Shape, vocab_size: int, layers_per_shard: int) -> list[dict[str, tuple[int, ...]]]:
    """Each file's tensors (checkpoint names and sizes): embeddings and final norm first, then the layers."""
    edges = {"model.embed_tokens.weight": (vocab_size, shape.hidden_size), "model.norm.weight": (shape.hidden_size,)}
    shards = [edges]
    for first in range(0, shape.num_layers, layers_per_shard):
        layers = range(first, min(first + layers_per_shard, shape.num_layers))
        shards.append({f"model.layers.{i}.{n}": s for i in layers for n, s in _layer_shapes(shape).items()})
    return shards


def _index(shape: Shape, vocab_size: int, seed: int, layers_per_shard: int, itemsize: int) -> dict[str, object]:
    plan = shard_plan(shape, vocab_size, layers_per_shard)
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    total = sum(torch.Size(s).numel() * itemsize for shard in plan for s in shard.values())
    return {
        "metadata": {"total_size": total, "swarmlm_random": {"seed": seed, **asdict(shape)}},
        "weight_map": {name: file for file, shard in zip(files, plan, strict=True) for name in shard},
    }


def is_complete(out: Path, index: dict[str, object], config: dict[str, object]) -> bool:
    """The directory holds this model: same index and config, tokenizer present, every shard's header
    naming the tensors the index puts in it (headers only: no weight is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        if json.loads((out / INDEX).read_text()) != index or json.loads((out / "config.json").read_text()) != config:
            return False
        if not (out / "tokenizer.json").is_file():
            return False
        weight_map: dict[str, str] = index["weight_map"]  # type: ignore[assignment]
        for file in set(weight_map.values()):
            with safe_open(str(out / file), framework="pt") as f:
                if set(f.keys()) != {n for n, fl in weight_map.items() if fl == file}:
                    return False
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def write_random_model(
    out: Path = DEFAULT_DIR,
    shape: Shape = SMOLLM2_1_7B,
    seed: int = 0,
    layers_per_shard: int = 2,
    source: Path | None = None,
) -> bool:
    """Write the model to `out` unless it is there already, complete. Returns whether it wrote. Its
    tokenizer, vocabulary and special tokens are `source`'s (a checkpoint with SmolLM2's tokenizer, such as
    a small model this function wrote: a machine without the embedded model's GGUF), else the embedded
    model's."""
    from safetensors.torch import save_file

    embedded = open_checkpoint(source or default_model_path())
    vocab, dtype = embedded.config.vocab_size, torch.bfloat16
    config = hf_config(shape, vocab, embedded.config.bos_token_id, embedded.config.eos_token_ids)
    index = _index(shape, vocab, seed, layers_per_shard, dtype.itemsize)
    if is_complete(out, index, config):
        return False
    weight_map: dict[str, str] = index["weight_map"]  # type: ignore[assignment]
    with atomic_directory(out) as tmp:
        for shard in shard_plan(shape, vocab, layers_per_shard):
            tensors = {name: random_tensor(name, size, seed, dtype) for name, size in shard.items()}
            save_file(tensors, str(tmp / weight_map[next(iter(shard))]), metadata={"format": "pt"})
            del tensors  # before the next shard is drawn: one shard in memory at a time
        load_tokenizer(embedded).hf.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description="Write SmolLM2-1.7B's shape with seeded random weights")
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, help="a checkpoint whose tokenizer to take (default: embedded)")
    args = ap.parse_args()
    wrote = write_random_model(args.out, seed=args.seed, source=args.tokenizer_from)
    print(f"{args.out}: {'written' if wrote else 'already complete'}")


if __name__ == "__main__":
    main()
