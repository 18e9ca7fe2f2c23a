"""Tool calls in chat completions, in the format of Hermes-style chat templates (Qwen2.5, Hermes, and
the template tests/data/chatml_tools.jinja gives SmolLM2): the template lists the tools, and the model
answers a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

- `parse_answer`: a finished answer's text to its content and `tool_calls` (a call whose JSON does not
  parse stays text);
- `CallStream`: the same, a delta at a time, holding back text that may open a call;
- `call_grammar`: for tool_choice "required" or a named function, the Lark grammar (llguidance's
  dialect) of one call whose arguments follow the function's parameters schema: its arguments always
  parse.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from swarmlm.engine.grammar import JSON_STYLE
from swarmlm.serve.protocol import Tool, ToolCall, ToolCallFunction

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def call_grammar(tools: list[Tool]) -> str:
    """One call of one of `tools`, its arguments valid against that tool's parameters."""
    one_of = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"x-guidance": JSON_STYLE, "anyOf": one_of}
    return f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}'


def _tool_call(body: str) -> ToolCall | None:
    """A call's JSON to a ToolCall (its arguments as JSON text, as OpenAI gives them); None if malformed."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=ToolCallFunction(name=call["name"], arguments=json.dumps(arguments)),
    )


def parse_answer(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls): the text around well-formed calls (None if nothing else), and the calls."""
    calls, rest, last = [], [], 0
    for match in _CALL.finditer(text):
        call = _tool_call(match.group(1))
        if call is None:
            continue
        calls.append(call)
        rest.append(text[last : match.start()])
        last = match.end()
    rest.append(text[last:])
    content = "".join(rest).strip() if calls else text
    return content or None, calls


class CallStream:
    """One choice's deltas split into content and calls as they stream."""

    def __init__(self) -> None:
        self.pending = ""  # text not sent yet: a possible start of a call, or a call not closed yet
        self.calls = 0

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        """The content to send now, and the calls completed by `text` (`final`: the answer ended)."""
        self.pending += text
        content, calls = "", []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial_open(self.pending)
                content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                break
            end = self.pending.find(CLOSE, start)
            if end < 0:
                content += self.pending[:start]
                self.pending = self.pending[start:]
                if final:  # an unclosed call: it was text after all
                    content, self.pending = content + self.pending, ""
                break
            call = _tool_call(self.pending[start + len(OPEN) : end].strip())
            if call is None:
                content += self.pending[: end + len(CLOSE)]
            else:
                content += self.pending[:start]
                calls.append(call)
            self.pending = self.pending[end + len(CLOSE) :]
        self.calls += len(calls)
        return content, calls


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` may begin OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages as chat templates take them: a call's arguments as an object (transformers'
    convention), a tool's answer with its call id."""
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _object(c)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


def _object(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments
