"""Sampling parameters and the batched sampler.

Every sequence owns a `torch.Generator` seeded from its request, so a seeded request produces the
same text whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from swarmlm.engine.grammar import Grammar

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to report with each sampled token
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (vLLM's name)
    grammar: Grammar | None = None  # structured output: what the text must parse as (engine/grammar.py)

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 or positive"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely alternatives


def choice_generator(params: SamplingParams, index: int) -> torch.Generator | None:
    """The random stream of choice `index` of a request (None when greedy): a seeded request's choice i
    draws from seed + i, so each of its n choices is reproducible on its own."""
    if params.greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed + index if params.seed is not None else torch.seed())
    return generator


def apply_penalties(logits: Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    """In place on one row: repetition penalty over prompt and output (HF/vLLM semantics), presence and
    frequency penalties over the output (OpenAI semantics)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty


def decided_by_argmax(params: SamplingParams) -> bool:
    """Greedy without penalties or logprobs: the token is the row's argmax, taken where the logits are, so
    on an accelerator only the token ids come back to the host."""
    plain = params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
    return params.greedy and plain and params.logprobs is None and params.grammar is None


def argmax_rows(logits: Tensor) -> list[int]:
    if logits.device.type == "cpu":  # torch's CPU argmax over a 49k vocabulary: ~100 us a row; numpy's: ~5 us
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token from one row of (already penalised) logits."""
    if params.greedy:
        return argmax_rows(logits[None])[0]
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(raw_logits: Tensor, token_id: int, top: int) -> TokenLogprob:
    """Log-probabilities under the model's own distribution (before penalties and temperature), as vLLM
    reports them by default."""
    logprobs = raw_logits.log_softmax(-1)
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = logprobs.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), alternatives)


def tokens_logprobs(raw_logits: Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """`token_logprob` for many rows at once: row i scores `token_ids[i]` (a prompt's tokens, each under
    the logits of the position before it)."""
    logprobs = raw_logits[: len(token_ids)].float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, dtype=torch.long, device=logprobs.device)[:, None])[:, 0]
    values, ids = logprobs.topk(top) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return [
        TokenLogprob(t, lp, list(zip(i, v, strict=True)))
        for t, lp, i, v in zip(token_ids, chosen.tolist(), ids.tolist(), values.tolist(), strict=True)
    ]
