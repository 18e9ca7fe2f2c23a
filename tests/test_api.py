"""The HTTP API through a real `swarmlm serve` process, with the official openai client."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from swarmlm.launch.servers import ServerProcess
from swarmlm.model.loading import LoadedModel
from tests.prompt_scoring import assert_scores_the_prompt

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key="test-key", max_retries=0, timeout=120)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base}/metrics").text
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_models_and_health(client: OpenAI, server: ServerProcess) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL, f"{MODEL}:tuned"]  # with its LoRA adapter
    assert httpx.get(f"{server.base}/health").json()["status"] == "ok"


def test_chat_streaming_equals_non_streaming(client: OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.prompt_tokens > 20 and full.usage.completion_tokens > 3
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream_n_seed_and_logprobs(client: OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="The three primary colours are", max_tokens=12, temperature=0.8, seed=42, n=2)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert sorted(c.index for c in first.choices) == [0, 1]
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in first.choices]
    lp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=3).choices[0]
    assert len(lp.logprobs.tokens) == 3 and all(len(t) == 3 for t in lp.logprobs.top_logprobs)
    assert all(x <= 0 for x in lp.logprobs.token_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert len(chat.choices[0].logprobs.content) == 3
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_echo_scores_the_prompt_as_lm_eval_asks(server: ServerProcess, model: LoadedModel) -> None:
    assert_scores_the_prompt(server.base, MODEL, model, tolerance=1e-4)


def test_tokenize_detokenize_and_tokenizer_info(server: ServerProcess, model: LoadedModel) -> None:
    """vLLM's tokenizer endpoints give the server's own tokens (what lm-eval's remote tokenizer uses)."""
    tok, base = model.tokenizer, server.base
    text = "To be, or not to be"
    r = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] >= 2048
    bare = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert bare == tok.encode(text, add_special_tokens=False)
    chat = httpx.post(f"{base}/tokenize", json={"messages": QUESTION}).json()["tokens"]
    assert chat == tok.encode(tok.chat_prompt(QUESTION))
    assert httpx.post(f"{base}/detokenize", json={"tokens": bare}).json() == {"prompt": text}
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == tok.hf.eos_token and "im_start" in info["chat_template"]
    for path, body, status in [
        ("/tokenize", {"model": MODEL}, 422),  # neither prompt nor messages
        ("/tokenize", {"prompt": text, "messages": QUESTION}, 422),
        ("/tokenize", {"model": "no-such-model", "prompt": text}, 404),
        ("/detokenize", {"tokens": [10**9]}, 400),
        ("/detokenize", {"tokens": "abc"}, 422),
    ]:
        r = httpx.post(f"{base}{path}", json=body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["message"]


def test_served_name_chat_template_and_chat_length(tiny_llama: Path, tmp_path: Path) -> None:
    """vLLM's --served-model-name and --chat-template, and a chat without max_tokens stopping at
    --chat-max-tokens rather than at the end of the context."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    args = ("--model", str(tiny_llama), "--served-model-name", "house-model", "--chat-template", str(template))
    server = ServerProcess(*args, "--chat-max-tokens", "5")
    try:
        server.wait_ready()
        client = OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["house-model"]
        messages = [{"role": "user", "content": "Hello there"}]
        tokens = httpx.post(f"{server.base}/tokenize", json={"messages": messages}).json()["tokens"]
        rendered = httpx.post(f"{server.base}/detokenize", json={"tokens": tokens}).json()["prompt"]
        assert rendered == "user: Hello there\nassistant:"
        chat = client.chat.completions.create(
            model="house-model", messages=messages, temperature=0, extra_body={"ignore_eos": True}
        )
        assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
        r = httpx.post(f"{server.base}/v1/chat/completions", json={"model": tiny_llama.name, "messages": messages})
        assert r.status_code == 404 and "house-model" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_stop_strings_through_the_api(client: OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20, stop=["Paris"])
    assert "Paris" not in out.choices[0].message.content and out.choices[0].finish_reason == "stop"


def test_error_paths(client: OpenAI, server: ServerProcess) -> None:
    url = f"{server.base}/v1/chat/completions"
    bad_json = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "json_invalid"
    cases = [
        ({"model": "no-such-model", "messages": QUESTION}, 404),
        ({"model": MODEL, "messages": "hello"}, 422),
        ({"model": MODEL, "messages": []}, 422),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, 422),
        ({"model": MODEL, "messages": QUESTION, "n": 1000}, 422),
        ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, 422),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 10**6}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400),
        ({"messages": QUESTION}, 422),
        ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "yaml"}}, 422),
        ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_schema"}}, 422),
        ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {}}}, 422),
        ({"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_object"}, "ignore_eos": True}, 400),
        ({"model": MODEL, "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ]
    for body, status in cases:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == status, (body if len(str(body)) < 300 else status, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": ""})
    assert r.status_code == 400
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": [10**8]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    assert httpx.get(f"{server.base}/v1/nothing-here").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x " * 9000, max_tokens=10)
    assert httpx.get(f"{server.base}/health").status_code == 200  # still serving


def test_openapi_describes_the_real_schema(server: ServerProcess) -> None:
    spec = httpx.get(f"{server.base}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    assert "429" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_cancels_streaming_and_plain_requests(server: ServerProcess) -> None:
    aborted = metric(server, "swarmlm:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    assert wait_for(lambda: metric(server, "swarmlm:request_success_total", finished_reason="abort") >= aborted + 1)
    assert wait_for(lambda: metric(server, "swarmlm:num_requests_running") == 0)
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/completions", json=body, timeout=2)
    assert wait_for(lambda: metric(server, "swarmlm:request_success_total", finished_reason="abort") >= aborted + 2)
    assert wait_for(lambda: metric(server, "swarmlm:kv_cache_usage_perc") < 0.05)


def test_metrics_report_latencies(client: OpenAI, server: ServerProcess) -> None:
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
    assert metric(server, "swarmlm:time_to_first_token_seconds_count") >= 1
    assert metric(server, "swarmlm:e2e_request_latency_seconds_count") >= 1
    assert metric(server, "swarmlm:inter_token_latency_seconds_count") >= 1
    assert metric(server, "swarmlm:generation_tokens_total") >= 4


def test_overload_answers_429_with_retry_after() -> None:
    srv = ServerProcess("--max-batch-seqs", "1", "--max-queued-requests", "2").wait_ready()
    try:
        statuses: list[int] = []
        headers: list[httpx.Headers] = []

        def fire() -> None:
            body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 40, "ignore_eos": True}
            r = httpx.post(f"{srv.base}/v1/completions", json=body, timeout=300)
            statuses.append(r.status_code)
            headers.append(r.headers)
            if r.status_code == 200:
                assert json.loads(r.text)["usage"]["completion_tokens"] == 40

        threads = [threading.Thread(target=fire) for _ in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses
        assert all(int(h["retry-after"]) >= 1 for s, h in zip(statuses, headers, strict=True) if s == 429)
        assert httpx.get(f"{srv.base}/health").status_code == 200
    finally:
        srv.stop()


def test_embeddings_are_the_normed_last_hidden_state(client: OpenAI, server: ServerProcess, model: LoadedModel) -> None:
    """The pooling /v1/embeddings states: the last token's hidden state after the final norm, L2-normalized
    (the official client asks for base64 and decodes it; plain floats alike)."""
    texts = ["To be, or not to be", "Once upon a time"]
    out = client.embeddings.create(model=MODEL, input=texts)
    for text, item in zip(texts, out.data, strict=True):
        ids = model.tokenizer.encode(text)
        with torch.no_grad():
            h = model.span(torch.tensor([ids]), torch.arange(len(ids)), normed_hidden=True)[0, -1]
        assert item.embedding == pytest.approx(torch.nn.functional.normalize(h, dim=0).tolist(), abs=1e-4)
    assert out.usage.prompt_tokens == sum(len(model.tokenizer.encode(t)) for t in texts)
    url = f"{server.base}/v1/embeddings"
    floats = httpx.post(url, json={"model": MODEL, "input": [1, 2, 3], "encoding_format": "float"}, timeout=60).json()
    assert len(floats["data"][0]["embedding"]) == model.config.hidden_size
    for body, status, words in [
        ({"model": MODEL, "input": ""}, 400, "1 to"),
        ({"model": MODEL, "input": []}, 400, "1 to"),
        ({"model": MODEL, "input": [10**8]}, 400, "vocabulary"),
        ({"model": MODEL, "input": "hi", "dimensions": 3}, 400, "dimensions"),
        ({"model": f"{MODEL}:tuned", "input": "hi"}, 400, "base model"),
        ({"model": "nope", "input": "hi"}, 404, "does not exist"),
        ({"model": MODEL, "input": "word " * 9000}, 400, "tokens"),
        ({"model": MODEL, "input": {"a": 1}}, 422, ""),
    ]:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text[:300])
