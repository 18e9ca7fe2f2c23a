"""POST /v1/embeddings: OpenAI's embeddings endpoint (the pooling: `Engine.embed`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from swarmlm.serve.access import require_key
from swarmlm.serve.errors import ERROR_RESPONSES
from swarmlm.serve.protocol import EmbeddingRequest, EmbeddingResponse
from swarmlm.serve.serving import serving_of

router = APIRouter(dependencies=[Depends(require_key)])


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    return await serving_of(request).embeddings(req, request)
