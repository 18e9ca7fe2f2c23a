"""The P2P handlers of a serving peer: each client session is one stream of steps into its `SpanEngine`."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator  # noqa: UP035 - hivemind's servicer recognises typing's alias, not collections.abc's

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarmlm.core.membership import Membership, MembershipError
from swarmlm.engine.kv_cache import KVCacheError
from swarmlm.engine.span_engine import SessionError, SpanEngine, SpanSession
from swarmlm.swarm.messages import ProtocolError, StepRequest, error_response, step_response
from swarmlm.swarm.records import SpanRecord


class SpanServicer(ServicerBase):
    """P2P handlers of a serving peer: `rpc_inference` is one session's stream."""

    def __init__(
        self, engine: SpanEngine | None, record: SpanRecord, membership: Membership, perturb: float = 0.0
    ) -> None:
        self.engine = engine  # replaced when the peer moves to another span
        self.record = record
        self.membership = membership
        self.perturb = perturb  # > 0 only in attack tests: a peer that lies about its activations

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: SpanSession | None = None
        engine = self.engine
        try:
            await self.membership.require(str(context.remote_id))
            async for msg in requests:
                step = StepRequest.from_proto(msg)
                if engine is None or engine is not self.engine:
                    raise SessionError("this peer is moving to other layers; route around it")
                if session is None:
                    session = self._open(engine, step, str(context.remote_id))
                future = engine.submit(session, step.hidden, step.position)
                out = await asyncio.wrap_future(future)
                if self.perturb:
                    out = out + self.perturb * out.std() * torch.randn_like(out)
                yield step_response(out.to(step.hidden.dtype))
        except (ProtocolError, SessionError, KVCacheError, MembershipError) as e:
            yield error_response(str(e))
        finally:
            if session is not None and engine is not None:
                engine.close(session)

    def _open(self, engine: SpanEngine, step: StepRequest, remote: str) -> SpanSession:
        h = step.header or {}
        r = self.record
        start, end = h.get("start"), h.get("end")
        ours = h.get("model_id") == r.model_id and isinstance(start, int) and isinstance(end, int)
        if not ours or not r.start <= start < end <= r.end:
            raise SessionError(
                f"this peer serves {r.model_id} layers {r.start}:{r.end}, "
                f"not {h.get('model_id')} layers {start}:{end}"
            )
        if not isinstance(h.get("max_length"), int) or not isinstance(h.get("session_id"), str):
            raise SessionError("the session header needs session_id and max_length")
        blocks = (start - r.start, end - r.start)  # which of our blocks this session runs through
        return engine.open(h["session_id"], h["max_length"], user=remote, blocks=blocks)
