"""What lm-evaluation-harness asks of a completions endpoint to score text, checked against the model's own
logits in this process: shared by the server's and the gateway's API tests."""

from __future__ import annotations

import httpx
import pytest
import torch
from openai import OpenAI

from swarmlm.model.loading import LoadedModel

TEXT = "To be, or not to be, that is the question"


def assert_scores_the_prompt(base_url: str, model_id: str, model: LoadedModel, tolerance: float) -> None:
    """`echo` + `logprobs` + `max_tokens` 0: the prompt's tokens and each one's logprob under the model
    (the first: null), nothing generated; with `max_tokens` 2 the two generated tokens follow. Bad
    combinations are a 400 (422 for out-of-range values)."""
    client = OpenAI(base_url=f"{base_url}/v1", api_key="test-key", max_retries=0, timeout=120)
    tok = model.tokenizer
    ids = tok.encode(TEXT)
    with torch.no_grad():
        logits = model.span(torch.tensor([ids]), torch.arange(len(ids)))[0].log_softmax(-1)
    want = [float(logits[p - 1, ids[p]]) for p in range(1, len(ids))]
    out = client.completions.create(model=model_id, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=tolerance)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    two = client.completions.create(model=model_id, prompt=TEXT, max_tokens=2, echo=True, logprobs=2, temperature=0)
    lp2 = two.choices[0].logprobs
    assert len(lp2.tokens) == len(ids) + 2 and two.usage.completion_tokens == 2
    assert lp2.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=tolerance)
    assert two.choices[0].text.startswith(TEXT)
    url = f"{base_url}/v1/completions"
    cases = [
        ({"prompt": TEXT, "max_tokens": 0}, 400),  # nothing to answer without echo
        ({"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}, 400),
        ({"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 21}, 422),
        ({"prompt": TEXT, "max_tokens": -1, "echo": True}, 422),
    ]
    for body, status in cases:
        r = httpx.post(url, json={"model": model_id, **body}, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]
