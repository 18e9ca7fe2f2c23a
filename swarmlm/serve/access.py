"""Who may call what, as FastAPI dependencies of the routes they guard. Without a key file everything is
open; with one, every /v1 call needs a known bearer key within its rate limit, and with
`protect_metrics` /metrics and /dashboard need a key too (uncharged: monitoring polls often)."""

from __future__ import annotations

from fastapi import Request

from swarmlm.serve.serving import serving_of


async def require_key(request: Request) -> None:
    """A known key, charged one request; the key decides the user and the models allowed."""
    keys = serving_of(request).keys
    if keys is not None:
        request.state.api_key = keys.authenticate(request.headers.get("authorization"))
        keys.charge(request.state.api_key)


async def require_key_if_protected(request: Request) -> None:
    serving = serving_of(request)
    if serving.keys is not None and serving.protect_metrics:
        request.state.api_key = serving.keys.authenticate(request.headers.get("authorization"))
