"""The model runtime against transformers' own implementation of the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmlm.model.checkpoint import CheckpointError
from swarmlm.model.loading import LoadedModel, load_model, weights_digest

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explique la gravité en une phrase.",
    "日本の首都はどこですか？",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def reference(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return ref.eval(), tok


def chat_ids(model: LoadedModel, text: str) -> list[int]:
    return model.tokenizer.encode(model.tokenizer.chat_prompt([{"role": "user", "content": text}]))


def greedy(forward, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with a full forward per token (no KV cache, so nothing but the model is tested)."""
    x = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(forward(x)[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def ours(model: LoadedModel):
    return lambda x: model.span(x, torch.arange(x.shape[1]))


def test_tokenizer_matches_transformers(model: LoadedModel, reference) -> None:
    _, ref_tok = reference
    for text in [*PROMPTS, "  spaces  and\ttabs\n\nnewlines 12345 ümlaut", "<|im_start|>user\nhi<|im_end|>"]:
        assert model.tokenizer.encode(text) == ref_tok.encode(text, add_special_tokens=False), text
    ids = model.tokenizer.encode(PROMPTS[3])
    assert model.tokenizer.decode(ids) == PROMPTS[3]


def test_logits_match_transformers_fp32(model: LoadedModel, reference) -> None:
    ref, _ = reference
    for text in PROMPTS:
        ids = chat_ids(model, text)
        with torch.no_grad():
            ours = model.span(torch.tensor([ids]), torch.arange(len(ids)))
            theirs = ref(torch.tensor([ids])).logits
        assert (ours - theirs).abs().max().item() <= 1e-3, text


def test_greedy_tokens_match_transformers(model: LoadedModel, reference) -> None:
    ref, _ = reference
    for text in ["Write a short poem about the sea.", "Explain in detail how a bicycle works."]:
        ids = chat_ids(model, text)
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        assert len(theirs) == 32, "the reference stopped early: pick a prompt with a longer answer"
        assert greedy(ours(model), ids, 32) == theirs, text


def test_answer_is_sensible(model: LoadedModel) -> None:
    out = greedy(ours(model), chat_ids(model, PROMPTS[0]), 8)
    assert "Paris" in model.tokenizer.decode(out)


def test_spans_chain_to_the_whole_model(model: LoadedModel) -> None:
    first = load_model(layers=(0, 11), device="cpu")
    last = load_model(layers=(11, 30), device="cpu")
    assert first.span.lm_head is None and last.span.embed_tokens is None
    assert sum(p.numel() for p in first.span.parameters()) < sum(p.numel() for p in model.span.parameters())
    ids = torch.tensor([chat_ids(model, PROMPTS[1])])
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        chained = last.span(first.span(ids, pos), pos)
        whole = model.span(ids, pos)
    assert torch.equal(chained, whole)
    assert len({first.digest, last.digest, model.digest}) == 3
    assert weights_digest(first.span) == first.digest


def test_hf_directory_round_trip(model: LoadedModel, tmp_path: Path) -> None:
    """Export to an HF directory; both our loader and transformers read it back to the same model."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2-hf"
    model.save_hf(out)
    loaded = load_model(str(out), device="cpu")
    assert loaded.config == model.config
    assert loaded.digest == model.digest
    ids = chat_ids(model, PROMPTS[0])
    assert chat_ids(loaded, PROMPTS[0]) == ids
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        a = hf(torch.tensor([ids])).logits
        b = model.span(torch.tensor([ids]), torch.arange(len(ids)))
    assert (a - b).abs().max().item() <= 1e-3


def test_bf16_stays_close(model: LoadedModel) -> None:
    bf16 = load_model(dtype="bf16", device="cpu")
    assert next(bf16.span.parameters()).dtype == torch.bfloat16
    ids = chat_ids(model, PROMPTS[0])
    with torch.no_grad():
        a = bf16.span(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
        b = model.span(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
    assert a.argmax() == b.argmax()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_bad_checkpoints_give_clear_errors(gguf_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_path.read_bytes()[: 5 << 20])
    with pytest.raises(CheckpointError):
        load_model(str(truncated))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(CheckpointError):
        load_model(str(garbage))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError):
        load_model(str(tmp_path / "emptydir"))
    with pytest.raises(ValueError, match="outside"):
        load_model(layers=(20, 40))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_weights_stay_within_tolerance(model: LoadedModel, quant: str) -> None:
    """Stated tolerance for weight-only formats: >= 90 % top-1 agreement with fp32 over every position of
    several prompts, last-token logits with cosine similarity > 0.99, and the same short greedy answer."""
    q = load_model(device="cpu", quant=quant)
    assert q.digest == model.digest  # the checkpoint's weights; the served format is announced beside it
    agree, total = 0, 0
    for text in PROMPTS:
        ids = chat_ids(model, text)
        with torch.no_grad():
            a = q.span(torch.tensor([ids]), torch.arange(len(ids)))[0]
            b = model.span(torch.tensor([ids]), torch.arange(len(ids)))[0]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        assert torch.nn.functional.cosine_similarity(a[-1], b[-1], dim=0) > 0.99
    assert agree / total >= 0.9
    assert greedy(ours(q), chat_ids(q, PROMPTS[0]), 8) == greedy(ours(model), chat_ids(model, PROMPTS[0]), 8)
    with pytest.raises(ValueError, match="quantized"):
        q.save_hf(Path("/tmp/never-written"))
