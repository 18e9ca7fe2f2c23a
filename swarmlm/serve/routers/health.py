"""GET /health (always open, for load balancers) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from swarmlm.serve.access import require_key_if_protected
from swarmlm.serve.serving import serving_of

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    return serving_of(request).health()


@router.get("/metrics", dependencies=[Depends(require_key_if_protected)])
async def prometheus(request: Request) -> Response:
    return serving_of(request).prometheus()
