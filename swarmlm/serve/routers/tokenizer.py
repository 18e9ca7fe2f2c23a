"""POST /tokenize, POST /detokenize and GET /tokenizer_info: vLLM's tokenizer endpoints, with which a client
(lm-evaluation-harness's remote tokenizer, a context-length check) tokenizes exactly as the server does."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from swarmlm.serve.access import require_key
from swarmlm.serve.errors import ERROR_RESPONSES
from swarmlm.serve.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from swarmlm.serve.serving import serving_of

router = APIRouter(dependencies=[Depends(require_key)])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await serving_of(request).tokenize(req, request)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return serving_of(request).detokenize(req, request)


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(request: Request) -> TokenizerInfo:
    return serving_of(request).tokenizer_info()
