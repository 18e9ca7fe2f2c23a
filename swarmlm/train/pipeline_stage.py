"""A pipeline stage's server: every micro-batch through this peer's stage of the model, its own included.

Each peer of a pipeline-trained run (`swarmlm train --pipeline-stages K`) holds one stage: a contiguous
range of layers, with the embeddings on the first stage and the final norm and head on the last. Peers
driving micro-batches call it (pipeline_messages.py; the peer's own driver calls it in-process) for
forward passes without gradients and, in their backward pass, for backward passes: the stage recomputes
its forward pass with autograd, and the gradients of its weights go straight into an optimizer step
(`on_gradients`). So a stage's weights take one step per micro-batch that goes through them, whichever
peer drove it, as one process training the whole model would.

Calls run one at a time while holding the trainer's weights lock, which its outer step and state
downloads take too: a call never sees weights half-updated. Nothing keeps an autograd graph across calls,
and the lock is never held across a call to another peer (two drivers waiting on each other's stages
would deadlock).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, AsyncIterator  # noqa: UP035 - hivemind's servicer recognises typing's alias, not collections.abc's

import torch
import torch.nn.functional as F
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from torch import Tensor, nn

from swarmlm.model.llama import LlamaSpan
from swarmlm.model.memory import layer_weight_bytes, span_weight_bytes
from swarmlm.model.model_config import ModelConfig
from swarmlm.train.pipeline_messages import StageCall, StageCallError, StageReply

MAX_TOKENS = 1 << 16  # batch x length of one call


def stage_layers(cfg: ModelConfig, stages: int) -> list[tuple[int, int]]:
    """Layers [start, end) of each stage (the first holds the embeddings as well, the last the final norm
    and head), split so that the stage with the most parameters has as few as can be: each peer's memory
    is its stage's weights times a fixed number of copies (gradients, AdamW, DiLoCo). A large vocabulary's
    embeddings weigh many layers of a small model (49,152 x 576: seven layers of the base preset)."""
    n = cfg.num_layers
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} pipeline stages for a model of {n} layers: give 1 to {n}")
    layer = layer_weight_bytes(cfg, "fp32", "none")
    embeddings = span_weight_bytes(cfg, 0, 1, True, "fp32", "none") - layer[0]
    head = span_weight_bytes(cfg, n - 1, n, True, "fp32", "none") - layer[-1]

    def cost(a: int, b: int) -> int:
        return sum(layer[a:b]) + (embeddings if a == 0 else 0) + (head if b == n else 0)

    # best[k][i]: (the largest stage, the split) for layers [0, i) in k stages; ties keep later cuts
    best: list[dict[int, tuple[int, list[int]]]] = [{0: (0, [0])}]
    for k in range(1, stages + 1):
        best.append({})
        for i in range(k, n - (stages - k) + 1):
            options = [(max(best[k - 1][j][0], cost(j, i)), best[k - 1][j][1] + [i]) for j in best[k - 1] if j < i]
            best[k][i] = min(options, key=lambda o: (o[0], [-c for c in o[1]]))
    cuts = best[stages][n][1]
    return list(itertools.pairwise(cuts))


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class StageServer(ServicerBase):
    def __init__(
        self,
        module: LlamaSpan,
        params: list[nn.Parameter],
        stage: int,
        stages: int,
        run_id: str,
        lock: AbstractContextManager[Any],
        on_gradients: Callable[[list[Tensor]], None],
    ) -> None:
        """`on_gradients(grads)`: one optimizer step with these gradients of `params` (called holding `lock`)."""
        self.module, self.params, self.stage, self.stages, self.run_id = module, params, stage, stages, run_id
        self.lock, self.on_gradients = lock, on_gradients
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="swarmlm-stage")

    async def rpc_stage(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        request = await anext(aiter(requests), None)
        if request is None:
            return
        try:
            call = StageCall.from_proto(request)
            reply = await asyncio.wrap_future(self._pool.submit(self.handle, call))
        except (StageCallError, ValueError) as e:
            reply = StageReply(error=str(e))
        yield reply.to_proto()

    def handle(self, call: StageCall) -> StageReply:
        """Answer one call (from another peer, or our own driver); StageCallError for a bad one."""
        self._check(call)
        return self._compute(call)

    def _check(self, call: StageCall) -> None:
        if call.run_id != self.run_id or call.stage != self.stage:
            raise StageCallError(
                f"this peer trains stage {self.stage} of run {self.run_id}, not {call.stage} of {call.run_id}"
            )
        x = call.tensors["x"]
        first = self.stage == 0
        if (
            (x.ndim != 2 or x.is_floating_point())
            if first
            else (x.ndim != 3 or x.shape[-1] != self.module.cfg.hidden_size)
        ):
            what = (
                "token ids [batch, length]"
                if first
                else f"hidden states [batch, length, {self.module.cfg.hidden_size}]"
            )
            raise StageCallError(f"stage {self.stage} takes {what}, not {tuple(x.shape)}")
        if x.shape[0] * x.shape[1] > MAX_TOKENS or x.shape[1] > self.module.cfg.max_position_embeddings:
            raise StageCallError(f"{tuple(x.shape[:2])} tokens: too many for one call")
        last = self.stage == self.stages - 1
        if (call.kind == "loss") != last:
            raise StageCallError(
                f"stage {self.stage} of {self.stages} answers {'loss' if last else 'forward and backward'} calls"
            )
        if call.kind == "backward" and call.tensors.get("grad", torch.empty(0)).shape[:2] != x.shape[:2]:
            raise StageCallError("a backward call carries the gradient of the stage's output, shaped like it")
        if call.kind == "loss" and call.tensors.get("targets", torch.empty(0)).shape != x.shape[:2]:
            raise StageCallError("a loss call carries the targets [batch, length]")

    def _compute(self, call: StageCall) -> StageReply:
        x = call.tensors["x"]
        x = x.long() if self.stage == 0 else x.to(self.params[0].dtype)
        positions = torch.arange(x.shape[1])
        with self.lock:
            if call.kind == "forward":
                with torch.no_grad():
                    return StageReply({"out": self.module(x, positions)})
            wants_input = x.is_floating_point()
            if wants_input:
                x.requires_grad_(True)
            inputs = [*self.params, *([x] if wants_input else [])]
            with torch.enable_grad():
                out = self.module(x, positions)
                if call.kind == "loss":
                    loss = next_token_loss(out, call.tensors["targets"].long())
                    if not call.train:
                        return StageReply(loss=loss.item())
                    grads = torch.autograd.grad(loss, inputs)
                else:
                    loss = None
                    grads = torch.autograd.grad(out, inputs, call.tensors["grad"].to(out.dtype))
            self.on_gradients(list(grads[: len(self.params)]))
        reply = StageReply({"grad": grads[-1]} if wants_input else {})
        reply.loss = None if loss is None else loss.item()
        return reply

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


STAGE_HANDLER = StageServer._get_handle_name(None, "rpc_stage")
