"""Getting a request's outputs to its client: several engine requests merged into one stream, a
non-streaming wait that notices a disconnect, and Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from swarmlm.engine.async_engine import EngineDeadError, RequestFailedError, RequestHandle
from swarmlm.engine.sequence import StepOutput
from swarmlm.serve.errors import ClientGone, error_body

# how often a non-streaming request checks its client is still there: a gone client's work is aborted
DISCONNECT_POLL_SECONDS = 0.25


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StepOutput]]:
    """Outputs of several requests (one per prompt) as they come, each with its request's position."""
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


async def unless_disconnected(request: Request, work: Awaitable[None]) -> None:
    """Await `work`; cancel it and raise ClientGone if the client disconnects first (a plain HTTP answer
    has no write to fail on, so the connection is polled)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            task.result()  # raises what the work raised
            return
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone


def sse_response(chunks: AsyncIterator[dict[str, Any]], release: Callable[[], None]) -> StreamingResponse:
    """`chunks` as Server-Sent Events ending in `[DONE]`; an engine failure mid-stream becomes an error
    event, since the 200 status is already sent. `release` runs however the stream ends."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except (EngineDeadError, RequestFailedError) as e:
            code = "engine_failed" if isinstance(e, EngineDeadError) else "request_failed"
            yield f"data: {json.dumps(error_body(str(e), 'server_error', code=code))}\n\n"
        finally:  # normal end, client gone (the generator is cancelled), or error: free the KV now
            release()
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
