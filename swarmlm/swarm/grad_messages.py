"""Messages of fine-tuning through the swarm: a forward or backward pass through part of a peer's span.

Unlike an inference session, these keep no state on the peer (Petals' rpc_forward / rpc_backward): a
forward request carries the span's input, a backward request carries the same input again with the
gradient of the loss with respect to the span's output, and the peer recomputes the forward pass to
answer the gradients with respect to the input and to the LoRA adapters sent along. Each call is one
request and one reply on a fresh stream of the peer's `rpc_forward` or `rpc_backward` handler (a stream,
not a unary call: a batch of activations can outgrow hivemind's unary message limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarmlm.swarm.messages import ProtocolError, RemoteError


@dataclass
class GradRequest:
    model_id: str
    start: int  # the layers [start, end) to run, within the peer's span
    end: int
    hidden: torch.Tensor  # [batch, length, hidden_size]: the input of layer `start`
    grad_output: torch.Tensor | None = None  # backward only: d loss / d output, shaped like `hidden`
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA tensors of layers [start, end)
    lora_scale: float = 1.0

    @property
    def backward(self) -> bool:
        return self.grad_output is not None

    def to_proto(self) -> runtime_pb2.ExpertRequest:
        meta = {
            "model_id": self.model_id,
            "span": [self.start, self.end],
            "backward": self.backward,
            "adapters": list(self.adapters),
            "lora_scale": self.lora_scale,
        }
        tensors = [self.hidden, *([self.grad_output] if self.grad_output is not None else []), *self.adapters.values()]
        return runtime_pb2.ExpertRequest(
            tensors=[serialize_torch_tensor(t) for t in tensors], metadata=msgpack.packb(meta)
        )

    @classmethod
    def from_proto(cls, msg: runtime_pb2.ExpertRequest) -> GradRequest:
        try:
            meta = msgpack.unpackb(msg.metadata) if msg.metadata else None
            if not isinstance(meta, dict):
                raise ProtocolError("a forward or backward request carries a metadata map")
            span, names, backward = meta.get("span"), meta.get("adapters", []), meta.get("backward")
            if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
                raise ProtocolError("span is [start, end]")
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ProtocolError("adapters is a list of tensor names")
            if not isinstance(backward, bool) or not isinstance(meta.get("model_id"), str):
                raise ProtocolError("a request names its model_id and whether it is a backward pass")
            scale = meta.get("lora_scale", 1.0)
            if not isinstance(scale, int | float) or isinstance(scale, bool):
                raise ProtocolError("lora_scale is a number")
            want = 1 + int(backward) + len(names)
            if len(msg.tensors) != want or len(set(names)) != len(names):
                got = len(msg.tensors)
                raise ProtocolError(f"expected {want} tensors (input, gradient, distinct adapters), got {got}")
            tensors = [deserialize_torch_tensor(t) for t in msg.tensors]
        except ProtocolError:
            raise
        except (ValueError, TypeError, RuntimeError, msgpack.UnpackException) as e:
            raise ProtocolError(f"malformed request: {e}") from e
        grad = tensors[1] if backward else None
        adapters = dict(zip(names, tensors[1 + int(backward) :], strict=True))
        return cls(meta["model_id"], span[0], span[1], tensors[0], grad, adapters, float(scale))


@dataclass
class GradReply:
    """A forward pass's output, or a backward pass's gradients (`grad_input` and one per adapter)."""

    output: torch.Tensor | None = None
    grad_input: torch.Tensor | None = None
    grad_adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    error: str | None = None

    def to_proto(self) -> runtime_pb2.ExpertResponse:
        meta: dict[str, Any] = {"adapters": list(self.grad_adapters)}
        if self.error is not None:
            meta["error"] = self.error
        first = self.output if self.output is not None else self.grad_input
        tensors = [] if first is None else [first, *self.grad_adapters.values()]
        return runtime_pb2.ExpertResponse(
            tensors=[serialize_torch_tensor(t) for t in tensors], metadata=msgpack.packb(meta)
        )

    @classmethod
    def from_proto(cls, msg: runtime_pb2.ExpertResponse, backward: bool) -> GradReply:
        """The reply to a request of that kind; RemoteError if the peer refused it or the reply is garbled."""
        try:
            meta = msgpack.unpackb(msg.metadata) if msg.metadata else {}
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a map")
            if meta.get("error") is not None:
                raise RemoteError(str(meta["error"]))
            names = meta.get("adapters", [])
            if not isinstance(names, list) or len(msg.tensors) != 1 + len(names):
                raise ValueError(f"{len(msg.tensors)} tensors for {names!r}")
            tensors = [deserialize_torch_tensor(t) for t in msg.tensors]
        except RemoteError:
            raise
        except (ValueError, TypeError, RuntimeError, msgpack.UnpackException) as e:
            raise RemoteError(f"malformed reply: {e}") from e
        if not backward:
            return cls(output=tensors[0])
        return cls(grad_input=tensors[0], grad_adapters=dict(zip(map(str, names), tensors[1:], strict=True)))
