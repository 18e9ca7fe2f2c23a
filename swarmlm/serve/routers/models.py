"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from swarmlm.serve.access import require_key
from swarmlm.serve.protocol import ModelList
from swarmlm.serve.serving import serving_of

router = APIRouter(dependencies=[Depends(require_key)])


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return serving_of(request).models()
