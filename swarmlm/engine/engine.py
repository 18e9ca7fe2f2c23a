"""One peer's inference engine: continuous batching with chunked prefill, under a KV budget.

Each `step()` asks the scheduler for a ranking of all unfinished sequences, packs the best of them into
one batch (decode tokens and prefill chunks together, up to `max_step_tokens` and `max_batch_seqs`),
runs one forward pass, samples, and reports what each sequence produced. A sequence that is not picked
is preempted for that step; if KV memory is short, the lowest-ranked sequences lose their cache
(offloaded to host memory on an accelerator, otherwise dropped and recomputed on resume).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarmlm.engine.executor import Executor, LocalExecutor
from swarmlm.engine.sampling import SamplingParams, argmax_rows, choice_generator, decided_by_argmax
from swarmlm.engine.scheduler import Scheduler
from swarmlm.engine.sequence import FinishReason, Sequence, StepOutput
from swarmlm.engine.stopping import StopChecker
from swarmlm.model.loading import LoadedModel
from swarmlm.model.tokenizer import Tokenizer


@dataclass
class EngineConfig:
    kv_budget_bytes: int | None = None  # None: a share of the memory free at start
    max_batch_seqs: int = 32
    max_step_tokens: int = 256  # prefill chunk budget per step: bounds how long running streams stall
    max_model_len: int | None = None  # None: the model's context length
    prefix_block: int = 16


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        scheduler: Scheduler,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
    ) -> None:
        """`model` gives the tokenizer and config; the forward passes run on `executor` (by default the
        whole `model` in this process)."""
        self.model = model
        self.config = config = config or EngineConfig()
        self.tokenizer: Tokenizer = model.tokenizer
        self.scheduler = scheduler
        self.clock = clock
        self.executor = executor or LocalExecutor(model.span, config.kv_budget_bytes, config.prefix_block)
        self.stopper = StopChecker(self.tokenizer, model.config.max_position_embeddings, config.max_model_len)
        self.max_model_len = self.stopper.max_model_len
        self.active: list[Sequence] = []
        self.prefill_seconds_per_token = 0.0
        self.decode_step_seconds = 0.0
        self.steps = 0
        self._ids = itertools.count()

    # ----- requests -------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> None:
        """Raise ValueError, with a message for the client, for a request this engine cannot serve."""
        if adapter is not None and adapter not in (names := self.executor.adapter_names()):
            raise ValueError(f"no LoRA adapter {adapter!r} here; adapters: {', '.join(names) or 'none'}")
        self.stopper.validate(prompt_ids, params)
        need = len(prompt_ids) + params.max_tokens
        if need > self.executor.capacity_tokens:
            raise ValueError(
                f"the request needs {need} tokens of KV cache but this peer's budget holds "
                f"{self.executor.capacity_tokens}"
            )
        self._check_vocabulary(prompt_ids)

    def _check_vocabulary(self, prompt_ids: list[int]) -> None:
        if bad := [t for t in prompt_ids if not 0 <= t < self.model.config.vocab_size]:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary")

    def add(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        user: str = "",
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> list[Sequence]:
        """Queue a request (run with the LoRA adapter named `adapter`, if any); returns its n sequences."""
        self.validate(prompt_ids, params, adapter)
        request_id = request_id or f"req-{next(self._ids)}"
        now = self.clock()
        seqs = []
        for i in range(n):
            generator, matcher = choice_generator(params, i), params.grammar.matcher() if params.grammar else None
            seq = Sequence(request_id, i, list(prompt_ids), params, user, now, generator, adapter, matcher=matcher)
            self.scheduler.admit(seq, now, self.prefill_seconds_per_token * len(prompt_ids))
            seqs.append(seq)
        self.active.extend(seqs)
        return seqs

    def abort(self, request_id: str) -> list[StepOutput]:
        outs = []
        for seq in [s for s in self.active if s.request_id == request_id]:
            self._finish(seq, FinishReason.ABORT)
            outs.append(StepOutput(seq, None, "", None))
        return outs

    def embed(self, prompt_ids: list[int]) -> torch.Tensor:
        """The prompt's embedding: its last token's hidden state after the final norm, L2-normalized (the
        pooling vLLM gives decoder models). Engine thread only (`AsyncEngine.call`). ValueError for a
        prompt it cannot embed."""
        if not isinstance(self.executor, LocalExecutor):
            raise ValueError("embeddings need the whole model in one process: ask a `swarmlm serve` server")
        if not prompt_ids or len(prompt_ids) > self.max_model_len:
            raise ValueError(f"an input must have 1 to {self.max_model_len} tokens, not {len(prompt_ids)}")
        self._check_vocabulary(prompt_ids)
        return torch.nn.functional.normalize(self.executor.embed(prompt_ids), dim=0)

    @property
    def has_work(self) -> bool:
        return bool(self.active)

    # ----- one step -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Launch the best sequences' next tokens and report what finished: with the local executor that is
        this step's batch; a swarm executor may report steps launched earlier (several in flight)."""
        if not self.active:
            return []
        start = self.clock()
        ranked = self.scheduler.rank(self.active, start)
        batch = self._pack(ranked)
        if not batch and not self.executor.in_flight:
            return []
        for seq, _ in batch:
            if seq.first_scheduled is None:
                seq.first_scheduled = start
        result = self.executor.forward(batch)
        now = self.clock()
        outputs = []
        for seq, error in result.failed.items():
            seq.error = error
            self._finish(seq, FinishReason.ABORT)
            outputs.append(StepOutput(seq, None, "", None))
        completed = [(seq, n) for seq, n in result.completed if seq not in result.failed]
        for seq, n in completed:
            if (scores := result.prompt_logits.get(seq)) is not None:
                seq.score_prompt(scores)
            seq.num_computed += n
        for seq, row in zip(result.sampled, _host_rows(result.sampled, result.logits), strict=True):
            outputs.append(self._sample(seq, row, now))
        sampled = set(result.sampled)
        for seq, n in completed:
            generated = 1 if seq in sampled else 0
            self.scheduler.charge(seq, now - start, now, prompt_tokens=n - generated, output_tokens=generated)
        self.steps += 1
        return outputs

    def _pack(self, ranked: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Take sequences in rank order while the step's token, sequence and KV budgets allow."""
        batch: list[tuple[Sequence, int]] = []
        tokens_left = self.config.max_step_tokens
        for i, seq in enumerate(ranked):
            if len(batch) == self.config.max_batch_seqs or tokens_left == 0:
                break
            lower, computed = ranked[i + 1 :], seq.num_computed
            n = min(seq.uncomputed, tokens_left)
            if not self.executor.reserve(seq, seq.num_computed + n, lower):
                continue
            if seq.num_computed != computed:  # prefix reuse moved the start forward: size the chunk again
                n = min(seq.uncomputed, tokens_left)
                if not self.executor.reserve(seq, seq.num_computed + n, lower):
                    continue
            batch.append((seq, n))
            tokens_left -= n
        return batch

    # ----- sampling and stopping ------------------------------------------------------------------
    def _sample(self, seq: Sequence, raw: torch.Tensor | int, now: float) -> StepOutput:
        token, lp = seq.sample_token(raw)
        inter_token = None if seq.last_token is None else now - seq.last_token
        seq.first_token = seq.first_token or now
        seq.last_token = now
        if (reason := self.stopper.check(seq)) is not None:
            self._finish(seq, reason)
        return StepOutput(seq, token, self.stopper.take_text(seq), lp, inter_token)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        seq.finished_at = self.clock()
        self.executor.release(seq)
        self.active.remove(seq)
        self.scheduler.forget(seq)

    # ----- profiling ------------------------------------------------------------------------------
    def profile(self, prompt_tokens: int = 128) -> None:
        """Measure this peer's prefill cost per token and decode step time (for skip-join and metrics)."""
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        prompt_tokens = min(prompt_tokens, self.max_model_len - params.max_tokens)  # small models have short contexts
        ids = [i % self.model.config.vocab_size for i in range(7, 7 + prompt_tokens)]
        for _ in range(2):  # the first round warms up allocators and kernels
            (seq,) = self.add(ids, params, request_id="profile")
            seq.prefix_stored = True  # keep the profile out of the prefix cache
            t0 = time.perf_counter()
            while not seq.finished and seq.num_computed < len(ids):
                self.step()
            t1 = time.perf_counter()
            while not seq.finished:
                self.step()
            t2 = time.perf_counter()
            if seq.error is not None:
                raise RuntimeError(f"profiling failed: {seq.error}")
            self.prefill_seconds_per_token = (t1 - t0) / prompt_tokens
            self.decode_step_seconds = (t2 - t1) / max(1, params.max_tokens - 1)
        self.steps = 0


def _host_rows(seqs: list[Sequence], logits: torch.Tensor) -> list[torch.Tensor | int]:
    """Each sampled sequence's token where its argmax decides it, else its row of logits on the host (for
    its penalties, sampler and seeded generator). On an accelerator these two copies are the step's only
    synchronisation, and a step of greedy requests copies token ids alone."""
    rows: list[torch.Tensor | int] = [0] * len(seqs)
    argmax = [decided_by_argmax(seq.params) for seq in seqs]
    by_argmax = [i for i, a in enumerate(argmax) if a]
    sampled = [i for i, a in enumerate(argmax) if not a]
    if by_argmax:
        for i, token in zip(by_argmax, argmax_rows(logits[by_argmax]), strict=True):
            rows[i] = token
    if sampled:
        for i, row in zip(sampled, logits[sampled].cpu(), strict=True):
            rows[i] = row
    return rows
