"""The engine's executor for a gateway: each sequence's layers run on the swarm.

A gateway (`swarmlm peer --api`) runs the same `Engine` as `swarmlm serve` (scheduling, sampling, stop
rules, the OpenAI API on top), with this executor in place of the local model. Every sequence gets its
own `InferenceSession`; a step sends all scheduled sequences' new tokens at once, one thread each, so
every peer of the chain finds them waiting together and batches them into one forward pass. Embeddings
and the head stay here: the head runs once per step for all sampled sequences.

The peers hold the KV caches, so this side has no KV budget, no prefix cache and never preempts; the
scheduler's ranking still decides which sequences get a step (token-level preemption).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from swarmlm.engine.executor import StepResult
from swarmlm.engine.sequence import Sequence
from swarmlm.swarm.client import RemoteModel
from swarmlm.swarm.inference_session import InferenceSession


class SwarmExecutor:
    preemptions = 0
    kv_usage = 0.0  # the peers hold the KV; their free budgets are in their records
    prefix_hits = 0
    prefix_queries = 0

    def __init__(self, remote: RemoteModel, max_parallel: int) -> None:
        self.remote = remote
        self.span = remote.local.span
        self.capacity_tokens = remote.config_model.max_position_embeddings
        self.sessions: dict[Sequence, InferenceSession] = {}
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="swarmlm-session")

    def reserve(self, seq: Sequence, length: int, lower: list[Sequence]) -> bool:
        return True

    @torch.inference_mode()
    def forward(self, batch: list[tuple[Sequence, int]]) -> StepResult:
        work = [(seq, self._embed(seq, n)) for seq, n in batch]
        # A single stream runs inline: no thread hand-off on its critical path.
        results = [self._step(*work[0])] if len(work) == 1 else list(self._pool.map(lambda w: self._step(*w), work))
        failed: dict[Sequence, str] = {}
        sampled, last = [], []
        for (seq, n), out in zip(batch, results, strict=True):
            if isinstance(out, str):
                failed[seq] = out
            elif seq.num_computed + n == seq.num_tokens:
                sampled.append(seq)
                last.append(out[-1])
        logits = self.span.head(torch.stack(last)) if last else torch.empty(0)
        return StepResult(logits, sampled, failed)

    def _embed(self, seq: Sequence, n: int) -> Tensor:
        return self.span.embed(torch.tensor(seq.token_slice(seq.num_computed, seq.num_computed + n)))

    def _step(self, seq: Sequence, hidden: Tensor) -> Tensor | str:
        """The last layer's output for this sequence's new tokens, or why the swarm could not run them."""
        try:
            with torch.inference_mode():
                session = self.sessions.get(seq)
                if session is None:
                    max_length = min(len(seq.prompt_ids) + seq.params.max_tokens, self.capacity_tokens)
                    session = self.sessions[seq] = self.remote.inference_session(max_length)
                return session.step(hidden)
        except Exception as e:  # no route within the deadline, or a session the peers refuse
            return f"the swarm could not run this request: {e}"

    def release(self, seq: Sequence) -> None:
        if (session := self.sessions.pop(seq, None)) is not None:
            session.close()

    def close(self) -> None:
        for seq in list(self.sessions):
            self.release(seq)
        self._pool.shutdown(wait=False, cancel_futures=True)
