"""LoRA adapters served next to their base model: `--adapters NAME=PATH`, requests for MODEL:NAME."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from openai import NotFoundError, OpenAI
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from swarmlm.launch.servers import ServerProcess
from swarmlm.model.loading import LoadedModel
from swarmlm.model.lora import random_adapter, save_adapter
from tests.test_cli_errors import USAGE, assert_error, swarmlm

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key="test-key", max_retries=0, timeout=120)


def peft_greedy(model: LoadedModel, adapter: Path | None, prompt: list[int], max_tokens: int) -> str:
    """Greedy text from the base model, or from peft's LoRA over it, one whole forward pass per token."""
    span = copy.deepcopy(model.span)
    net = PeftModel.from_pretrained(span, str(adapter)) if adapter is not None else span
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(net(torch.tensor([ids]), torch.arange(len(ids)))[0, -1].argmax())
            if token in model.tokenizer.eos_token_ids:
                break
            ids.append(token)
    return model.tokenizer.decode(ids[len(prompt) :])


def test_models_lists_each_adapter_under_its_base(client: OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [MODEL, f"{MODEL}:tuned"]
    assert cards[f"{MODEL}:tuned"].model_extra["parent"] == MODEL


def test_requests_for_the_adapter_and_the_base_share_steps_and_each_get_their_own_text(
    client: OpenAI, model: LoadedModel, lora_adapter: Path
) -> None:
    def complete(job: tuple[str, str]) -> str:
        name, prompt = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    jobs = [(name, prompt) for prompt in PROMPTS for name in (MODEL, f"{MODEL}:tuned")]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: the engine batches them together
        outputs = list(pool.map(complete, jobs))
    for (name, prompt), output in zip(jobs, outputs, strict=True):
        adapter = lora_adapter if name.endswith(":tuned") else None
        assert output == peft_greedy(model, adapter, model.tokenizer.encode(prompt), 10), (name, prompt)
    assert outputs[0::2] != outputs[1::2]  # the adapter changes the text


def test_an_adapter_that_is_not_served_is_404(client: OpenAI) -> None:
    with pytest.raises(NotFoundError, match="does not exist; this server serves"):
        client.completions.create(model=f"{MODEL}:nope", prompt="Hi", max_tokens=2)
    with pytest.raises(NotFoundError):
        client.completions.create(model="other:tuned", prompt="Hi", max_tokens=2)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("tuned", "give NAME=PATH"),
        ("a:b=/tmp", "give NAME=PATH"),
        ("t=/no/such/folder", "is not a readable peft adapter"),
    ],
)
def test_a_malformed_or_missing_adapter_is_refused(spec: str, words: str) -> None:
    assert_error(swarmlm("serve", "--adapters", spec), USAGE, words)


def test_an_adapter_for_another_base_or_rank_is_refused(model: LoadedModel, tmp_path: Path) -> None:
    adapters = random_adapter(model.config, rank=4, seed=0)
    name = "layers.0.self_attn.o_proj.lora_A"
    save_adapter(tmp_path / "other-base", {**adapters, name: torch.zeros(4, 100)}, 8.0, "another-model")
    save_adapter(tmp_path / "other-rank", adapters, 8.0, MODEL)
    config = json.loads((tmp_path / "other-rank" / "adapter_config.json").read_text())
    (tmp_path / "other-rank" / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    done = swarmlm("serve", "--adapters", f"a={tmp_path / 'other-base'}")
    assert_error(done, USAGE, "has shape (4, 100); layer 0 needs [rank, 576]")
    assert_error(swarmlm("serve", "--adapters", f"a={tmp_path / 'other-rank'}"), USAGE, "rank r=8 its config says")


def test_an_adapter_peft_trained_on_the_transformers_model_is_served_fused(tiny_llama: Path, tmp_path: Path) -> None:
    """peft over transformers' model adapts q_proj, v_proj, up_proj ... apart; the server fuses them into
    its qkv / gate_up matrices (k_proj and gate_proj left alone: zero rows) and scores a prompt as peft does."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    tuned = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    tuned.save_pretrained(tmp_path / "hf-adapter")
    ids = [504, 3575, 282, 4649, 314, 1789, 28, 690, 253, 2356]
    with torch.no_grad():
        logits = tuned(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [float(logits[p - 1, ids[p]]) for p in range(1, len(ids))]

    server = ServerProcess("--model", str(tiny_llama), "--adapters", f"hf={tmp_path / 'hf-adapter'}").wait_ready()
    try:
        client = OpenAI(base_url=f"{server.base}/v1", api_key="test-key", max_retries=0, timeout=60)
        base = client.models.list().data[0].id

        def scores(model: str) -> list[float]:
            out = client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=0)
            return out.choices[0].logprobs.token_logprobs[1:]

        assert scores(f"{base}:hf") == pytest.approx(want, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(scores(base), want, strict=True)) > 0.01  # the adapter counts
    finally:
        server.stop()

    config = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())
    (tmp_path / "hf-adapter" / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {"q_proj": 8}}))
    done = swarmlm("serve", "--model", str(tiny_llama), "--adapters", f"a={tmp_path / 'hf-adapter'}")
    assert_error(done, USAGE, "per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported")
