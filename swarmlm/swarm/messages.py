"""Messages between a client, the peers of its chain, and from peer to peer, on hivemind's protobufs.

An inference session is one bidirectional P2P stream per hop, opened by the client with a header (which
session, which layers). A session carries one or more *rows*: the sequences of a gateway's micro-batch,
or the one sequence of a `RemoteModel` generation. A step message carries every row's new tokens at once
(their hidden states concatenated, one tensor), so a hop costs one message per micro-batch, not one per
sequence.

The client sends a step to the first hop only, naming the hops after it (`forward`): each peer sends its
output straight to the next one (`rpc_push`, addressed by session id and first layer) and also answers the
client on its own stream, so a token through h peers costs h+1 one-way delays while the client still sees
every boundary's activations (for failover replay and spot checks). A peer whose push failed says so on
its stream (`push_error`), so the client learns at once that the next hop never got the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ProtocolError(ValueError):
    pass


class RemoteError(RuntimeError):
    """A peer refused or failed a step; its message says why."""


@dataclass
class Row:
    key: str  # the sequence's name within the session
    position: int  # of its first new token
    length: int  # how many new tokens
    max_length: int  # the most tokens this sequence will hold (sizes its KV reservation)
    adapter: str | None = None  # the LoRA adapter it runs with (read when its session opens on a peer)


@dataclass
class NextHop:
    peer_id: str
    start: int  # its first layer: with the session id, it names that peer's stream of this session


@dataclass
class StepRequest:
    hidden: torch.Tensor  # [sum of the rows' lengths, hidden_size]
    rows: list[Row]
    step_id: int = 0
    header: dict[str, Any] | None = None  # a stream's first message: session_id, model_id, start, end
    forward: list[NextHop] = field(default_factory=list)  # the hops after this one, in order
    closed: list[str] = field(default_factory=list)  # rows the client is done with
    to: tuple[str, int] | None = None  # a pushed step: the receiving stream's (session id, first layer)

    @classmethod
    def single(cls, hidden: torch.Tensor, position: int, header: dict[str, Any]) -> StepRequest:
        """One sequence's step; `header` also gives its max_length (tests and attack benches)."""
        row = Row("0", position, hidden.shape[0] if hidden.ndim else 0, header.get("max_length", 0))
        return cls(hidden, [row], header=header)

    def to_proto(self) -> runtime_pb2.ExpertRequest:
        meta: dict[str, Any] = {
            "step": self.step_id,
            "rows": [
                [r.key, r.position, r.length, r.max_length, *([r.adapter] if r.adapter else [])] for r in self.rows
            ],
        }
        if self.header:
            meta["header"] = self.header
        if self.forward:
            meta["forward"] = [[h.peer_id, h.start] for h in self.forward]
        if self.closed:
            meta["closed"] = self.closed
        if self.to is not None:
            meta["to"] = list(self.to)
        tensors = [serialize_torch_tensor(self.hidden)] if self.rows else []
        return runtime_pb2.ExpertRequest(tensors=tensors, metadata=msgpack.packb(meta))

    @classmethod
    def from_proto(cls, msg: runtime_pb2.ExpertRequest) -> StepRequest:
        try:
            meta = msgpack.unpackb(msg.metadata) if msg.metadata else {}
            if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
                raise ProtocolError("a message carries an integer step id")
            rows = [Row(*r) for r in _list(meta, "rows")]
            if any(not _row_ok(r) for r in rows) or len({r.key for r in rows}) != len(rows):
                raise ProtocolError("each row is [distinct name, position >= 0, length >= 1, max_length, adapter?]")
            header = meta.get("header")
            if header is not None and not isinstance(header, dict):
                raise ProtocolError("malformed session header")
            forward = [NextHop(*h) for h in _list(meta, "forward")]
            if any(not (isinstance(h.peer_id, str) and isinstance(h.start, int)) for h in forward):
                raise ProtocolError("each forward hop is [peer id, first layer]")
            closed = _list(meta, "closed")
            to = meta.get("to")
            if to is not None and not (isinstance(to, list) and len(to) == 2 and isinstance(to[1], int)):
                raise ProtocolError("malformed push target")
            if len(msg.tensors) != (1 if rows else 0):
                raise ProtocolError("a step carries one tensor for its rows")
            hidden = deserialize_torch_tensor(msg.tensors[0]) if rows else torch.empty(0)
            if rows and (hidden.ndim != 2 or hidden.shape[0] != sum(r.length for r in rows)):
                raise ProtocolError(
                    f"the rows need {sum(r.length for r in rows)} hidden states, got {tuple(hidden.shape)}"
                )
        except ProtocolError:
            raise
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise ProtocolError(f"malformed step: {e}") from e
        return cls(
            hidden,
            rows,
            meta["step"],
            header,
            forward,
            [str(k) for k in closed],
            None if to is None else (str(to[0]), to[1]),
        )


def _list(meta: dict[str, Any], name: str) -> list[Any]:
    value = meta.get(name, [])
    if not isinstance(value, list) or any(not isinstance(v, list | str) for v in value):
        raise ProtocolError(f"malformed {name}")
    return value


def _row_ok(r: Row) -> bool:
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (r.position, r.length, r.max_length))
    adapter_ok = r.adapter is None or isinstance(r.adapter, str)
    return isinstance(r.key, str) and ints and adapter_ok and r.position >= 0 and r.length >= 1


@dataclass
class StepReply:
    step_id: int
    hidden: torch.Tensor | None = None
    error: str | None = None  # the peer refused or failed this step; the stream ends after it
    # (a reply with neither a tensor nor an error acknowledges a push)
    push_error: str | None = None  # the peer ran the step but could not hand it to the next hop

    def to_proto(self) -> runtime_pb2.ExpertResponse:
        meta: dict[str, Any] = {"step": self.step_id}
        if self.error is not None:
            meta["error"] = self.error
        if self.push_error is not None:
            meta["push_error"] = self.push_error
        tensors = [serialize_torch_tensor(self.hidden)] if self.hidden is not None else []
        return runtime_pb2.ExpertResponse(tensors=tensors, metadata=msgpack.packb(meta))

    @classmethod
    def from_proto(cls, msg: runtime_pb2.ExpertResponse) -> StepReply:
        try:
            meta = msgpack.unpackb(msg.metadata) if msg.metadata else {}
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a map")
            step = meta.get("step", -1)
            error, push_error = meta.get("error"), meta.get("push_error")
            hidden = deserialize_torch_tensor(msg.tensors[0]) if len(msg.tensors) == 1 else None
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise RemoteError(f"malformed reply: {e}") from e
        return cls(step, hidden, None if error is None else str(error), None if push_error is None else str(push_error))


def read_response(msg: runtime_pb2.ExpertResponse) -> torch.Tensor:
    """A step's output from a reply; RemoteError if the peer refused it."""
    reply = StepReply.from_proto(msg)
    if reply.error is not None or reply.hidden is None:
        raise RemoteError(reply.error or "malformed reply: expected one tensor")
    return reply.hidden
