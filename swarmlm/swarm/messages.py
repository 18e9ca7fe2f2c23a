"""Messages between a client and the peers of its chain, on hivemind's protobufs.

An inference session is one bidirectional P2P stream per hop. The client's first message carries the
session header; every message carries one step: the hidden states of the new tokens and the position of
the first. The peer answers each step with its span's output, or with an error and ends the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
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
class StepRequest:
    hidden: torch.Tensor  # [n, hidden_size]
    position: int
    header: dict[str, Any] | None = None  # first message only: session_id, model_id, start, end, max_length

    def to_proto(self) -> runtime_pb2.ExpertRequest:
        meta = {"position": self.position, **({"header": self.header} if self.header else {})}
        return runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(self.hidden)], metadata=msgpack.packb(meta))

    @classmethod
    def from_proto(cls, msg: runtime_pb2.ExpertRequest) -> StepRequest:
        try:
            meta = msgpack.unpackb(msg.metadata) if msg.metadata else {}
            if len(msg.tensors) != 1 or not isinstance(meta.get("position"), int):
                raise ProtocolError("a step carries one tensor and an integer position")
            header = meta.get("header")
            if header is not None and not isinstance(header, dict):
                raise ProtocolError("malformed session header")
            hidden = deserialize_torch_tensor(msg.tensors[0])
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise ProtocolError(f"malformed step: {e}") from e
        return cls(hidden, meta["position"], header)


def step_response(hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(hidden)])


def error_response(message: str) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"error": message}))


def read_response(msg: runtime_pb2.ExpertResponse) -> torch.Tensor:
    if msg.metadata:
        meta = msgpack.unpackb(msg.metadata)
        if isinstance(meta, dict) and "error" in meta:
            raise RemoteError(str(meta["error"]))
    if len(msg.tensors) != 1:
        raise RemoteError("malformed reply: expected one tensor")
    return deserialize_torch_tensor(msg.tensors[0])
