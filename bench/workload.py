"""Deterministic serving workloads: Poisson arrivals with heavy-tailed prompt and output lengths.

Heavy tails matter: a few long jobs among many short ones is exactly where FCFS suffers head-of-line
blocking and a preemptive scheduler (MLFQ) should win, so the default distributions are lognormal.
Every request forces its output length (max_tokens + ignore_eos, greedy) so that every backend does the
same amount of decode work whatever text the model produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Real English (not random tokens), so tokenizers behave as in production. Prompts are this paragraph
# repeated and cut to a word count.
PARAGRAPH = (
    "The river town woke slowly on winter mornings. Fishermen pushed their boats into the grey water "
    "while the baker on the corner pulled the first loaves from an oven that had been burning since "
    "four. Children walked to school along the embankment, counting the gulls and arguing about "
    "whether the ice would hold by the end of the month. At the library, the old clerk unlocked the "
    "doors, wound the clock above the reading room and set out the newspapers that had arrived on the "
    "night train. Nobody in town remembered a time when the clock had been right, but everyone agreed "
    "that it would be strange to stop winding it now. "
)
_WORDS = PARAGRAPH.split()
# SmolLM2's tokenizer gives 128 tokens for this paragraph's 112 words; counts need only be roughly as drawn.
TOKENS_PER_WORD = 1.14


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float  # scheduled send time, seconds after the run starts
    prompt: str
    prompt_tokens: int  # drawn (approximate) prompt length in tokens
    max_tokens: int  # forced output length


def make_prompt(n_tokens: int, offset: int = 0) -> str:
    """English text of roughly n_tokens tokens; offset rotates the start so prompts differ."""
    n_words = max(1, round(n_tokens / TOKENS_PER_WORD))
    return " ".join(_WORDS[(offset + i) % len(_WORDS)] for i in range(n_words))


def _lognormal_ints(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def poisson_workload(
    rate: float,
    n: int,
    seed: int = 0,
    prompt_median: float = 96,
    prompt_range: tuple[int, int] = (16, 1024),
    output_median: float = 32,
    output_range: tuple[int, int] = (4, 512),
    sigma: float = 1.0,
) -> list[Request]:
    """n requests with exponential inter-arrival gaps at `rate` req/s and lognormal lengths.

    The lengths come from their own seeded stream, independent of the rate, so every rate in a sweep
    replays exactly the same jobs; only how tightly they are packed in time changes.
    """
    lengths = np.random.default_rng(seed)
    prompts = _lognormal_ints(lengths, n, prompt_median, sigma, *prompt_range)
    outputs = _lognormal_ints(lengths, n, output_median, sigma, *output_range)
    arrivals = np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, n))
    arrivals -= arrivals[0]  # first request goes at t=0: no idle lead-in inflating the run time
    return [
        Request(i, float(arrivals[i]), make_prompt(int(prompts[i]), offset=7 * i), int(prompts[i]), int(outputs[i]))
        for i in range(n)
    ]


def fixed_workload(n: int, prompt_tokens: int, output_tokens: int) -> list[Request]:
    """n identical-size requests, all due at t=0 (used by the closed-loop phases)."""
    return [Request(i, 0.0, make_prompt(prompt_tokens, offset=7 * i), prompt_tokens, output_tokens) for i in range(n)]


def request_body(req: Request, model: str) -> dict:
    """The /v1/completions JSON body: streamed, greedy, exactly max_tokens tokens, no prompt cache."""
    return {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM/llama.cpp extension: decode the full max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
        # llama.cpp reuses KV across requests sharing a prefix; our prompts share one, so turn it off
        # to keep the comparison about scheduling and kernels, not cache hits.
        "cache_prompt": False,
    }
