"""One assembly of a generating request's answer, shared by /v1/completions and /v1/chat/completions:
the n choices of each prompt merged into SSE chunks or into one JSON body. What differs between the two
endpoints (text vs message/delta, their logprobs shapes) is a `ChoiceFormat`."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from swarmlm.engine.async_engine import AsyncEngine, RequestHandle
from swarmlm.engine.sequence import Sequence, StepOutput
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.serve.protocol import ChatCompletionResponse, CompletionResponse, ToolCall, Usage
from swarmlm.serve.streaming import merged, sse_response, unless_disconnected
from swarmlm.serve.tool_calls import CallStream, parse_answer


class ChoiceFormat(ABC):
    """How one endpoint writes a choice: in stream chunks and in the final body."""

    chunk_object: ClassVar[str]
    response: ClassVar[type[BaseModel]]

    def __init__(self, tokenizer: Tokenizer, logprobs: bool) -> None:
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def opening(self, prompt: int) -> dict[str, Any] | None:
        """Fields of a choice's first chunk, sent before any token; None: no such chunk."""
        return None

    @abstractmethod
    def delta(self, out: StepOutput) -> dict[str, Any]:
        """Fields of a stream chunk carrying `out`'s text."""

    def finish(self, seq: Sequence) -> str | None:
        """The finish reason a choice reports (None while it runs)."""
        return seq.finish_reason.value if seq.finish_reason else None

    @abstractmethod
    def token_logprobs(self, out: StepOutput) -> dict[str, Any] | None:
        """One token's logprobs in this endpoint's shape (None without them)."""

    @abstractmethod
    def choice(self, prompt: int, seq: Sequence, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        """Fields of a finished choice in the body, given its tokens' `token_logprobs`."""

    def generated(self, seq: Sequence) -> int:
        """The tokens of `seq` its answer reports (usage's completion tokens)."""
        return len(seq.output_ids)


class TextChoices(ChoiceFormat):
    chunk_object = "text_completion"
    response = CompletionResponse

    def __init__(self, tokenizer: Tokenizer, logprobs: bool, echo: list[str] | None, with_output: bool = True) -> None:
        """`with_output` False (max_tokens 0): the answer is the echoed prompt alone, its one sampled token
        left out."""
        super().__init__(tokenizer, logprobs)
        self.echo = echo  # with `echo`: each prompt's text, which its choices start with
        self.with_output = with_output

    def opening(self, prompt: int) -> dict[str, Any] | None:
        return {"text": self.echo[prompt]} if self.echo is not None else None

    def delta(self, out: StepOutput) -> dict[str, Any]:
        return {"text": out.text_delta}

    def token_logprobs(self, out: StepOutput) -> dict[str, Any] | None:
        if out.logprob is None:
            return None
        decode = self.tokenizer.decode
        return {
            "tokens": [decode([out.logprob.token_id])],
            "token_logprobs": [out.logprob.logprob],
            "top_logprobs": [{decode([t]): lp for t, lp in out.logprob.top}],
            "text_offset": [out.seq.emitted - len(out.text_delta)],
        }

    def choice(self, prompt: int, seq: Sequence, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        prefix = self.echo[prompt] if self.echo is not None else ""
        if not self.with_output:  # max_tokens 0
            text, ending = prefix, {"finish_reason": "length"}
        else:
            text, ending = prefix + seq.text, {}
        if not self.logprobs:
            return {"text": text, "logprobs": None, **ending}
        parts = ([self._prompt_logprobs(seq)] if self.echo is not None else []) + (logprobs if self.with_output else [])
        merged_lps = {k: [x for lp in parts for x in lp[k]] for k in ("tokens", "token_logprobs", "top_logprobs")}
        merged_lps["text_offset"] = _offsets(merged_lps["tokens"], 0)
        return {"text": text, "logprobs": merged_lps, **ending}

    def _prompt_logprobs(self, seq: Sequence) -> dict[str, Any]:
        """The echoed prompt's tokens with their logprobs, the first one's null (as OpenAI and vLLM)."""
        decode = self.tokenizer.decode
        scored = seq.prompt_logprobs or [None] * len(seq.prompt_ids)
        return {
            "tokens": [decode([t]) for t in seq.prompt_ids],
            "token_logprobs": [lp.logprob if lp is not None else None for lp in scored],
            "top_logprobs": [{decode([t]): v for t, v in lp.top} if lp is not None else None for lp in scored],
        }

    def generated(self, seq: Sequence) -> int:
        return len(seq.output_ids) if self.with_output else 0


class ChatChoices(ChoiceFormat):
    chunk_object = "chat.completion.chunk"
    response = ChatCompletionResponse

    def opening(self, prompt: int) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}}

    def delta(self, out: StepOutput) -> dict[str, Any]:
        return {"delta": {"content": out.text_delta} if out.text_delta else {}}

    def token_logprobs(self, out: StepOutput) -> dict[str, Any] | None:
        if out.logprob is None:
            return None

        def entry(token_id: int, lp: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        lp = out.logprob
        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}]}

    def choice(self, prompt: int, seq: Sequence, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        content = [x for lp in logprobs for x in lp["content"]]
        return {"message": {"content": seq.text}, "logprobs": {"content": content} if self.logprobs else None}


class ToolChatChoices(ChatChoices):
    """Chat choices of a request that offered tools: calls in the answer become `tool_calls`
    (serve/tool_calls.py), in the body and as stream deltas, and the finish reason `tool_calls`."""

    def __init__(self, tokenizer: Tokenizer, logprobs: bool) -> None:
        super().__init__(tokenizer, logprobs)
        self.streams: dict[Sequence, CallStream] = {}
        self.parsed: dict[Sequence, tuple[str | None, list[ToolCall]]] = {}  # finished, unstreamed answers

    def _parse(self, seq: Sequence) -> tuple[str | None, list[ToolCall]]:
        if seq not in self.parsed:
            self.parsed[seq] = parse_answer(seq.text)
        return self.parsed[seq]

    def delta(self, out: StepOutput) -> dict[str, Any]:
        stream = self.streams.setdefault(out.seq, CallStream())
        content, calls = stream.feed(out.text_delta, out.seq.finished)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            first = stream.calls - len(calls)
            delta["tool_calls"] = [{"index": first + k, **c.model_dump()} for k, c in enumerate(calls)]
        return {"delta": delta}

    def finish(self, seq: Sequence) -> str | None:
        reason = super().finish(seq)
        stream = self.streams.get(seq)
        called = stream.calls if stream is not None else len(self._parse(seq)[1])
        return "tool_calls" if reason == "stop" and called else reason

    def choice(self, prompt: int, seq: Sequence, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        content, calls = self._parse(seq)
        message = {"content": content, "tool_calls": [c.model_dump() for c in calls] or None}
        return {**super().choice(prompt, seq, logprobs), "message": message}


class Answer:
    """The answer to one submitted request: `n` choices for each prompt, choice `i * n + j` being prompt
    i's j-th. Whichever way it ends, the engine requests are aborted so their KV is freed at once."""

    def __init__(
        self,
        engine: AsyncEngine,
        handles: list[RequestHandle],
        prompts: list[list[int]],
        n: int,
        fmt: ChoiceFormat,
        answer_id: str,
        model_id: str,
    ) -> None:
        self.engine, self.handles, self.prompts, self.n, self.fmt = engine, handles, prompts, n, fmt
        self.answer_id, self.model_id, self.created = answer_id, model_id, int(time.time())

    def streaming(self, include_usage: bool) -> StreamingResponse:
        return sse_response(self._chunks(include_usage), self._release)

    async def body(self, request: Request) -> BaseModel:
        """The whole answer once every choice finished (cancelled if the client leaves: ClientGone)."""
        pieces: dict[int, list[dict[str, Any]]] = {}

        async def collect() -> None:
            async for i, out in merged(self.handles):
                if (lp := self.fmt.token_logprobs(out)) is not None:
                    pieces.setdefault(i * self.n + out.seq.index, []).append(lp)

        try:
            await unless_disconnected(request, collect())
        finally:
            self._release()
        choices = [
            {
                "index": i * self.n + seq.index,
                "finish_reason": self.fmt.finish(seq),
                **self.fmt.choice(i, seq, pieces.get(i * self.n + seq.index, [])),
            }
            for i, h in enumerate(self.handles)
            for seq in h.seqs
        ]
        total = sum(self.fmt.generated(s) for h in self.handles for s in h.seqs)
        return self.fmt.response(
            id=self.answer_id,
            created=self.created,
            model=self.model_id,
            choices=sorted(choices, key=lambda c: c["index"]),
            usage=self._usage(total),
        )

    async def _chunks(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        openings = [
            {"index": i * self.n + j, **fields, "logprobs": None, "finish_reason": None}
            for i in range(len(self.prompts))
            if (fields := self.fmt.opening(i)) is not None
            for j in range(self.n)
        ]
        if openings:
            yield self._chunk(openings)
        produced = 0
        async for i, out in merged(self.handles):
            produced += out.token_id is not None
            seq = out.seq
            delta = self.fmt.delta(out)  # first: a tool call it completes decides the finish reason
            finish = self.fmt.finish(seq)
            if out.text_delta or finish or out.logprob is not None:
                choice = {
                    "index": i * self.n + seq.index,
                    **delta,
                    "logprobs": self.fmt.token_logprobs(out),
                    "finish_reason": finish,
                }
                yield self._chunk([choice])
        if include_usage:
            yield {**self._chunk([]), "usage": self._usage(produced).model_dump()}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.answer_id,
            "object": self.fmt.chunk_object,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }

    def _usage(self, completion_tokens: int) -> Usage:
        prompt_tokens = sum(len(p) for p in self.prompts)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    def _release(self) -> None:
        for h in self.handles:
            self.engine.abort(h.request_id)


def _offsets(tokens: list[str], start: int) -> list[int]:
    offsets, pos = [], start
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return offsets
