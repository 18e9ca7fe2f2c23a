"""The P2P handlers of a serving peer: each client session is one stream of steps into its `SpanEngine`.

A session's steps reach its stream two ways: from the client itself, or pushed by the previous peer of
the chain (`rpc_push`, see messages.py). Both go into the stream's inbox, in arrival order; the stream
runs each step (all its rows in one forward pass), pushes the output on to the next hop when the step
names one, and answers the client. Fine-tuning clients call `rpc_train`: one stateless forward or
backward pass of some of our layers (span_gradients.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator  # noqa: UP035 - hivemind's servicer recognises typing's alias, not collections.abc's

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarmlm.core.membership import Membership, MembershipError
from swarmlm.core.relay import DIAL_TIMEOUT, DirectLinks, connection_kinds, direct_addresses, redial
from swarmlm.engine.kv_cache import KVCacheError
from swarmlm.engine.span_engine import SessionError, SpanEngine, SpanSession
from swarmlm.swarm.grad_messages import GradReply, GradRequest
from swarmlm.swarm.messages import ProtocolError, StepReply, StepRequest
from swarmlm.swarm.span_gradients import GradError, SpanGradients
from swarmlm.swarm.span_record import SpanRecord

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 10.0  # a push that the next peer has not taken by then failed (the client reroutes)
REFUSAL_WAIT = 2.0  # how long a refused stream waits for its caller's first message before answering
OPEN_WAIT = 5.0  # how long a push waits for its stream's opening message, sent by the client at the same time


class _PushFailed:
    def __init__(self, step_id: int, message: str) -> None:
        self.step_id, self.message = step_id, message


class _Stream:
    """One session stream on this peer: its inbox and, once its header came, its (session id, first layer)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[runtime_pb2.ExpertRequest | _PushFailed | BaseException | None] = asyncio.Queue()
        self.key: tuple[str, int] | None = None


class SpanServicer(ServicerBase):
    """P2P handlers of a serving peer: `rpc_inference` is one session's stream, `rpc_push` feeds one."""

    def __init__(
        self,
        engine: SpanEngine | None,
        record: SpanRecord,
        membership: Membership,
        perturb: float = 0.0,
        gradients: SpanGradients | None = None,
    ) -> None:
        self.engine = engine  # replaced when the peer moves to another span
        self.record = record
        self.membership = membership
        self.gradients = gradients or SpanGradients()
        self.perturb = perturb  # > 0 only in attack tests: a peer that lies about its activations
        self.p2p: P2P | None = None  # set by the peer once its P2P is up: pushes go out through it
        self._streams: dict[tuple[str, int], _Stream] = {}  # (session id, first layer) -> its open stream
        self._opened = asyncio.Condition()  # pushes that arrive before their stream's opening wait on this
        self._background: set[asyncio.Task[None]] = set()  # pushes and dial-backs in flight
        self.links = DirectLinks()  # next hops behind NAT that dialed us back

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        stream = _Stream()
        reader = asyncio.create_task(self._read(requests, stream))
        sessions: dict[str, SpanSession] = {}
        engine = self.engine
        step_id, blocks = -1, (0, 0)
        try:
            try:
                await self.membership.require(str(context.remote_id))
            except MembershipError:
                # Refuse once the caller has written what it will (its end of stream, or for a session that
                # stays open its first message and REFUSAL_WAIT more): a refusal that closes the stream while
                # the caller still writes breaks its pipe, and it would see a reset instead of the reason.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_until_end(stream.inbox), REFUSAL_WAIT)
                raise
            while (item := await stream.inbox.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _PushFailed):
                    yield StepReply(item.step_id, push_error=item.message).to_proto()
                    continue
                step = StepRequest.from_proto(item)
                step_id = step.step_id
                if engine is None or engine is not self.engine:
                    raise SessionError("this peer is moving to other layers; route around it")
                if stream.key is None:
                    stream.key, blocks = self._open(step)
                    self._streams[stream.key] = stream
                    async with self._opened:
                        self._opened.notify_all()
                for name in step.closed:
                    if (session := sessions.pop(name, None)) is not None:
                        engine.close(session)
                if not step.rows:
                    continue  # an opening or closing message: nothing to answer
                for row in step.rows:
                    if row.key not in sessions:
                        name = f"{stream.key[0]}/{row.key}"
                        user = str(context.remote_id)
                        sessions[row.key] = engine.open(name, row.max_length, user, blocks, row.adapter)
                hidden = step.hidden.split([r.length for r in step.rows])
                work = [(sessions[r.key], h, r.position) for r, h in zip(step.rows, hidden, strict=True)]
                outs = await asyncio.gather(*(asyncio.wrap_future(f) for f in engine.submit(work)))
                out = torch.cat(outs)
                if self.perturb:
                    out = out + self.perturb * out.std() * torch.randn_like(out)
                out = out.to(step.hidden.dtype)
                if step.forward:
                    self._push(step, out, stream)
                yield StepReply(step.step_id, out).to_proto()
        except (ProtocolError, SessionError, KVCacheError, MembershipError) as e:
            yield StepReply(step_id, error=str(e)).to_proto()
        finally:
            reader.cancel()
            if stream.key is not None and self._streams.get(stream.key) is stream:
                del self._streams[stream.key]
            if engine is not None:
                for session in sessions.values():
                    engine.close(session)

    async def _read(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], stream: _Stream) -> None:
        """The client's messages into the stream's inbox; None when the client closes it."""
        try:
            async for msg in requests:
                await stream.inbox.put(msg)
        except Exception as e:  # a broken connection ends the stream like a close
            await stream.inbox.put(e)
        await stream.inbox.put(None)

    def _open(self, step: StepRequest) -> tuple[tuple[str, int], tuple[int, int]]:
        """The stream's (session id, first layer) and which of our blocks it runs, from its header."""
        h = step.header or {}
        r = self.record
        start, end = h.get("start"), h.get("end")
        ours = h.get("model_id") == r.model_id and isinstance(start, int) and isinstance(end, int)
        if not ours or not r.start <= start < end <= r.end:
            raise SessionError(
                f"this peer serves {r.model_id} layers {r.start}:{r.end}, not {h.get('model_id')} layers {start}:{end}"
            )
        if not isinstance(h.get("session_id"), str):
            raise SessionError("the session header needs a session_id")
        if (h["session_id"], start) in self._streams:
            raise SessionError("this session already has a stream for these layers")
        return (h["session_id"], start), (start - r.start, end - r.start)

    def _push(self, step: StepRequest, out: torch.Tensor, stream: _Stream) -> None:
        """Hand the step's output to the next hop, in the background: this stream answers its client
        meanwhile. A failure is reported on this stream as the step's push_error."""
        nxt, rest = step.forward[0], step.forward[1:]
        assert stream.key is not None
        to = (stream.key[0], nxt.start)  # the rows the client closed are closed down the chain too
        request = StepRequest(out, step.rows, step.step_id, forward=rest, closed=step.closed, to=to)

        async def push() -> None:
            error = None
            try:
                assert self.p2p is not None
                await reach_directly(self.p2p, nxt.peer_id, self.links)
                call = self.p2p.call_protobuf_handler(
                    PeerID.from_base58(nxt.peer_id), PUSH_HANDLER, request.to_proto(), runtime_pb2.ExpertResponse
                )
                reply = StepReply.from_proto(await asyncio.wait_for(call, PUSH_TIMEOUT))
                error = reply.error
            except Exception as e:  # unreachable, dead or refusing: the client reroutes from that hop
                error = f"{type(e).__name__}: {e}"
            if error is not None:
                await stream.inbox.put(_PushFailed(step.step_id, f"push to {nxt.peer_id[:12]}… failed: {error}"))

        task = asyncio.create_task(push())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A previous peer's output for one of our streams (its step runs there, in arrival order)."""
        try:
            await self.membership.require(str(context.remote_id))
            step = StepRequest.from_proto(request)
            if step.to is None:
                raise ProtocolError("a push names its stream")
            stream = await self._stream(step.to)
        except (ProtocolError, SessionError, MembershipError) as e:
            return StepReply(-1, error=str(e)).to_proto()
        await stream.inbox.put(request)
        return StepReply(step.step_id).to_proto()  # taken: its output goes to the client on that stream

    async def rpc_train(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One training forward or backward pass (a `GradRequest`), answered with a `GradReply`."""
        engine = self.engine
        try:
            await self.membership.require(str(context.remote_id))
            request = await anext(aiter(requests), None)
            if request is None:
                return
            if engine is None:
                raise GradError("this peer is loading its layers; route around it")
            reply = await self.gradients.run(engine.span, self.record.model_id, GradRequest.from_proto(request))
        except (ProtocolError, GradError, MembershipError) as e:
            reply = GradReply(error=str(e))
        yield reply.to_proto()

    async def rpc_ping(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """An empty answer at once: clients time it to prefer nearer peers (it says nothing about us)."""
        return runtime_pb2.ExpertResponse()

    async def rpc_dial_back(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """The caller reaches us through a relay only (we are behind NAT) and is about to send activations,
        which a relayed connection does not carry: dial it at the addresses it gives. The handshake checks
        its peer id, so the addresses cannot point us at anybody else."""
        assert self.p2p is not None
        try:
            await self.membership.require(str(context.remote_id))
        except MembershipError as e:
            return StepReply(-1, error=str(e)).to_proto()
        try:
            addresses = msgpack.unpackb(request.metadata)
        except ValueError as e:
            return StepReply(-1, error=f"a dial-back names a list of multiaddrs: {e}").to_proto()
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            return StepReply(-1, error="a dial-back names a list of multiaddrs").to_proto()

        async def dial_back() -> None:
            await asyncio.sleep(0.2)  # this reply goes out on the relayed connection, closed next
            try:
                assert self.p2p is not None
                await redial(self.p2p, context.remote_id, addresses)
            except Exception as e:  # a caller we cannot dial (behind NAT too): it stays on the relay
                log.warning("could not dial %s… back: %s: %s", str(context.remote_id)[:12], type(e).__name__, e)

        task = asyncio.create_task(dial_back())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return StepReply(0).to_proto()

    async def _stream(self, key: tuple[str, int]) -> _Stream:
        """The open stream `key` names, waiting briefly for its opening message (the client sends it while
        the first step is on its way through the previous peers)."""
        with contextlib.suppress(TimeoutError):
            async with self._opened:
                await asyncio.wait_for(self._opened.wait_for(lambda: key in self._streams), OPEN_WAIT)
        if (stream := self._streams.get(key)) is None:
            raise SessionError(f"no open stream of session {key[0][:12]}… for layers from {key[1]} here")
        return stream


async def _until_end(inbox: asyncio.Queue[Any]) -> None:
    """Wait until the caller closes its side of the stream (its reader puts None in the inbox)."""
    while await inbox.get() is not None:
        pass


PUSH_HANDLER = SpanServicer._get_handle_name(None, "rpc_push")  # the names add_p2p_handlers registers
INFERENCE_HANDLER = SpanServicer._get_handle_name(None, "rpc_inference")
PING_HANDLER = SpanServicer._get_handle_name(None, "rpc_ping")
TRAIN_HANDLER = SpanServicer._get_handle_name(None, "rpc_train")
DIAL_BACK_HANDLER = SpanServicer._get_handle_name(None, "rpc_dial_back")


async def reach_directly(p2p: P2P, peer_id: str, links: DirectLinks) -> None:
    """Before sending activations to `peer_id`: if our only connection to it is relayed (it is behind
    NAT), ask it to dial us back, and wait until it has, so that the activations go over a direct
    connection (see core/relay.py). Checked once per DIRECT_TTL per peer; a peer that cannot dial us
    back leaves us on the relay, which carries 128 KiB a connection."""
    if links.fresh(peer_id):
        return
    links.mark(peer_id)
    peer = PeerID.from_base58(peer_id)
    kinds = await connection_kinds(p2p, peer)
    if not kinds:  # not connected yet: connect (the daemon finds a route, through a relay if need be)
        await p2p.call_protobuf_handler(peer, PING_HANDLER, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
        kinds = await connection_kinds(p2p, peer)
    if kinds != {"relayed"}:
        return
    ours = direct_addresses([str(m) for m in await p2p.get_visible_maddrs(latest=True)])
    request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(ours))
    reply = await p2p.call_protobuf_handler(peer, DIAL_BACK_HANDLER, request, runtime_pb2.ExpertResponse)
    if (error := StepReply.from_proto(reply).error) is not None:
        log.warning("peer %s… reaches us only through a relay: %s", peer_id[:12], error)
        return
    deadline = time.monotonic() + DIAL_TIMEOUT
    while "direct" not in await connection_kinds(p2p, peer):
        if time.monotonic() > deadline:
            log.warning("peer %s… reaches us only through a relay: it did not dial back", peer_id[:12])
            return
        await asyncio.sleep(0.05)
