"""POST /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from swarmlm.serve.access import require_key
from swarmlm.serve.errors import ERROR_RESPONSES
from swarmlm.serve.protocol import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from swarmlm.serve.serving import serving_of

router = APIRouter(dependencies=[Depends(require_key)])


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def completions(req: CompletionRequest, request: Request) -> Any:
    return await serving_of(request).completions(req, request)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    return await serving_of(request).chat(req, request)
