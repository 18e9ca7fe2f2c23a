"""bench/serve_bench.py's client side: streaming requests sent open loop (Poisson arrivals) or closed
loop (back-to-back streams), what each request saw, and the run's latency/throughput summary."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from workload import Request, fixed_workload, request_body


@dataclass
class Outcome:
    """What one request saw; all times are perf_counter seconds."""

    req: Request
    scheduled: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of every chunk that carried text
    done: float | None = None
    usage_tokens: int | None = None
    status: str = "pending"  # ok | failed | cancelled
    error: str = ""

    @property
    def output_tokens(self) -> int:
        # usage is exact; chunk count is the fallback (a chunk can hold a partial character, or several)
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)


# The constrained phases' answers: 64 digits, some 128 tokens, so a request decodes its whole max_tokens
# under the grammar as the free phases do with ignore_eos (which a grammar's end-of-answer excludes).
JSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "digits",
        "schema": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 64},
    },
}


def body_of(req: Request, model: str, constrained: bool) -> dict:
    body = request_body(req, model)
    if constrained:
        del body["ignore_eos"]
        body["response_format"] = JSON_FORMAT
    return body


async def send(client: httpx.AsyncClient, base: str, model: str, out: Outcome, constrained: bool = False) -> None:
    """Wait until the request's scheduled time, then stream it (open loop: never waits on others)."""
    await asyncio.sleep(max(0.0, out.scheduled - time.perf_counter()))
    body = body_of(out.req, model, constrained)
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                out.status, out.error = "failed", f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if any(c.get("text") for c in msg.get("choices") or []):
                    out.token_times.append(time.perf_counter())
                if msg.get("usage"):
                    out.usage_tokens = msg["usage"].get("completion_tokens")
        out.done, out.status = time.perf_counter(), "ok"
    except asyncio.CancelledError:
        out.status = "cancelled"
        raise
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        out.status, out.error = "failed", f"{type(err).__name__}: {err}"


async def run_open_loop(base: str, model: str, workload: list[Request], cap_s: float) -> tuple[list, float]:
    """Fire every request at its arrival time; after cap_s cancel whatever is still running."""
    limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=len(workload) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=limits) as client:
        t0 = time.perf_counter() + 0.05
        outcomes = [Outcome(r, scheduled=t0 + r.arrival_s) for r in workload]
        tasks = [asyncio.create_task(send(client, base, model, o)) for o in outcomes]
        _, pending = await asyncio.wait(tasks, timeout=cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes, t0


async def run_closed_loop(
    base: str,
    model: str,
    streams: int,
    rounds: int,
    prompt_tokens: int,
    output_tokens: int,
    cap_s: float,
    constrained: bool = False,
) -> tuple[list, float]:
    """`streams` clients, each sending `rounds` requests back to back (the next as soon as one ends);
    `constrained`: each answer under `JSON_FORMAT`."""
    reqs = fixed_workload(streams * rounds, prompt_tokens, output_tokens)
    outcomes: list[Outcome] = []

    async def stream(client: httpx.AsyncClient, k: int) -> None:
        for r in reqs[k::streams]:
            out = Outcome(r, scheduled=time.perf_counter())
            outcomes.append(out)
            await send(client, base, model, out, constrained)

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(stream(client, k)) for k in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes, t0


# ----- metrics -------------------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _p99(xs: list[float]) -> float | None:
    return float(np.percentile(xs, 99)) if xs else None


def summarize(outcomes: list[Outcome], t0: float, rate: float | None) -> dict:
    ok = [o for o in outcomes if o.status == "ok"]
    jct = [o.done - o.scheduled for o in ok]
    ttft = [o.token_times[0] - o.scheduled for o in ok if o.token_times]
    # TPOT per request: decode time after the first token over the tokens after the first.
    tpot = [
        (o.token_times[-1] - o.token_times[0]) / (o.output_tokens - 1)
        for o in ok
        if len(o.token_times) >= 2 and o.output_tokens >= 2
    ]
    itl = [b - a for o in ok for a, b in zip(o.token_times, o.token_times[1:], strict=False)]
    ends = [o.done for o in ok] or [time.perf_counter()]
    wall = max(max(ends), max((o.token_times[-1] for o in outcomes if o.token_times), default=t0)) - t0
    tokens = sum(o.output_tokens for o in outcomes)  # cancelled requests' partial output is still work done
    last_arrival = max(o.scheduled for o in outcomes) - t0
    errors = sorted({o.error for o in outcomes if o.error})[:3]
    return {
        "offered_rate": rate,
        "requests": len(outcomes),
        "completed": len(ok),
        "failed": sum(o.status == "failed" for o in outcomes),
        "cancelled": sum(o.status in ("cancelled", "pending") for o in outcomes),
        "jct_mean_s": _mean(jct),
        "jct_p99_s": _p99(jct),
        "ttft_mean_s": _mean(ttft),
        "ttft_p99_s": _p99(ttft),
        "tpot_mean_s": _mean(tpot),
        "itl_p99_s": _p99(itl),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else None,
        "req_s": len(ok) / wall if wall > 0 else None,
        "drain_s": wall - last_arrival,  # how long the server kept working after the last arrival
        "arrival_span_s": last_arrival,
        "errors": errors,
    }


KNEE = 3.0  # mean JCT this many times the low-load mean JCT = past the knee of the latency-load curve


def mark_saturation(rows: list[dict]) -> None:
    """Flag sweep runs past saturation: some request did not finish within the wall-clock cap, or mean JCT
    exceeds KNEE x the same backend's mean JCT at its lowest swept rate (≈ its unloaded latency).

    A backlog-based rule (drain time after the last arrival) would misfire here: with heavy-tailed
    outputs, one long job arriving late drains for a long time even on an idle server."""
    for r in rows:
        if r["phase"] != "sweep":
            continue
        same = [x for x in rows if x["backend"] == r["backend"] and x["phase"] == "sweep"]
        base = min(same, key=lambda x: x["offered_rate"])
        slow = bool(r["jct_mean_s"] and base["jct_mean_s"] and r["jct_mean_s"] > KNEE * base["jct_mean_s"])
        r["saturated"] = r["completed"] < r["requests"] or slow
