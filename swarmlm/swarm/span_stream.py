"""One hop of an inference session: the P2P stream to one peer that runs a span of layers for it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from torch import Tensor

from swarmlm.swarm.messages import WIRE_DTYPES, RemoteError, StepRequest, read_response
from swarmlm.swarm.routing import RouteHop
from swarmlm.swarm.servicer import SpanServicer

if TYPE_CHECKING:  # the manager opens spans itself (spot-checks), so this module cannot import it
    from swarmlm.swarm.sequence_manager import RemoteSequenceManager


class HopFailure(RuntimeError):
    pass


class SpanStream:
    """A session's steps through one peer's span (or part of it), one message each way per step.

    The stream is driven message by message (hivemind's framing, one request then one reply) rather
    than through `iterate_protobuf_handler`, whose reader waits for the request iterator to finish
    before it reports a closed connection: a dead peer must surface at once, not at the deadline."""

    HANDLER = SpanServicer._get_handle_name(None, "rpc_inference")  # the name add_p2p_handlers registers

    def __init__(self, manager: RemoteSequenceManager, route: RouteHop, session_id: str, max_length: int) -> None:
        self.manager, self.record, self.start, self.end = manager, route.record, route.start, route.end
        self.header = {
            "session_id": session_id,
            "model_id": route.record.model_id,
            "start": route.start,
            "end": route.end,
            "max_length": max_length,
        }
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def step(self, hidden: Tensor, position: int) -> Tensor:
        """`call` from any thread."""
        return self.manager.run(self.call(hidden, position), self.manager.config.step_timeout + 5)

    async def call(self, hidden: Tensor, position: int) -> Tensor:
        """One step through this hop, on the manager's loop; any failure is a HopFailure."""
        try:
            return await asyncio.wait_for(self._step(hidden, position), self.manager.config.step_timeout)
        except Exception as e:  # a dead, hung, refusing or misbehaving peer: the session routes around it
            where = f"peer {self.record.peer_id[:12]}… (layers {self.start}..{self.end})"
            raise HopFailure(f"{where}: {type(e).__name__}: {e}") from e

    async def _step(self, hidden: Tensor, position: int) -> Tensor:
        header = None
        if self._writer is None:
            self._reader, self._writer = await self.manager.open_stream(self.record.peer_id, self.HANDLER)
            header = self.header
        assert self._reader is not None
        wire = WIRE_DTYPES[self.manager.config.wire_dtype]
        await P2P.send_protobuf(StepRequest(hidden.to(wire), position, header).to_proto(), self._writer)
        reply, err = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self._reader)
        if err is not None:
            raise RemoteError(err.message)
        return read_response(reply).float()

    async def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):  # the peer may be gone already
                await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
            writer.close()

    def close(self) -> None:
        self.manager.submit(self._close())
