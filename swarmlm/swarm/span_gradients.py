"""A peer's side of fine-tuning through the swarm: forward and backward passes of its span, frozen weights.

A client that fine-tunes a model split across peers (`swarm/remote_sequential.py`) keeps every trainable
tensor itself: prompt embeddings, the head, LoRA adapters of every layer. It sends each peer the input
of the layers it runs and, for LoRA, the adapters of those layers (`grad_messages.py`). The peer runs the
plain causal forward pass that training uses (no KV cache), and for a backward request runs it again with
autograd on and returns the gradients with respect to the input and to each adapter. The peer keeps
nothing between calls, so a retry may go to any peer serving those layers.

Passes run one at a time on a thread of their own, beside the inference engine's thread (they share the
weights; the adapters are an argument of the forward pass, so they reach only these passes).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from swarmlm.model.llama import LlamaSpan
from swarmlm.model.lora import LoraAdapter, LoraError, check_adapters
from swarmlm.swarm.grad_messages import GradReply, GradRequest

MAX_TOKENS = 1 << 16  # batch x length of one request: its activations are kept for the backward pass


class GradError(ValueError):
    """A forward or backward request this peer cannot serve; the message goes back to the client."""


class SpanGradients:
    def __init__(self, refusal: str | None = None) -> None:
        """`refusal`: why this peer answers no training passes (None: it does)."""
        self.refusal = refusal
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="swarmlm-gradients")

    async def run(self, span: LlamaSpan, model_id: str, request: GradRequest) -> GradReply:
        """The reply to `request` for `span` (layers of `model_id`); GradError if it is refused."""
        self.check(span, model_id, request)
        return await asyncio.wrap_future(self._pool.submit(self._compute, span, request))

    def check(self, span: LlamaSpan, model_id: str, r: GradRequest) -> None:
        if self.refusal is not None:
            raise GradError(self.refusal)
        cfg = span.cfg
        if r.model_id != model_id or not span.start <= r.start < r.end <= span.end:
            raise GradError(
                f"this peer serves {model_id} layers {span.start}:{span.end}, not {r.model_id} layers {r.start}:{r.end}"
            )
        x = r.hidden
        if x.ndim != 3 or x.shape[-1] != cfg.hidden_size or not x.is_floating_point() or x.numel() == 0:
            raise GradError(f"expected hidden states [batch, length, {cfg.hidden_size}], got {tuple(x.shape)}")
        if x.shape[1] > cfg.max_position_embeddings or x.shape[0] * x.shape[1] > MAX_TOKENS:
            raise GradError(
                f"{x.shape[0]} x {x.shape[1]} tokens: at most {cfg.max_position_embeddings} a row and "
                f"{MAX_TOKENS} a request"
            )
        if r.grad_output is not None and r.grad_output.shape != x.shape:
            raise GradError(f"the output gradient is {tuple(r.grad_output.shape)}, the input {tuple(x.shape)}")
        try:
            check_adapters(cfg, r.adapters, r.start, r.end)
        except LoraError as e:
            raise GradError(str(e)) from e

    def _compute(self, span: LlamaSpan, r: GradRequest) -> GradReply:
        first_layer = span.start
        weight = next(span.parameters())
        x = r.hidden.to(weight.device, weight.dtype)
        adapters = {n: t.to(weight.device, torch.float32) for n, t in r.adapters.items()}
        lora = LoraAdapter(adapters, r.lora_scale) if adapters else None
        blocks = (r.start - first_layer, r.end - first_layer)
        positions = torch.arange(x.shape[1], device=x.device)
        if r.grad_output is None:
            with torch.no_grad():
                out = span(x, positions, blocks=blocks, lora=lora)
            return GradReply(output=out.to("cpu", r.hidden.dtype))
        leaves = [x, *adapters.values()]
        for leaf in leaves:
            leaf.requires_grad_(True)
        with torch.enable_grad():
            out = span(x, positions, blocks=blocks, lora=lora)
            grads = torch.autograd.grad(out, leaves, r.grad_output.to(out.device, out.dtype))
        return GradReply(
            grad_input=grads[0].to("cpu", r.hidden.dtype),
            grad_adapters={n: g.to("cpu") for n, g in zip(adapters, grads[1:], strict=True)},
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
