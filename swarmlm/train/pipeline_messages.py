"""Messages between the stages of a pipeline-trained model (train/pipeline_stage.py).

A peer driving a micro-batch asks a peer of another stage for one of four things, each one request and
one reply on a fresh stream (core/stream_call.py):

    forward   the stage's output for `x` (no gradients kept)
    backward  `x` again with `grad` (d loss / d output): the peer recomputes its forward pass, adds the
              gradients of its weights to what its next optimizer step applies, and answers d loss / d x
    loss      the last stage: the mean next-token loss of `x` against `targets`; with `train`, also its
              weights' gradients (as backward) and d loss / d x
    (x is token ids for the first stage, hidden states [batch, length, hidden] for the others)

Nothing is kept between calls, so a retry may go to any peer of the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

KINDS = ("forward", "backward", "loss")


class StageCallError(RuntimeError):
    """A stage peer refused a call, or its reply is garbled; the message says why."""


@dataclass
class StageCall:
    kind: str
    stage: int
    run_id: str  # the run's id: a peer of another run refuses
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # x, and grad or targets
    train: bool = False  # loss: also backward

    def to_proto(self) -> runtime_pb2.ExpertRequest:
        meta = {
            "kind": self.kind,
            "stage": self.stage,
            "run": self.run_id,
            "train": self.train,
            "names": list(self.tensors),
        }
        tensors = [serialize_torch_tensor(t) for t in self.tensors.values()]
        return runtime_pb2.ExpertRequest(tensors=tensors, metadata=msgpack.packb(meta))

    @classmethod
    def from_proto(cls, msg: runtime_pb2.ExpertRequest) -> StageCall:
        try:
            meta = msgpack.unpackb(msg.metadata) if msg.metadata else None
            if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
                raise ValueError(f"a stage call's kind is one of {', '.join(KINDS)}")
            names = meta.get("names")
            if not isinstance(names, list) or len(names) != len(msg.tensors) or "x" not in names:
                raise ValueError("a stage call names its tensors, x among them")
            if type(meta.get("stage")) is not int or not isinstance(meta.get("run"), str):
                raise ValueError("a stage call names its stage and run")
            tensors = {str(n): deserialize_torch_tensor(t) for n, t in zip(names, msg.tensors, strict=True)}
        except (ValueError, TypeError, RuntimeError, msgpack.UnpackException) as e:
            raise StageCallError(f"malformed stage call: {e}") from e
        return cls(meta["kind"], meta["stage"], meta["run"], tensors, bool(meta.get("train")))


@dataclass
class StageReply:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # out (forward) or grad (d loss / d x)
    loss: float | None = None
    error: str | None = None

    def to_proto(self) -> runtime_pb2.ExpertResponse:
        meta: dict[str, Any] = {"names": list(self.tensors), "loss": self.loss, "error": self.error}
        tensors = [serialize_torch_tensor(t) for t in self.tensors.values()]
        return runtime_pb2.ExpertResponse(tensors=tensors, metadata=msgpack.packb(meta))

    @classmethod
    def from_proto(cls, msg: runtime_pb2.ExpertResponse) -> StageReply:
        """The reply; StageCallError if the peer refused the call or the reply is garbled."""
        try:
            meta = msgpack.unpackb(msg.metadata) if msg.metadata else None
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a map")
            if meta.get("error") is not None:
                raise StageCallError(str(meta["error"]))
            names = meta.get("names", [])
            if not isinstance(names, list) or len(names) != len(msg.tensors):
                raise ValueError("tensor names do not match the tensors")
            tensors = {str(n): deserialize_torch_tensor(t) for n, t in zip(names, msg.tensors, strict=True)}
            loss = meta.get("loss")
        except StageCallError:
            raise
        except (ValueError, TypeError, RuntimeError, msgpack.UnpackException) as e:
            raise StageCallError(f"malformed reply: {e}") from e
        return cls(tensors, None if loss is None else float(loss))
