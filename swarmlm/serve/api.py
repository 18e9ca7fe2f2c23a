"""The OpenAI-compatible HTTP API of one peer: /v1/models, /v1/completions, /v1/chat/completions (SSE
streaming included), /health and /metrics. Every bad input gets an OpenAI-style error JSON."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarmlm.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestFailedError, RequestHandle
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.sequence import StepOutput
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.serve.auth import AuthError, KeyChecker
from swarmlm.serve.metrics import ServingMetrics
from swarmlm.serve.protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)

DISCONNECT_POLL_SECONDS = 0.25


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 429, 503)
}


class ClientGone(Exception):
    pass


_AUTH_KINDS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def create_app(
    engine: AsyncEngine,
    model_id: str,
    metrics: ServingMetrics,
    keys: KeyChecker | None = None,
    protect_metrics: bool = False,
) -> FastAPI:
    """The API app. With `keys`, every /v1 call needs a known bearer key within its rate limit (and, with
    `protect_metrics`, so do /metrics and /dashboard); /health stays open for load balancers."""
    tokenizer: Tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.attach(asyncio.get_running_loop())  # the engine loop itself runs in the server's main thread
        yield
        engine.stop()

    app = FastAPI(
        title="swarmlm", version="0.1.0", lifespan=lifespan, description="OpenAI-compatible API of a swarmlm peer"
    )

    # ----- errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(
                400,
                f"malformed JSON body: {first.get('ctx', {}).get('error', '')}".strip(),
                "invalid_request_error",
                code="json_invalid",
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(
            422,
            f"{where}: {first.get('msg', 'invalid value')}",
            "invalid_request_error",
            where or None,
            code=first.get("type"),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(
            e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error"
        )

    if keys is not None:

        @app.middleware("http")
        async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            path = request.url.path
            metered = path.startswith("/v1")
            if metered or (protect_metrics and (path == "/metrics" or path.startswith("/dashboard"))):
                try:
                    request.state.api_key = keys.authenticate(request.headers.get("authorization"))
                    if metered:
                        keys.charge(request.state.api_key)
                except AuthError as e:
                    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
                    if e.retry_after is not None:
                        headers["Retry-After"] = str(math.ceil(e.retry_after))
                    return _error(e.status, e.message, _AUTH_KINDS[e.status], code=e.code, headers=headers)
            return await call_next(request)

    # ----- plumbing -------------------------------------------------------------------------------
    def check_model(name: str, request: Request) -> None:
        key = getattr(request.state, "api_key", None)
        if key is not None and not key.allows(name):
            raise APIError(
                403, f"key {key.name!r} may not use model {name!r}", "permission_error", "model", "model_not_allowed"
            )
        if name != model_id:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {model_id!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def user_of(request: Request, body_user: str | None) -> str:
        """Whose request, for per-user fairness: the API key's name, else a hash of any bearer token."""
        if (key := getattr(request.state, "api_key", None)) is not None:
            return "key:" + key.name
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and len(auth) > 7:
            return "key:" + hashlib.sha256(auth[7:].encode()).hexdigest()[:16]
        return body_user or "anonymous"

    def submit(prompts: list[list[int]], params: SamplingParams, n: int, user: str) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                handles.append(engine.submit(ids, params, n, user))
        except (ValueError, QueueFullError, EngineDeadError) as e:
            for h in handles:
                engine.abort(h.request_id)
            if isinstance(e, QueueFullError):
                metrics.rejected.inc()
                raise APIError(
                    429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": str(e.retry_after)}
                ) from e
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), "server_error", code="engine_unavailable") from e
            raise APIError(400, str(e), "invalid_request_error", code="invalid_prompt") from e
        return handles

    async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StepOutput]]:
        """Outputs of several requests (one per prompt) as they come."""
        if len(handles) == 1:
            async for out in handles[0].stream():
                yield 0, out
            return
        q: asyncio.Queue[tuple[int, StepOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, h: RequestHandle) -> None:
            try:
                async for out in h.stream():
                    q.put_nowait((i, out))
            except Exception as e:
                q.put_nowait((i, e))
            q.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            done = 0
            while done < len(handles):
                i, item = await q.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(
        request: Request, handles: list[RequestHandle], consume: Callable[[int, StepOutput], None]
    ) -> None:
        """Run a non-streaming request to the end, cancelling it if the client disconnects."""

        async def run() -> None:
            async for i, out in merged(handles):
                consume(i, out)

        task = asyncio.ensure_future(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()
                    raise ClientGone
            task.result()
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", code="engine_unavailable") from e
        except RequestFailedError as e:
            raise APIError(503, str(e), "server_error", code="request_failed") from e
        finally:
            for h in handles:
                engine.abort(h.request_id)

    def sse(stream: Callable[[], AsyncIterator[dict[str, Any]]], handles: list[RequestHandle]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in stream():
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except (EngineDeadError, RequestFailedError) as e:
                code = "engine_failed" if isinstance(e, EngineDeadError) else "request_failed"
                err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": code}}
                yield f"data: {json.dumps(err)}\n\n"
            finally:  # normal end, client gone (the generator is cancelled), or error: free the KV now
                for h in handles:
                    engine.abort(h.request_id)
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def encode(text: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(None, tokenizer.encode, text)

    def usage(prompts: list[list[int]], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ).model_dump()

    def completion_logprobs(out: StepOutput, offset: int) -> dict[str, Any] | None:
        if out.logprob is None:
            return None
        token = tokenizer.decode([out.logprob.token_id])
        return {
            "tokens": [token],
            "token_logprobs": [out.logprob.logprob],
            "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in out.logprob.top}],
            "text_offset": [offset],
        }

    def chat_logprobs(out: StepOutput) -> dict[str, Any] | None:
        if out.logprob is None:
            return None

        def entry(token_id: int, lp: float) -> dict[str, Any]:
            text = tokenizer.decode([token_id])
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        lp = out.logprob
        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}]}

    # ----- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.error is not None:
            return _error(503, f"engine failed: {engine.error!r}", "server_error")
        return JSONResponse({"status": "ok", "model": model_id})

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.waiting.set(engine.num_queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=created, max_model_len=max_model_len)])

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_model(req.model, request)
        if isinstance(req.prompt, str):
            prompts = [await encode(req.prompt)]
        elif req.prompt and isinstance(req.prompt[0], int):
            prompts = [list(req.prompt)]  # type: ignore[arg-type]
        elif req.prompt and isinstance(req.prompt[0], str):
            prompts = [await encode(p) for p in req.prompt]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in req.prompt]  # type: ignore[union-attr]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        params = req.sampling(req.max_tokens or 16, req.logprobs)
        handles = submit(prompts, params, req.n, user_of(request, req.user))
        rid, now = handles[0].request_id, int(time.time())
        echo = [tokenizer.decode(p) if req.echo else "" for p in prompts]

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": now, "model": model_id, "choices": choices}

        if req.stream:

            async def stream() -> AsyncIterator[dict[str, Any]]:
                produced = 0
                if req.echo:
                    yield chunk(
                        [
                            {"index": i * req.n + j, "text": echo[i], "logprobs": None, "finish_reason": None}
                            for i in range(len(prompts))
                            for j in range(req.n)
                        ]
                    )
                async for i, out in merged(handles):
                    produced += out.token_id is not None
                    seq = out.seq
                    finish = seq.finish_reason.value if seq.finished else None
                    if out.text_delta or finish or out.logprob is not None:
                        yield chunk(
                            [
                                {
                                    "index": i * req.n + seq.index,
                                    "text": out.text_delta,
                                    "logprobs": completion_logprobs(out, seq.emitted - len(out.text_delta)),
                                    "finish_reason": finish,
                                }
                            ]
                        )
                if req.stream_options and req.stream_options.include_usage:
                    yield {**chunk([]), "usage": usage(prompts, produced)}

            return sse(stream, handles)

        choices: dict[int, dict[str, Any]] = {}

        def consume(i: int, out: StepOutput) -> None:
            c = choices.setdefault(i * req.n + out.seq.index, {"lp": []})
            if (lp := completion_logprobs(out, 0)) is not None:
                c["lp"].append(lp)

        await _collect_or_gone(collect(request, handles, consume))
        result = []
        for i, h in enumerate(handles):
            for seq in h.seqs:
                index = i * req.n + seq.index
                lps = choices.get(index, {"lp": []})["lp"]
                logprobs = None
                if req.logprobs is not None:
                    logprobs = {
                        k: [x for lp in lps for x in lp[k]] for k in ("tokens", "token_logprobs", "top_logprobs")
                    }
                    logprobs["text_offset"] = _offsets(logprobs["tokens"], len(echo[i]))
                result.append(
                    CompletionChoice(
                        index=index, text=echo[i] + seq.text, logprobs=logprobs, finish_reason=seq.finish_reason.value
                    )
                )
        total = sum(len(s.output_ids) for h in handles for s in h.seqs)
        return CompletionResponse(
            id=rid,
            created=now,
            model=model_id,
            choices=sorted(result, key=lambda c: c.index),
            usage=Usage(**usage(prompts, total)),
        )

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model, request)
        if not tokenizer.has_chat_template:
            raise APIError(400, f"model {model_id!r} has no chat template; use /v1/completions")
        try:
            text = tokenizer.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        except Exception as e:  # jinja templates raise for unsupported role orders
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from e
        prompt = await encode(text)
        room = max_model_len - len(prompt)
        if room < 1:
            raise APIError(
                400,
                f"the messages take {len(prompt)} tokens; the context holds {max_model_len}",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or room
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        handles = submit([prompt], params, req.n, user_of(request, req.user))
        rid, now = "chat" + handles[0].request_id, int(time.time())

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id, "choices": choices}

        if req.stream:

            async def stream() -> AsyncIterator[dict[str, Any]]:
                yield chunk(
                    [
                        {
                            "index": j,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for j in range(req.n)
                    ]
                )
                produced = 0
                async for _, out in merged(handles):
                    produced += out.token_id is not None
                    seq = out.seq
                    finish = seq.finish_reason.value if seq.finished else None
                    if out.text_delta or finish or out.logprob is not None:
                        delta = {"content": out.text_delta} if out.text_delta else {}
                        yield chunk(
                            [
                                {
                                    "index": seq.index,
                                    "delta": delta,
                                    "logprobs": chat_logprobs(out),
                                    "finish_reason": finish,
                                }
                            ]
                        )
                if req.stream_options and req.stream_options.include_usage:
                    yield {**chunk([]), "usage": usage([prompt], produced)}

            return sse(stream, handles)

        token_lps: dict[int, list[dict[str, Any]]] = {}

        def consume(_: int, out: StepOutput) -> None:
            if (lp := chat_logprobs(out)) is not None:
                token_lps.setdefault(out.seq.index, []).extend(lp["content"])

        await _collect_or_gone(collect(request, handles, consume))
        seqs = handles[0].seqs
        choices = [
            ChatChoice(
                index=s.index,
                message=ChatChoiceMessage(content=s.text),
                logprobs={"content": token_lps.get(s.index, [])} if req.logprobs else None,
                finish_reason=s.finish_reason.value,
            )
            for s in seqs
        ]
        return ChatCompletionResponse(
            id=rid,
            created=now,
            model=model_id,
            choices=choices,
            usage=Usage(**usage([prompt], sum(len(s.output_ids) for s in seqs))),
        )

    return app


async def _collect_or_gone(waiting: Awaitable[None]) -> None:
    try:
        await waiting
    except ClientGone as e:  # nobody is listening; 499 is nginx's "client closed request"
        raise APIError(499, "client closed the request", code="client_closed") from e


def _offsets(tokens: list[str], start: int) -> list[int]:
    offsets, pos = [], start
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return offsets
