"""`OpenAIServing`: what the OpenAI API of one peer serves with (its engine, tokenizer, model id, limits,
keys and metrics), turning validated requests into answers. The routers only hand requests to it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import time
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from swarmlm.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestHandle
from swarmlm.engine.grammar import Grammar, GrammarError, Grammars
from swarmlm.engine.sampling import SamplingParams
from swarmlm.serve.answers import Answer, ChatChoices, ChoiceFormat, TextChoices, ToolChatChoices
from swarmlm.serve.auth import ApiKey, KeyChecker
from swarmlm.serve.errors import APIError, error_response
from swarmlm.serve.metrics import ServingMetrics
from swarmlm.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    NamedToolChoice,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    Tool,
)
from swarmlm.serve.tool_calls import call_grammar, template_messages

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit


class OpenAIServing:
    """With `keys`, every /v1 call needs a known bearer key within its rate limit (and, with
    `protect_metrics`, so do /metrics and /dashboard); /health stays open for load balancers."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_id: str,
        metrics: ServingMetrics,
        keys: KeyChecker | None = None,
        protect_metrics: bool = False,
        chat_max_tokens: int = 1024,
    ) -> None:
        """`chat_max_tokens`: what a chat completion that names no max_tokens generates at most."""
        self.engine, self.model_id, self.metrics = engine, model_id, metrics
        self.keys, self.protect_metrics, self.chat_max_tokens = keys, protect_metrics, chat_max_tokens
        self.tokenizer = engine.engine.tokenizer
        self.grammars = Grammars(self.tokenizer, engine.engine.model.config.vocab_size)
        self.max_model_len = engine.engine.max_model_len
        self.created = int(time.time())

    # ----- open and operator endpoints -------------------------------------------------------------
    def health(self) -> JSONResponse:
        if self.engine.error is not None:
            return error_response(503, f"engine failed: {self.engine.error!r}", "server_error")
        return JSONResponse({"status": "ok", "model": self.model_id})

    def prometheus(self) -> Response:
        self.metrics.waiting.set(self.engine.num_queued)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def models(self) -> ModelList:
        """The base model, and each LoRA adapter as MODEL:ADAPTER with the base as its parent (vLLM's way)."""
        base = ModelCard(id=self.model_id, created=self.created, max_model_len=self.max_model_len)
        adapters = [
            ModelCard(
                id=f"{self.model_id}:{name}",
                created=self.created,
                max_model_len=self.max_model_len,
                parent=self.model_id,
            )
            for name in self.engine.engine.executor.adapter_names()
        ]
        return ModelList(data=[base, *adapters])

    # ----- generation -------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request) -> Any:
        adapter = self._check_model(req.model, request)
        if req.tools:
            raise APIError(400, "tools are for /v1/chat/completions", param="tools")
        if isinstance(req.prompt, str):
            prompts = [await self._encode(req.prompt)]
        elif req.prompt and isinstance(req.prompt[0], int):
            prompts = [list(req.prompt)]  # type: ignore[arg-type]
        elif req.prompt and isinstance(req.prompt[0], str):
            prompts = [await self._encode(p) for p in req.prompt]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in req.prompt]  # type: ignore[union-attr]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(
                400, "max_tokens must be at least 1 (0 only with echo: the prompt alone)", param="max_tokens"
            )
        if req.stream and (req.scores_prompt or req.max_tokens == 0):
            raise APIError(400, "echo with logprobs or max_tokens 0 scores the prompt: not streamed", param="stream")
        # max_tokens 0: one token is generated (a step samples as it ends the prompt) and left out of the answer
        params = req.sampling(
            1 if req.max_tokens == 0 else req.max_tokens or 16, req.logprobs, await self._grammar(req)
        )
        if req.scores_prompt:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        handles = self._submit(prompts, params, req.n, _user_of(request, req.user), adapter)
        echo = [self.tokenizer.decode(p) for p in prompts] if req.echo else None
        fmt = TextChoices(self.tokenizer, req.logprobs is not None, echo, with_output=req.max_tokens != 0)
        return await self._answer(request, req, handles, prompts, fmt, handles[0].request_id)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Any:
        adapter = self._check_model(req.model, request)
        tools = req.offered_tools()
        prompt = await self._encode(self._render_chat(req.messages, tools))
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise APIError(
                400,
                f"the messages take {len(prompt)} tokens; the context holds {self.max_model_len}",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or min(self.chat_max_tokens, room)
        grammar = await self._tool_grammar(req) or await self._grammar(req)
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None, grammar)
        handles = self._submit([prompt], params, req.n, _user_of(request, req.user), adapter)
        fmt = (ToolChatChoices if tools else ChatChoices)(self.tokenizer, bool(req.logprobs))
        return await self._answer(request, req, handles, [prompt], fmt, "chat" + handles[0].request_id)

    async def _answer(
        self,
        request: Request,
        req: CompletionRequest | ChatCompletionRequest,
        handles: list[RequestHandle],
        prompts: list[list[int]],
        fmt: ChoiceFormat,
        answer_id: str,
    ) -> Any:
        answer = Answer(self.engine, handles, prompts, req.n, fmt, answer_id, self.model_id)
        if req.stream:
            return answer.streaming(bool(req.stream_options and req.stream_options.include_usage))
        return await answer.body(request)

    async def _tool_grammar(self, req: ChatCompletionRequest) -> Grammar | None:
        """For tool_choice "required" or a named function: the grammar of one call (of that function), its
        arguments following the function's parameters."""
        choice, tools = req.tool_choice, req.tools or []
        if choice in (None, "none", "auto"):
            return None
        if not tools:
            wanted = choice if isinstance(choice, str) else f"naming {choice.function.name!r}"
            raise APIError(400, f"tool_choice {wanted} needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == choice.function.name]
            if not tools:
                raise APIError(
                    400,
                    f"tool_choice names {choice.function.name!r}, which is not among the tools",
                    param="tool_choice",
                )
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, "response_format cannot go with a required or named tool call", param="response_format")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.grammars.lark, call_grammar(tools))
        except GrammarError as e:
            raise APIError(400, f"tools: a function's parameters: {e}", param="tools") from None

    async def _grammar(self, req: CompletionRequest | ChatCompletionRequest) -> Grammar | None:
        """The grammar `response_format` asks the answer to follow, compiled (None: free text); 400 for a
        schema that cannot be decoded to."""
        schema = req.response_format.output_schema() if req.response_format is not None else None
        if schema is None:
            return None
        if req.ignore_eos:
            raise APIError(
                400, "ignore_eos cannot go with response_format: a complete answer ends there", param="ignore_eos"
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.grammars.json_schema, schema)
        except GrammarError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from None

    def _check_model(self, name: str, request: Request) -> str | None:
        """The LoRA adapter the request's model names (MODEL:ADAPTER), None for the base model; 404 for
        any other model, 403 for one the caller's key may not use."""
        key: ApiKey | None = getattr(request.state, "api_key", None)
        if key is not None and not key.allows(name):
            raise APIError(
                403, f"key {key.name!r} may not use model {name!r}", "permission_error", "model", "model_not_allowed"
            )
        if name == self.model_id:
            return None
        base, _, adapter = name.rpartition(":")
        served = [card.id for card in self.models().data]
        if base != self.model_id or adapter not in self.engine.engine.executor.adapter_names():
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {', '.join(map(repr, served))}",
                "not_found_error",
                "model",
                "model_not_found",
            )
        return adapter

    def _submit(
        self, prompts: list[list[int]], params: SamplingParams, n: int, user: str, adapter: str | None
    ) -> list[RequestHandle]:
        """One engine request per prompt, all or none: a refusal aborts those already queued."""
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                handles.append(self.engine.submit(ids, params, n, user, adapter))
        except (ValueError, QueueFullError, EngineDeadError) as e:
            for h in handles:
                self.engine.abort(h.request_id)
            if isinstance(e, QueueFullError):
                self.metrics.rejected.inc()
            if isinstance(e, QueueFullError | EngineDeadError):
                raise  # 429 with Retry-After, 503: serve/errors.py
            raise APIError(400, str(e), "invalid_request_error", code="invalid_prompt") from e  # context, KV, vocab
        return handles

    def _render_chat(self, messages: list[ChatMessage], tools: list[Tool] | None = None) -> str:
        """The prompt of a chat; with `tools`, 400 unless the chat template lists them (it has tool support)."""
        if not self.tokenizer.has_chat_template:
            raise APIError(400, f"model {self.model_id!r} has no chat template; use /v1/completions")
        if tools and not self._template_lists_tools:
            raise APIError(
                400,
                f"the chat template of model {self.model_id!r} has no tool support (it ignores tools); serve it "
                "with a --chat-template that lists them",
                param="tools",
            )
        try:
            return self.tokenizer.chat_prompt(
                template_messages(messages), [t.model_dump(exclude_none=True) for t in tools or []] or None
            )
        except Exception as e:  # jinja templates raise for unsupported role orders
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from e

    @functools.cached_property
    def _template_lists_tools(self) -> bool:
        """Whether the chat template renders tools at all (a server's template never changes)."""
        probe = [{"role": "user", "content": "?"}]
        tool = {"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}
        try:
            return self.tokenizer.chat_prompt(probe, [tool]) != self.tokenizer.chat_prompt(probe)
        except Exception:  # a template that fails on tools has no support for them either
            return False

    # ----- embeddings ----------------------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
        """Each input's embedding (`Engine.embed`: the last token's final hidden state, L2-normalized),
        computed on the engine thread one input at a time, between generation steps."""
        self._check_model(req.model, request)
        if req.model != self.model_id:
            raise APIError(400, "embeddings come from the base model, not an adapter", param="model")
        hidden = self.engine.engine.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"this model's embeddings have {hidden} dimensions", param="dimensions")
        inputs = req.inputs()
        if not inputs or len(inputs) > MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"input must hold 1 to {MAX_EMBEDDING_INPUTS} items", param="input")
        prompts = [await self._encode(i) if isinstance(i, str) else i for i in inputs]
        data = []
        for index, ids in enumerate(prompts):
            try:
                vector = await self.engine.call(lambda engine, ids=ids: engine.embed(ids))
            except ValueError as e:
                raise APIError(400, f"input {index}: {e}", param="input") from None
            data.append(Embedding(index=index, embedding=_encoded(vector, req.encoding_format)))
        tokens = sum(len(p) for p in prompts)
        return EmbeddingResponse(
            data=data, model=self.model_id, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        )

    # ----- tokenization (vLLM's endpoints) ------------------------------------------------------------
    async def tokenize(self, req: TokenizeRequest, request: Request) -> TokenizeResponse:
        if req.model is not None:
            self._check_model(req.model, request)
        if req.messages is not None:  # the tokens a chat completion of these messages would start from
            text, special = self._render_chat(req.messages), True
        else:
            text, special = req.prompt or "", req.add_special_tokens
        tokens = await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.encode, text, special)
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens)

    def detokenize(self, req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        if req.model is not None:
            self._check_model(req.model, request)
        vocab = len(self.tokenizer.hf)
        if bad := [t for t in req.tokens if not 0 <= t < vocab]:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        hf = self.tokenizer.hf
        return TokenizerInfo(
            tokenizer_class=type(hf).__name__,
            eos_token=hf.eos_token,
            bos_token=hf.bos_token,
            pad_token=hf.pad_token,
            chat_template=hf.chat_template if isinstance(hf.chat_template, str) else None,
            model_max_length=self.max_model_len,
        )

    async def _encode(self, text: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.encode, text)


def _encoded(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def _user_of(request: Request, body_user: str | None) -> str:
    """Whose request, for per-user fairness: the API key's name, else a hash of any bearer token."""
    if (key := getattr(request.state, "api_key", None)) is not None:
        return "key:" + key.name
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and len(auth) > 7:
        return "key:" + hashlib.sha256(auth[7:].encode()).hexdigest()[:16]
    return body_user or "anonymous"


def serving_of(request: Request) -> OpenAIServing:
    """The serving object of the app that received `request` (set by `create_app`)."""
    serving: OpenAIServing = request.app.state.serving
    return serving
