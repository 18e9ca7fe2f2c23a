"""Every supported family against transformers' own implementation: tiny random models built from
transformers' config classes (tests/model_families.py), in one process, and through a two-peer swarm whose
spans split each model in the middle, both from a client and over HTTP from a gateway on the second peer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.launch.peers import PeerProcess, free_port, start_peers, stop_all
from swarmlm.model.checkpoint import CheckpointError
from swarmlm.model.loading import load_model
from swarmlm.swarm.client import RemoteModel
from swarmlm.swarm.sequence_manager import ClientConfig
from tests.model_families import FAMILIES, write_family

SERVED = [f for f in FAMILIES if f != "llama3"]  # llama3 differs from llama in its rotary table only
# Split across two peers: the families whose layers differ by index (sliding windows per layer, layers
# without rotary, experts) or whose edges the client holds differ (embedding scale, logit soft-caps, fused
# projections). The others' layers are alike at every index, and their blocks are checked against
# transformers in this process; each peer process costs ~6 s of the suite's 2 cores.
SPLIT = ["mixtral", "smollm3", "gemma2", "gemma3", "phi3"]
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and the sea."}]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tokenizer = load_model(layers=(0, 0)).tokenizer.hf  # the embedded model's: nothing is downloaded
    root = tmp_path_factory.mktemp("families")
    return {family: write_family(family, root / family, tokenizer) for family in FAMILIES}


def reference(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def prompts(family: str, vocab: int) -> list[list[int]]:
    """Random prompts, longer than the tiny configs' sliding windows (12) but, for Phi-3, inside the
    original context (64) where LongRoPE's short factors apply (past it, see `Rotary`)."""
    lengths = (5, 20, 40, 60) if family == "phi3" else (5, 20, 40, 90)
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family: str, family_dirs: dict[str, Path]) -> None:
    ref, _ = reference(family_dirs[family])
    ours = load_model(str(family_dirs[family]), device="cpu")
    assert ours.config.model_type == ref.config.model_type
    for ids in prompts(family, ours.config.vocab_size):
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0]
            mine = ours.span(torch.tensor([ids]), torch.arange(len(ids)))[0]
        spread = (theirs.max() - theirs.min()).item()
        assert (mine - theirs).abs().max().item() <= 1e-4 * spread, (family, len(ids))


# Stated tolerance of the weight-only formats on these tiny random models (their logits are close to
# uniform, so top-1 agreement says little): mean cosine similarity of every position's logits to fp32.
QUANT_COSINE = {"int8": 0.995, "int4": 0.92}  # int4: groups of 32 are coarse at width 64


@pytest.mark.parametrize("quant", list(QUANT_COSINE))
@pytest.mark.parametrize("family", SERVED)
def test_quantized_within_tolerance(family: str, quant: str, family_dirs: dict[str, Path]) -> None:
    dense = load_model(str(family_dirs[family]), device="cpu")
    packed = load_model(str(family_dirs[family]), device="cpu", quant=quant)
    ids = prompts(family, dense.config.vocab_size)[2]
    with torch.no_grad():
        a = packed.span(torch.tensor([ids]), torch.arange(len(ids)))[0]
        b = dense.span(torch.tensor([ids]), torch.arange(len(ids)))[0]
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item() >= QUANT_COSINE[quant]


@pytest.mark.parametrize("family", SERVED)
def test_chat_template_comes_from_the_checkpoint(family: str, family_dirs: dict[str, Path]) -> None:
    _, tokenizer = reference(family_dirs[family])
    prompt = load_model(str(family_dirs[family]), layers=(0, 0)).tokenizer.chat_prompt(MESSAGES)
    assert f"(user) ({family})" not in prompt and f"user ({family})" in prompt
    assert prompt == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_unsupported_family_is_refused_with_the_list(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "gpt2-like"
    bad.mkdir()
    config = json.loads((family_dirs["llama"] / "config.json").read_text()) | {"model_type": "gpt2"}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((family_dirs["llama"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported; swarmlm runs: llama, mistral"):
        load_model(str(bad))


@pytest.fixture(scope="module")
def answers(family_dirs: dict[str, Path]) -> Iterator[dict[str, dict[str, str]]]:
    """Each served family's greedy answer to MESSAGES: from transformers' `generate`, from the engine alone
    (in this process), and (SPLIT) through a swarm where one peer holds layers 0:2 and another 2:4, from a
    `RemoteModel` and from the chat API of a gateway running beside the second peer (`--api`: the HTTP
    stack of `swarmlm serve`, without a process more per family)."""
    found: dict[str, dict[str, str]] = {f: {} for f in SERVED}
    for family in SERVED:
        ref, tokenizer = reference(family_dirs[family])
        ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
        out = ref.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        found[family]["transformers"] = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        model = load_model(str(family_dirs[family]), device="cpu")
        engine = Engine(model, make_scheduler("fcfs"), EngineConfig(kv_budget_bytes=64 << 20))
        prompt = model.tokenizer.encode(model.tokenizer.chat_prompt(MESSAGES))
        (seq,) = engine.add(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
        while engine.has_work:
            engine.step()
        found[family]["engine"] = seq.text
    spans = [(family, layers) for family in SPLIT for layers in ("0:2", "2:4")]
    apis = {family: f"127.0.0.1:{free_port()}" for family in SPLIT}

    def peer(rank: int, boot: str | None) -> PeerProcess:
        family, layers = spans[rank]
        # fp32 between the peers, as the client's: random tiny models have close logits that bf16 can flip
        api = ("--api", apis[family], "--wire-dtype", "fp32") if layers == "2:4" else ()
        args = ("--model", str(family_dirs[family]), "--layers", layers, "--rebalance-period", "0", *api)
        return PeerProcess(*args, initial=boot)

    peers = start_peers(len(spans), peer)
    try:
        config = ClientConfig(wire_dtype="fp32", step_timeout=30)
        for family in SPLIT:
            with RemoteModel(str(family_dirs[family]), [peers[0].maddr], config=config) as remote:
                prompt = remote.tokenizer.encode(remote.tokenizer.chat_prompt(MESSAGES))
                out = remote.generate(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
                found[family]["swarm"] = remote.tokenizer.decode(out)
            body = {"model": family, "messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0}
            reply = httpx.post(f"http://{apis[family]}/v1/chat/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            found[family]["gateway"] = reply.json()["choices"][0]["message"]["content"]
        yield found
    finally:
        stop_all(peers)


@pytest.mark.parametrize("family", SERVED)
def test_greedy_text_identical_alone_served_and_split(family: str, answers: dict[str, dict[str, str]]) -> None:
    got = answers[family]
    assert got["transformers"].strip(), f"{family}: the reference answered nothing; pick another prompt"
    assert got["engine"] == got["transformers"], family
    if family in SPLIT:
        assert got["swarm"] == got["transformers"], family
        assert got["gateway"] == got["transformers"], family
