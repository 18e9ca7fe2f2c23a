"""Where an engine step's forward pass runs, and where the sequences' KV caches live.

The engine (engine.py) decides *what* a step does: which sequences, how many tokens each, what to sample.
An executor runs it. `LocalExecutor` holds the whole model and every sequence's KV cache in this process.
`swarmlm.swarm.remote_executor.SwarmExecutor` keeps only the embeddings and the head here and sends each
sequence's hidden states through the swarm's peers, who keep its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from swarmlm.core.sizes import KV_DEFAULT_MAX
from swarmlm.engine.kv_cache import KVCacheManager, KVLayout
from swarmlm.engine.runner import ModelRunner, Segment
from swarmlm.engine.sequence import Sequence
from swarmlm.model.llama import LlamaSpan
from swarmlm.model.lora import LoraAdapter
from swarmlm.model.memory import MemoryBudget


@dataclass
class StepResult:
    completed: list[tuple[Sequence, int]]  # the steps (sequence, tokens) that finished in this call
    logits: Tensor  # [len(sampled), vocab]: one row per completed sequence whose step reached its last token
    sampled: list[Sequence]
    failed: dict[Sequence, str] = field(default_factory=dict)  # sequences the executor gave up on, and why
    # for each completed step of a sequence scoring its prompt (`scores_prompt`): [tokens, vocab] logits
    prompt_logits: dict[Sequence, Tensor] = field(default_factory=dict)


class Executor(Protocol):
    capacity_tokens: int  # the longest sequence (prompt plus output) one sequence may reach
    preemptions: int  # sequences whose KV was dropped to make room
    in_flight: bool  # steps launched by an earlier `forward` are still running (reported by a later one)

    def reserve(self, seq: Sequence, length: int, lower: list[Sequence]) -> bool:
        """Make room for `seq` to hold `length` tokens, preempting sequences of `lower` (ranked below it,
        best first) if needed. False: no room this step."""
        ...

    def forward(self, batch: list[tuple[Sequence, int]]) -> StepResult:
        """Launch each sequence's next `n` tokens (from `seq.num_computed`); return the steps that finished
        (this batch, for an executor that runs one step at a time)."""
        ...

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was aborted: free what it holds."""
        ...

    def adapter_names(self) -> list[str]:
        """The LoRA adapters a request may name."""
        ...

    @property
    def kv_usage(self) -> float: ...  # fraction of the KV budget in use (0-1)

    @property
    def prefix_hits(self) -> int: ...

    @property
    def prefix_queries(self) -> int: ...


class LocalExecutor:
    """The whole model in this process: one batched forward pass over a budgeted, prefix-cached KV store."""

    in_flight = False

    def __init__(
        self,
        span: LlamaSpan,
        kv_budget_bytes: int | None,
        prefix_block: int = 16,
        adapters: dict[str, LoraAdapter] | None = None,
    ) -> None:
        """`adapters`: LoRA adapters by name, for requests that name one (on the model's device and dtype)."""
        if not span.is_whole:
            raise ValueError("a local executor needs the whole model (layers 0:N)")
        self.runner = ModelRunner(span)
        self.adapters = adapters or {}
        cfg = span.cfg
        layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.runner.dtype, self.runner.device)
        self.kv = KVCacheManager(layout, kv_budget_bytes or default_kv_budget(self.runner.device), prefix_block)
        self.preemptions = 0

    def embed(self, ids: list[int]) -> Tensor:
        """The last token's hidden state after the final norm, fp32 (one forward pass, no KV cache)."""
        span, device = self.runner.span, self.runner.device
        with torch.inference_mode():
            h = span(torch.tensor([ids], device=device), torch.arange(len(ids), device=device), normed_hidden=True)
        return h[0, -1].float().cpu()

    @property
    def capacity_tokens(self) -> int:
        return self.kv.capacity_tokens

    @property
    def kv_usage(self) -> float:
        return self.kv.usage

    @property
    def prefix_hits(self) -> int:
        return self.kv.prefix_hits

    @property
    def prefix_queries(self) -> int:
        return self.kv.prefix_queries

    def reserve(self, seq: Sequence, length: int, lower: list[Sequence]) -> bool:
        fresh = seq.kv is None
        if fresh and seq.host_kv is not None:
            length = max(length, seq.host_kv.length)
        while True:
            kv = self.kv.ensure(seq.kv, length)
            if kv is not None:
                seq.kv = kv
                break
            # Only sequences ranked below this one give way (never a higher-priority one).
            victim = next((s for s in reversed(lower) if s.kv is not None), None)
            if victim is None:
                return False
            self._preempt(victim)
        if fresh:
            if seq.host_kv is not None:
                seq.num_computed = self.kv.restore(seq.kv, seq.host_kv)
                seq.host_kv = None
            elif seq.num_computed == 0 and seq.params.prompt_logprobs is None:  # scored: every position runs
                seq.num_computed = self.kv.reuse_prefix(seq.kv, seq.prompt_ids, seq.adapter or "")
        return True

    def _preempt(self, seq: Sequence) -> None:
        seq.host_kv = self.kv.offload(seq.kv) if self.runner.device.type != "cpu" else None
        self.kv.free(seq.kv)
        seq.kv = None
        if seq.host_kv is None:
            seq.num_computed = 0  # recompute prompt and output so far on resume
        self.preemptions += 1

    def forward(self, batch: list[tuple[Sequence, int]]) -> StepResult:
        segments, inputs, sampled = [], [], []
        rows: list[int] = []  # the batch rows the head runs on
        sampling: list[int] = []  # where each sampled sequence's row is in `rows`
        scored: dict[Sequence, slice] = {}  # where a prompt-scoring sequence's rows are in `rows`
        row = 0
        for seq, n in batch:
            adapter = self.adapters[seq.adapter] if seq.adapter is not None else None
            segments.append(Segment(seq.kv, seq.num_computed, n, adapter))
            inputs.extend(seq.token_slice(seq.num_computed, seq.num_computed + n))
            if seq.scores_prompt():
                scored[seq] = slice(len(rows), len(rows) + n)
                rows.extend(range(row, row + n))
            row += n
            if seq.num_computed + n == seq.num_tokens:
                if seq not in scored:
                    rows.append(row - 1)
                sampling.append(len(rows) - 1)
                sampled.append(seq)
        logits = self.runner.forward(segments, torch.tensor(inputs), rows)
        for seq, n in batch:
            if not seq.prefix_stored and seq.num_computed + n >= len(seq.prompt_ids):
                self.kv.store_prefix(seq.kv, seq.prompt_ids, seq.adapter or "")
                seq.prefix_stored = True
        if not scored:  # the head ran on the sampling rows alone
            return StepResult(batch, logits, sampled)
        return StepResult(batch, logits[sampling], sampled, prompt_logits={s: logits[r] for s, r in scored.items()})

    def release(self, seq: Sequence) -> None:
        self.kv.free(seq.kv)
        seq.kv = seq.host_kv = None

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters)


def default_kv_budget(device: torch.device) -> int:
    """The default memory budget now that the weights are loaded (free memory less headroom), at most
    KV_DEFAULT_MAX: the rule of `swarmlm serve` (server.py), for an engine built without one."""
    return min(MemoryBudget.of(None, device).size, KV_DEFAULT_MAX)
