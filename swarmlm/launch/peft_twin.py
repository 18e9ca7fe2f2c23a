"""The one-process twin of a `RemoteCausalLM`: the same model in this process, with peft's own LoRA.

Fine-tuning through the swarm is checked against it (tests/test_swarm_training.py, `make bench-finetune`):
the twin starts from the remote module's prompt rows and adapters, steps its own copies with the same
optimizer and data, and runs every layer here under peft, so the only thing the two share is the base
weights and the starting values.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from swarmlm.model.llama import LlamaSpan
from swarmlm.model.lora import LORA_TARGETS
from swarmlm.swarm.remote_training import RemoteCausalLM


def peft_name(name: str) -> str:
    """peft's name of an adapter tensor in a model it wrapped: layers.0.mlp.down_proj.lora_A ->
    base_model.model.layers.0.mlp.down_proj.lora_A.default.weight."""
    return f"base_model.model.{name}.default.weight"


class PeftTwin(nn.Module):
    def __init__(self, whole: LlamaSpan, tuned: RemoteCausalLM) -> None:
        """`whole`: the model's every layer with its edges (copied, not changed)."""
        super().__init__()
        span = copy.deepcopy(whole).float().requires_grad_(False)
        self.span, self.net = span, span
        self.params: list[nn.Parameter] = []  # in the order of tuned.trainable_parameters()
        if tuned.lora_rank:
            lora = LoraConfig(
                r=tuned.lora_rank, lora_alpha=tuned.lora_alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0
            )
            self.net = get_peft_model(span, lora)
            named = dict(self.net.named_parameters())
            for name, value in tuned.adapters().items():
                param = named[peft_name(name)]
                with torch.no_grad():
                    param.copy_(value)
                self.params.append(param)
        self.prompt = None
        if tuned.prompt is not None:
            self.prompt = nn.Parameter(tuned.prompt.detach().clone())
            self.params.insert(0, self.prompt)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.span.embed(ids)
        skip = 0
        if self.prompt is not None:
            skip = self.prompt.shape[0]
            h = torch.cat([self.prompt.expand(h.shape[0], -1, -1), h], dim=1)
        return self.net(h, torch.arange(h.shape[1]))[:, skip:]

    def loss(self, ids: Tensor) -> Tensor:
        logits = self(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
