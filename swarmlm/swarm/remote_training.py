"""`RemoteCausalLM`: fine-tune a model whose layers live on swarm peers, as an ordinary PyTorch module.

The client holds the embeddings and the head (as `RemoteModel` does) and every trainable tensor: prompt
embeddings put before each row (prompt tuning), LoRA adapters for every layer (sent to the peers with
each pass, `model/lora.py`), and optionally its own copy of the head. The layers run on the peers
through `RemoteSequential`, so `loss.backward()` reaches the adapters and the prompt through the swarm:

    remote = RemoteModel(initial_peers=[...], config=ClientConfig(wire_dtype="fp32"))
    tuned = remote.fine_tuning(prompt_tokens=8, lora_rank=8)
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-3)
    loss = tuned.loss(batch)        # batch: [rows, tokens] of token ids
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    tuned.save_adapter("my-adapter")  # a peft LoRA adapter folder
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.llama import LlamaSpan
from swarmlm.model.lora import LORA_ALPHA_PER_RANK, init_lora, save_adapter
from swarmlm.swarm.remote_sequential import RemoteSequential
from swarmlm.swarm.sequence_manager import RemoteSequenceManager


class RemoteCausalLM(nn.Module):
    def __init__(
        self,
        edges: LlamaSpan,
        manager: RemoteSequenceManager,
        model_id: str,
        *,
        prompt_tokens: int = 0,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        train_head: bool = False,
        seed: int = 0,
    ) -> None:
        """`edges`: the model's embeddings and head (`LlamaSpan.edges_only`), frozen; `lora_alpha`
        defaults to twice the rank (as `swarmlm train --lora`)."""
        super().__init__()
        if prompt_tokens < 0 or lora_rank < 0:
            raise ValueError("prompt_tokens and lora_rank are counts (0: none)")
        self.edges, self.model_id = edges.requires_grad_(False), model_id
        cfg = edges.cfg
        gen = torch.Generator().manual_seed(seed)
        self.prompt: nn.Parameter | None = None
        if prompt_tokens:  # random rows of the embeddings' scale
            assert edges.embed_tokens is not None
            scale = edges.embed_tokens.weight.std().item()
            self.prompt = nn.Parameter(torch.randn(prompt_tokens, cfg.hidden_size, generator=gen) * scale)
        adapters = init_lora(cfg, range(cfg.num_layers), lora_rank, seed) if lora_rank else {}
        self.lora_names = list(adapters)
        self.lora = nn.ParameterList(nn.Parameter(t) for t in adapters.values())
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else LORA_ALPHA_PER_RANK * lora_rank)
        if train_head:  # a copy of its own: with tied weights the head is also the (frozen) embeddings
            assert edges.lm_head is not None
            edges.lm_head.weight = nn.Parameter(edges.lm_head.weight.detach().clone())
        self.body = RemoteSequential(manager)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 1.0

    def adapters(self) -> dict[str, Tensor]:
        return dict(zip(self.lora_names, self.lora, strict=True))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, ids: Tensor) -> Tensor:
        """Logits [rows, tokens, vocab] for token ids [rows, tokens] (the prompt's positions left out)."""
        h = self.edges.embed(ids)
        skip = 0
        if self.prompt is not None:
            skip = self.prompt.shape[0]
            h = torch.cat([self.prompt.to(h.dtype).expand(h.shape[0], -1, -1), h], dim=1)
        h = self.body(h, self.adapters(), self.lora_scale)
        return self.edges.head(h[:, skip:])

    def loss(self, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy over rows of token ids [rows, tokens]."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def save_adapter(self, out_dir: str | Path) -> None:
        """The LoRA adapters as a peft adapter folder, which `--adapters NAME=FOLDER` serves."""
        if not self.lora_rank:
            raise ValueError("this model trains no LoRA adapters (lora_rank=0)")
        save_adapter(out_dir, self.adapters(), self.lora_alpha, self.model_id)
