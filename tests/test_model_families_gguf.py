"""Every supported family read from a GGUF file written as llama.cpp's converter writes it
(tests/gguf_families.py): the config, logits and tokenizer of its HF directory and of transformers, a Q8_0
file within a stated tolerance, and a GGUF architecture swarmlm does not run refused in one line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from swarmlm.model.checkpoint import CheckpointError, open_checkpoint
from swarmlm.model.llama import Rotary
from swarmlm.model.loading import load_model
from swarmlm.model.model_config import ModelConfig
from tests.gguf_families import write_gguf
from tests.model_families import FAMILIES, write_family
from tests.test_model_families import MESSAGES, prompts, reference

TEXTS = ["What is the capital of France?", "  spaces  and\ttabs\n\n12345 ümlaut", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each family's HF directory and the GGUF file written from it."""
    tokenizer = load_model(layers=(0, 0)).tokenizer.hf  # the embedded model's: nothing is downloaded
    root = tmp_path_factory.mktemp("gguf-families")
    found = {}
    for family in FAMILIES:
        hf_dir = write_family(family, root / family, tokenizer)
        found[family] = (hf_dir, write_gguf(hf_dir, root / f"{family}.gguf"))
    return found


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    """Module-scoped, so that pytest runs each family's tests together: reading a GGUF header (its 49k-token
    vocabulary) takes seconds, and the reader keeps the last few files open."""
    return request.param


def rotary_tables(cfg: ModelConfig, kind: str) -> torch.Tensor:
    theta = cfg.local_rope_theta if kind == "local" else cfg.rope_theta
    rotary = Rotary(cfg.head_dim, theta, None if kind == "local" else cfg.rope_scaling, cfg.max_position_embeddings)
    return torch.cat(rotary.tables(torch.arange(cfg.max_position_embeddings), torch.float32))


def test_config_matches_the_hf_directory(family: str, checkpoints: dict[str, tuple[Path, Path]]) -> None:
    hf_dir, path = checkpoints[family]
    mine, theirs = open_checkpoint(path).config, open_checkpoint(hf_dir).config
    # Stored differently, compared by effect below; llama.cpp names Mistral's architecture `llama`.
    differ = {"rope_scaling", "layer_types", "rms_norm_eps", "model_type"}
    for field in dataclasses.fields(ModelConfig):
        if field.name not in differ:
            assert getattr(mine, field.name) == getattr(theirs, field.name), field.name
    assert math.isclose(mine.rms_norm_eps, theirs.rms_norm_eps, rel_tol=1e-6)  # GGUF keeps it in fp32
    assert mine.model_type == ("llama" if family == "mistral" else theirs.model_type)
    layers = range(mine.num_layers)
    assert [mine.window(i) for i in layers] == [theirs.window(i) for i in layers]
    assert [mine.rope_kind(i) for i in layers] == [theirs.rope_kind(i) for i in layers]
    for kind in {mine.rope_kind(i) for i in layers} - {None}:  # every position (fp32 factors: 1e-5 at 511)
        torch.testing.assert_close(rotary_tables(mine, kind), rotary_tables(theirs, kind), rtol=0, atol=1e-5)


def test_logits_match_the_hf_directory_and_transformers(family: str, checkpoints: dict[str, tuple[Path, Path]]) -> None:
    hf_dir, path = checkpoints[family]
    ref, _ = reference(hf_dir)
    from_hf, from_gguf = load_model(str(hf_dir), device="cpu"), load_model(str(path), device="cpu")
    # The same file read as two spans, as two swarm peers would: the front one's embeddings, the back one's
    # head (tied or not) and each one's layers.
    front, back = load_model(str(path), layers=(0, 2), device="cpu"), load_model(str(path), layers=(2, 4), device="cpu")
    for ids in prompts(family, from_gguf.config.vocab_size):
        x, positions = torch.tensor([ids]), torch.arange(len(ids))
        with torch.no_grad():
            theirs = ref(x).logits[0]
            mine = from_gguf.span(x, positions)[0]
            hf = from_hf.span(x, positions)[0]
            split = back.span(front.span(x, positions), positions)[0]
        spread = (theirs.max() - theirs.min()).item()
        assert (mine - theirs).abs().max().item() <= 1e-4 * spread, (family, len(ids))
        assert (mine - hf).abs().max().item() <= 1e-4 * spread, (family, len(ids))
        assert torch.equal(split, mine), (family, len(ids))


def test_tokenizer_and_chat_template_come_from_the_metadata(
    family: str, checkpoints: dict[str, tuple[Path, Path]]
) -> None:
    hf_dir, path = checkpoints[family]
    mine = load_model(str(path), layers=(0, 0)).tokenizer
    theirs = load_model(str(hf_dir), layers=(0, 0)).tokenizer
    assert mine.hf.chat_template == (hf_dir / "chat_template.jinja").read_text()
    assert mine.chat_prompt(MESSAGES) == theirs.chat_prompt(MESSAGES)
    assert f"user ({family})" in mine.chat_prompt(MESSAGES)
    assert (mine.eos_token_ids, mine.add_bos) == (theirs.eos_token_ids, theirs.add_bos)
    for text in TEXTS:
        assert mine.encode(text) == theirs.encode(text), text
        assert mine.decode(mine.encode(text)) == theirs.decode(theirs.encode(text)), text


# Stated tolerance of a Q8_0 file (each row of 32 weights scaled to int8, as llama.cpp quantizes) against the
# fp32 model, per position: cosine similarity of the logits, and the largest difference over their range.
# Mixtral's is the widest: a router that picks another expert for a token moves that token's logits most.
# One family of each tensor layout: stacked experts and permuted q/k (Mixtral), Gemma's norms and q/k norms
# (Gemma 3), fused q/k/v and gate/up (Phi-3).
Q8_0_COSINE, Q8_0_SPREAD = 0.995, 0.05


@pytest.mark.parametrize("quantized", ["mixtral", "gemma3", "phi3"])
def test_q8_0_within_tolerance(quantized: str, checkpoints: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    hf_dir, _ = checkpoints[quantized]
    path = write_gguf(hf_dir, tmp_path / f"{quantized}.q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
    kinds = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert gguf.GGMLQuantizationType.Q8_0 in kinds, kinds
    packed, dense = load_model(str(path), device="cpu"), load_model(str(hf_dir), device="cpu")
    for ids in prompts(quantized, dense.config.vocab_size):
        x, positions = torch.tensor([ids]), torch.arange(len(ids))
        with torch.no_grad():
            a, b = packed.span(x, positions)[0], dense.span(x, positions)[0]
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() >= Q8_0_COSINE, len(ids)
        assert (a - b).abs().max().item() <= Q8_0_SPREAD * (b.max() - b.min()).item(), len(ids)


def test_unknown_architecture_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as refused:
        load_model(str(path))
    message = str(refused.value)
    assert "\n" not in message
    assert message.endswith(
        "GGUF architecture 'falcon' is not supported; swarmlm reads: llama, qwen2, qwen3, smollm3, gemma2, gemma3, phi3"
    )
