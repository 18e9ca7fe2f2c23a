"""One hop of an inference session: the P2P stream to one peer that runs a span of layers for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from torch import Tensor

from swarmlm.swarm.messages import Row, StepReply, StepRequest
from swarmlm.swarm.routing import RouteHop
from swarmlm.swarm.servicer import INFERENCE_HANDLER

if TYPE_CHECKING:  # the manager opens spans itself (spot-checks), so this module cannot import it
    from swarmlm.swarm.sequence_manager import RemoteSequenceManager


class HopFailure(RuntimeError):
    pass


class SpanStream:
    """A session's steps through one peer's span (or part of it).

    Steps go out on the stream (the first one to the chain, or a replay) or reach the peer pushed by the
    previous one; either way the peer answers each on this stream, tagged with its step id, and a reader
    task hands each answer to whoever awaits that step. The stream is driven message by message
    (hivemind's framing) rather than through `iterate_protobuf_handler`, whose reader waits for the
    request iterator to finish before it reports a closed connection: a dead peer must surface at once,
    not at the deadline. Every method runs on the manager's loop except `step` and `close`."""

    def __init__(self, manager: RemoteSequenceManager, route: RouteHop, session_id: str) -> None:
        self.manager, self.record, self.start, self.end = manager, route.record, route.start, route.end
        self.header = {
            "session_id": session_id,
            "model_id": route.record.model_id,
            "start": route.start,
            "end": route.end,
        }
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Tensor]] = {}
        self._failure: HopFailure | None = None
        self.on_push_error: Callable[[int, str], None] | None = None  # the next hop's step never arrived

    def where(self) -> str:
        return f"peer {self.record.peer_id[:12]}… (layers {self.start}..{self.end})"

    def step(self, hidden: Tensor, rows: list[Row]) -> Tensor:
        """One step from any thread, straight to this peer (spot checks)."""
        return self.manager.run(self.call(StepRequest(hidden, rows)), self.manager.config.step_timeout + 5)

    async def call(self, request: StepRequest) -> Tensor:
        """Send one step straight to this peer and wait for its answer."""
        future = self.expect(request.step_id)
        await self.send(request)
        return await self.reply(future)

    async def open(self) -> None:
        """Open the stream with its header (no answer comes: pushes for it wait at the peer until it is in)."""
        if self._writer is not None:
            return
        try:
            reader, self._writer = await asyncio.wait_for(
                self.manager.open_stream(self.record.peer_id, INFERENCE_HANDLER), self.manager.config.step_timeout
            )
            await P2P.send_protobuf(StepRequest(torch.empty(0), [], header=self.header).to_proto(), self._writer)
        except Exception as e:
            raise self._fail(e) from e
        self._reader_task = asyncio.create_task(self._read(reader))

    def expect(self, step_id: int) -> asyncio.Future[Tensor]:
        """The future this hop's answer to `step_id` resolves (register it before the step can arrive)."""
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        if self._failure is not None:
            future.set_exception(self._failure)
        else:
            self._pending[step_id] = future
        return future

    async def send(self, request: StepRequest) -> None:
        """Send a step (its answer resolves the future `expect` gave) or a control message (no answer)."""
        await self.open()
        if self._failure is not None:
            raise self._failure
        assert self._writer is not None
        if request.rows:
            request.hidden = request.hidden.to(self.manager.wire_dtype)
        try:
            await P2P.send_protobuf(request.to_proto(), self._writer)
        except Exception as e:
            raise self._fail(e) from e

    async def reply(self, future: asyncio.Future[Tensor]) -> Tensor:
        try:
            return await asyncio.wait_for(future, self.manager.config.step_timeout)
        except HopFailure:
            raise
        except Exception as e:  # timed out: a hung peer, or a push that went nowhere
            raise self._fail(e) from e

    def fail_step(self, step_id: int, message: str) -> None:
        """The previous hop could not push `step_id` here: the step fails on this hop."""
        if (future := self._pending.pop(step_id, None)) is not None and not future.done():
            future.set_exception(HopFailure(f"{self.where()}: {message}"))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg, err = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                if err is not None:
                    raise RuntimeError(err.message)
                assert msg is not None
                reply = StepReply.from_proto(msg)
                if reply.push_error is not None:
                    if self.on_push_error is not None:
                        self.on_push_error(reply.step_id, reply.push_error)
                    continue
                if reply.error is not None:
                    raise RuntimeError(f"the peer refused: {reply.error}")
                future = self._pending.pop(reply.step_id, None)
                if future is not None and not future.done() and reply.hidden is not None:
                    future.set_result(reply.hidden.float())
        except Exception as e:  # a closed, refused or garbled stream: every step waiting here fails
            self._fail(e)

    def _fail(self, e: BaseException) -> HopFailure:
        if self._failure is None:
            self._failure = e if isinstance(e, HopFailure) else HopFailure(f"{self.where()}: {type(e).__name__}: {e}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._failure)
                future.exception()  # retrieved: the steps behind a failed hop are never awaited
        self._pending.clear()
        return self._failure

    async def _close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._fail(HopFailure(f"{self.where()}: closed"))
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):  # the peer may be gone already
                await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
            writer.close()

    def close(self) -> None:
        self.manager.submit(self._close())
