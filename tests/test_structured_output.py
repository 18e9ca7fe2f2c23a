"""response_format: answers constrained to a JSON schema while decoding (engine/grammar.py), through the
server's OpenAI API and the official client's `parse`; constrained and free requests share the engine."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from swarmlm.launch.servers import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Describe a character from a Shakespeare play as JSON."}]

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "home": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "castle": {"type": "boolean"}},
                "required": ["city", "castle"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "home"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "play": {"enum": ["Hamlet", "Macbeth", "King Lear", "Othello"]},
            "genre": {"type": "string", "enum": ["tragedy", "comedy", "history"]},
        },
        "required": ["play", "genre"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "friends": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 1, "maxItems": 3}
        },
        "required": ["friends"],
        "additionalProperties": False,
    },
    "bounded numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 1, "maximum": 99},
            "act": {"type": "integer", "minimum": 1, "maximum": 5},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
        },
        "required": ["age", "act", "score"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key="test-key", max_retries=0, timeout=120)


def json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name.replace(" ", "_"), "schema": schema, "strict": True}}


def test_every_answer_parses_and_validates_against_its_schema(client: OpenAI) -> None:
    def ask(job: tuple[str, int]) -> tuple[str, list[Any]]:
        name, seed = job
        out = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format=json_schema_format(name, SCHEMAS[name]),  # type: ignore[arg-type]
            temperature=0.9,
            seed=seed,
            n=2,
            max_tokens=200,
        )
        return name, [(c.message.content, c.finish_reason) for c in out.choices]

    jobs = [(name, seed) for name, seed in zip(SCHEMAS, range(1, 1 + len(SCHEMAS)), strict=True)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: constrained rows share the engine's steps
        answers = list(pool.map(ask, jobs))
    for name, choices in answers:
        for content, finish in choices:
            assert finish == "stop", (name, content)
            jsonschema.validate(json.loads(content), SCHEMAS[name])


def test_json_object_streamed_and_beside_free_requests(client: OpenAI) -> None:
    """A free request's text is the same whether constrained ones share its steps or not (greedy)."""

    def free() -> str:
        out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
        return out.choices[0].text

    def streamed_json() -> str:
        stream = client.chat.completions.create(
            model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=200, stream=True, seed=3
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    alone = free()
    with ThreadPoolExecutor(4) as pool:
        constrained = [pool.submit(streamed_json) for _ in range(2)]
        beside = pool.submit(free)
        texts = [f.result() for f in constrained]
    assert beside.result() == alone
    for text in texts:
        assert isinstance(json.loads(text), dict), text


class Character(BaseModel):
    name: str = Field(max_length=30)
    play: Literal["Hamlet", "Macbeth", "Othello"]
    lines: int = Field(ge=0, le=1000)


def test_the_official_clients_parse_gets_its_pydantic_model(client: OpenAI) -> None:
    out = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Character, max_tokens=200)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Character), out.choices[0].message.content


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        (json_schema_format("x", {"type": "integer", "minimum": 5, "maximum": 2}), "minimum (5) is greater"),
        (json_schema_format("x", {"type": "objekt"}), "objekt"),
        (json_schema_format("x", {"$ref": "#/definitions/none"}), "does not exist"),
    ],
)
def test_a_schema_that_cannot_be_decoded_to_is_a_400(server: ServerProcess, response_format: dict, words: str) -> None:
    body = {"model": MODEL, "messages": ASK, "response_format": response_format}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["param"] == "response_format"
