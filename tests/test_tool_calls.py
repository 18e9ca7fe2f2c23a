"""Tool calling: tools rendered by the chat template (tests/data/chatml_tools.jinja gives SmolLM2 a
Hermes-style one), calls parsed into `tool_calls`, required and named calls decoded under a grammar, driven
by the official `openai` client's tool loop and by the OpenAI Agents SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from swarmlm.launch.servers import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
TEMPLATE = Path(__file__).parent / "data" / "chatml_tools.jinja"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--chat-template", str(TEMPLATE))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(tool_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{tool_server.base}/v1", api_key="test-key", max_retries=0, timeout=120)


def test_the_openai_clients_tool_loop(client: OpenAI) -> None:
    """A required call whose arguments follow its schema, its result sent back as a tool message, and the
    model's next turn."""
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    messages: list[Any] = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were rendered


def test_a_named_function_streamed_as_deltas(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        stream=True,
    )
    calls, finish = [], None
    for chunk in stream:
        if chunk.choices:
            calls += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [c.function.name for c in calls] == ["get_time"]
    assert calls[0].index == 0 and calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME)


def test_tool_choice_none_and_auto(client: OpenAI) -> None:
    """ "none": the tools are not rendered (the same prompt as without); "auto": they are, and whatever the
    model answers comes back as text or as calls that parse."""
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    none = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens
    message = auto.choices[0].message
    assert message.content or message.tool_calls
    for call in message.tool_calls or []:
        json.loads(call.function.arguments)


def test_the_openai_agents_sdk_calls_our_tool(tool_server: ServerProcess) -> None:
    """An agent framework users run, pointed at swarmlm: the SDK parses our tool call, runs the function,
    and (stop_on_first_tool) returns its result."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"Sunny in {city}"

    client = AsyncOpenAI(base_url=f"{tool_server.base}/v1", api_key="test-key", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather.",
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", max_tokens=60),
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?"))
    assert len(asked) == 1 and result.final_output == f"Sunny in {asked[0]}"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            400,
            "not among the tools",
        ),
        ({"tool_choice": "required"}, 400, "needs tools"),
        ({"tools": [{"type": "retrieval"}]}, 422, ""),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 422, ""),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            400,
            "cannot go with a required",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "integer", "minimum": 3, "maximum": 1}},
                    }
                ],
                "tool_choice": "required",
            },
            400,
            "parameters",
        ),
    ],
)
def test_bad_tool_requests_are_refused(tool_server: ServerProcess, body: dict, status: int, words: str) -> None:
    r = httpx.post(
        f"{tool_server.base}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body}, timeout=60
    )
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_a_template_without_tools_and_completions_refuse_them(server: ServerProcess) -> None:
    """The embedded model's own template ignores tools: a 400 saying so, not an answer that drops them."""
    r = httpx.post(f"{server.base}/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS})
    assert r.status_code == 400 and "no tool support" in r.json()["error"]["message"]
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": "Hi", "tools": TOOLS})
    assert r.status_code == 400 and "chat/completions" in r.json()["error"]["message"]
