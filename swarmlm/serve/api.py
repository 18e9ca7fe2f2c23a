"""The OpenAI-compatible HTTP API of one peer: /v1/models, /v1/completions, /v1/chat/completions (SSE
streaming included), /v1/embeddings, vLLM's /tokenize, /detokenize and /tokenizer_info, /health and /metrics. Every bad
input gets an OpenAI-style error JSON.

This module only wires: the routers (serve/routers/) hand requests to the `OpenAIServing` kept on
`app.state.serving`, and serve/errors.py answers every failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from swarmlm.serve.errors import install_error_handlers
from swarmlm.serve.routers import completions, embeddings, health, models, tokenizer
from swarmlm.serve.serving import OpenAIServing


def create_app(serving: OpenAIServing) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        serving.engine.attach(asyncio.get_running_loop())  # the engine loop itself runs in the server's main thread
        yield
        serving.engine.stop()

    app = FastAPI(
        title="swarmlm", version="0.1.0", lifespan=lifespan, description="OpenAI-compatible API of a swarmlm peer"
    )
    app.state.serving = serving
    install_error_handlers(app)
    for router in (health.router, models.router, completions.router, embeddings.router, tokenizer.router):
        app.include_router(router)
    return app
