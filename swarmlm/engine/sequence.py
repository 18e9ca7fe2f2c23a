"""A sequence being generated, and what a step reports for it: the engine's unit of work."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch

from swarmlm.engine.grammar import TokenMatcher
from swarmlm.engine.kv_cache import SequenceKV
from swarmlm.engine.sampling import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    sample_row,
    token_logprob,
    tokens_logprobs,
)
from swarmlm.engine.scheduler import SchedState


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """One generated continuation (a request with n > 1 has n of them)."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    user: str
    arrival: float
    generator: torch.Generator | None
    adapter: str | None = None  # the LoRA adapter it runs with (`--adapters`), None: the base model
    matcher: TokenMatcher | None = None  # its place in `params.grammar`, if constrained
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # with `params.prompt_logprobs`: each prompt token's, under the logits of the position before it (the
    # first token has none), filled in as prefill chunks run
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    kv: SequenceKV | None = None
    host_kv: SequenceKV | None = None  # offloaded cache of a preempted sequence (accelerators only)
    num_computed: int = 0  # tokens whose keys and values the executor holds (in `kv` when local)
    prefix_stored: bool = False
    text: str = ""
    emitted: int = 0  # characters of `text` already reported
    finish_reason: FinishReason | None = None
    error: str | None = None  # why the executor gave up on this sequence (finish reason ABORT)
    sched: SchedState = field(default_factory=SchedState)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def scores_prompt(self) -> bool:
        """Whether its next step's logits at every position are wanted: its prompt is being scored."""
        return self.params.prompt_logprobs is not None and self.num_computed < len(self.prompt_ids)

    def score_prompt(self, logits: torch.Tensor) -> None:
        """Record the prompt logprobs of a prefill chunk from `num_computed` on, given the logits at each of
        its positions (position p scores prompt token p + 1)."""
        start, n = self.num_computed, len(self.prompt_ids)
        if len(self.prompt_logprobs) != n:
            self.prompt_logprobs = [None] * n
        targets = self.prompt_ids[start + 1 : min(n, start + len(logits) + 1)]
        assert self.params.prompt_logprobs is not None
        for i, lp in enumerate(tokens_logprobs(logits, targets, self.params.prompt_logprobs)):
            self.prompt_logprobs[start + 1 + i] = lp

    def sample_token(self, raw_logits: torch.Tensor | int) -> tuple[int, TokenLogprob | None]:
        """Draw the next token from the model's logits for this sequence (penalties, its grammar, then its
        own sampler and generator), append it, and return it with its logprob when the request asked for them. An int
        is the token already taken (`decided_by_argmax`)."""
        if isinstance(raw_logits, int):
            self.output_ids.append(raw_logits)
            return raw_logits, None
        logits = raw_logits.clone()
        apply_penalties(logits, self.params, self.prompt_ids, self.output_ids)
        if self.matcher is not None:
            self.matcher.constrain_(logits)
        token = sample_row(logits, self.params, self.generator)
        if self.matcher is not None:
            self.matcher.consume(token)
        self.output_ids.append(token)
        if self.params.logprobs is None:
            return token, None
        lp = token_logprob(raw_logits, token, self.params.logprobs)
        self.logprobs.append(lp)
        return token, lp

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - n) : end - n]


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int | None  # None when the sequence only finished (aborted) this step
    text_delta: str
    logprob: TokenLogprob | None
    inter_token: float | None = None  # seconds since this sequence's previous token
