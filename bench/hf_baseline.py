"""The naive baseline: plain transformers behind FastAPI, one request at a time, no batching.

This is what "just wrap model.generate in a web server" gets you, so the benchmark shows what
continuous batching and scheduling buy. It loads the same GGUF as the other backends (dequantized to
fp32 by transformers) and speaks enough of the OpenAI completions API for the benchmark client:

    .venv/bin/python bench/hf_baseline.py --gguf path/to/model.gguf --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer


def build_app(gguf: Path) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    model_id = gguf.stem
    eos_id = tokenizer.eos_token_id
    # One request at a time: the point of this baseline is the absence of batching.
    lock = asyncio.Lock()
    app = FastAPI()

    @torch.inference_mode()
    def step(input_ids: torch.Tensor, past: object) -> tuple[int, object]:
        """One greedy forward pass (the whole prompt the first time, then one token with the KV cache)."""
        out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    async def generate(prompt: str, max_tokens: int, ignore_eos: bool) -> AsyncIterator[tuple[str, int, int]]:
        """Yield (new text, prompt tokens, tokens so far) after every generated token."""
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        n_prompt = ids.shape[1]
        out_ids: list[int] = []
        text_so_far = ""
        past = None
        async with lock:
            for _ in range(max_tokens):
                # Forward passes run in a worker thread so the event loop keeps streaming and answering
                # /health; a disconnected client cancels us here and the lock is released.
                tok, past = await asyncio.to_thread(step, ids, past)
                out_ids.append(tok)
                if tok == eos_id and not ignore_eos:
                    break
                # Decode the whole output each time and emit the difference, so multi-byte characters
                # split across tokens come out whole.
                text = tokenizer.decode(out_ids, skip_special_tokens=True)
                yield text[len(text_so_far) :], n_prompt, len(out_ids)
                text_so_far = text
                ids = torch.tensor([[tok]])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "hf-baseline"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> object:
        body = await request.json()
        prompt = body["prompt"]
        max_tokens = int(body.get("max_tokens") or 16)
        ignore_eos = bool(body.get("ignore_eos", False))
        rid = f"cmpl-{uuid.uuid4().hex}"

        def chunk(text: str | None, usage: dict | None = None) -> str:
            choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": None}]
            payload = {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": choices,
            }
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        if not body.get("stream"):
            parts, n_prompt, n_out = [], 0, 0
            async for text, n_prompt, n_out in generate(prompt, max_tokens, ignore_eos):  # noqa: B007
                parts.append(text)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
            return JSONResponse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "model": model_id,
                    "usage": usage,
                    "choices": [{"index": 0, "text": "".join(parts), "finish_reason": "length"}],
                }
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            n_prompt = n_out = 0
            async for text, n_prompt, n_out in generate(prompt, max_tokens, ignore_eos):  # noqa: B007
                yield chunk(text)
            if include_usage:
                yield chunk(
                    None, {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.gguf.resolve()), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
