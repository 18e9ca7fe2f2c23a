"""The engine's executor for a gateway: the running batch flows through the swarm as micro-batches.

A gateway (`swarmlm peer --api`) runs the same `Engine` as `swarmlm serve` (scheduling, sampling, stop
rules, the OpenAI API on top), with this executor in place of the local model. Its sequences are dealt
into micro-batch groups; each group is one `InferenceSession` whose rows are the group's sequences,
so a group's step is one message per hop for all of them. Groups run independently: while one group's
step is at the second peer, the next one's is at the first, and every peer of the chain computes at once
(pipeline parallelism; one group at a time per peer would leave h-1 of h peers idle). `forward` launches
the idle groups the engine picked and returns as soon as any group in flight is back, so the engine
samples that group and sends it on while the others are still in the chain. Embeddings and the head stay
here; a group's head runs in its own thread as soon as its step is back.

How many groups: `--micro-batches`, or by default one per machine among the peers serving layers (their
records' host fingerprints; at most 4). Peers on one machine share its cores, so there one group is
best: splitting the batch only makes each peer's forward less efficient (measured in bench/RESULTS.md).

The peers hold the KV caches, so this side has no KV budget, no prefix cache and never preempts; the
scheduler's ranking still decides which sequences get a step (token-level preemption).
"""

from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from torch import Tensor

from swarmlm.engine.executor import StepResult
from swarmlm.engine.sequence import Sequence
from swarmlm.swarm.client import RemoteModel
from swarmlm.swarm.inference_session import InferenceSession
from swarmlm.swarm.routing import holding_adapter, uncovered_layers

MACHINES_REFRESH_SECONDS = 30.0
ADAPTERS_REFRESH_SECONDS = 5.0
MAX_AUTO_GROUPS = 4


@dataclass(eq=False)
class _Group:
    session: InferenceSession
    seqs: set[Sequence] = field(default_factory=set)
    launched: list[tuple[Sequence, int]] = field(default_factory=list)  # the step in flight
    future: Future[Tensor] | None = None  # the head's logits for the launched sequences that sample


class SwarmExecutor:
    preemptions = 0
    kv_usage = 0.0  # the peers hold the KV; their free budgets are in their records
    prefix_hits = 0
    prefix_queries = 0

    def __init__(self, remote: RemoteModel, micro_batches: int = 0) -> None:
        """`micro_batches`: how many groups; 0: one per machine serving layers (see the module docstring)."""
        self.remote = remote
        self.span = remote.local.span
        self.capacity_tokens = remote.config_model.max_position_embeddings
        self.micro_batches = micro_batches
        self._machines = (1, -math.inf)  # (machines serving layers, when counted)
        self._adapters: tuple[list[str], float] = ([], -math.inf)  # (adapters the swarm covers, when looked)
        self.groups: list[_Group] = []
        self._group_of: dict[Sequence, _Group] = {}
        self._keys: dict[Sequence, str] = {}
        self._ids = itertools.count()
        self._released: set[Sequence] = set()  # released while their step was in flight
        self._pool = ThreadPoolExecutor(micro_batches or MAX_AUTO_GROUPS, thread_name_prefix="swarmlm-microbatch")

    @property
    def in_flight(self) -> bool:
        return any(g.future is not None for g in self.groups)

    def reserve(self, seq: Sequence, length: int, lower: list[Sequence]) -> bool:
        """A sequence joins the smallest group on its first step; it may step while its group is back."""
        group = self._group_of.get(seq)
        if group is None:
            group = self._smallest_group()
            group.seqs.add(seq)
            self._group_of[seq] = group
            self._keys[seq] = key = str(next(self._ids))
            length = min(len(seq.prompt_ids) + seq.params.max_tokens, self.capacity_tokens)
            group.session.add(key, length, seq.adapter)
        return group.future is None

    def adapter_names(self) -> list[str]:
        """The LoRA adapters whose holders cover every layer (looked up every few seconds)."""
        names, when = self._adapters
        if time.monotonic() - when > ADAPTERS_REFRESH_SECONDS:
            records = self.remote.routable_records()
            layers = self.remote.config_model.num_layers
            candidates = sorted({name for r in records for name in r.adapters})
            names = [n for n in candidates if not uncovered_layers(holding_adapter(records, n), 0, layers)]
            self._adapters = (names, time.monotonic())
        return names

    def _group_limit(self) -> int:
        if self.micro_batches > 0:
            return self.micro_batches
        count, when = self._machines
        if time.monotonic() - when > MACHINES_REFRESH_SECONDS:
            serving = [r for r in self.remote.records() if r.end > r.start]
            count = max(1, len({r.host or r.peer_id for r in serving}))
            self._machines = (count, time.monotonic())
        return min(count, MAX_AUTO_GROUPS)

    def _smallest_group(self) -> _Group:
        if len(self.groups) < self._group_limit() and all(g.seqs for g in self.groups):
            self.groups.append(_Group(self.remote.inference_session(None)))
        return min(self.groups, key=lambda g: (len(g.seqs), g.future is not None))

    @torch.inference_mode()
    def forward(self, batch: list[tuple[Sequence, int]]) -> StepResult:
        launches: dict[_Group, list[tuple[Sequence, int]]] = {}
        for seq, n in batch:
            launches.setdefault(self._group_of[seq], []).append((seq, n))
        alone = len(launches) == 1 and not self.in_flight
        for group, steps in launches.items():
            inputs = {self._keys[seq]: self._embed(seq, n) for seq, n in steps}
            group.launched = steps
            sampling = [self._keys[seq] for seq, n in steps if seq.num_computed + n == seq.num_tokens]
            scoring = [self._keys[seq] for seq, n in steps if seq.scores_prompt()]
            if alone:  # a single micro-batch runs inline: no thread hand-off on its critical path
                group.future = Future()
                try:
                    group.future.set_result(self._step(group.session, inputs, sampling, scoring))
                except Exception as e:
                    group.future.set_exception(e)
            else:
                group.future = self._pool.submit(self._step, group.session, inputs, sampling, scoring)
        running = [g.future for g in self.groups if g.future is not None]
        if not running:
            return StepResult([], torch.empty(0), [])
        wait(running, return_when=FIRST_COMPLETED)
        return self._collect([g for g in self.groups if g.future is not None and g.future.done()])

    def _collect(self, done: list[_Group]) -> StepResult:
        completed: list[tuple[Sequence, int]] = []
        failed: dict[Sequence, str] = {}
        sampled, logits, prompt_logits = [], [], {}
        for group in done:
            assert group.future is not None
            future, group.future = group.future, None
            try:
                head, scores = future.result()
            except Exception as e:  # no route within the deadline, or peers that refuse: the group is lost
                for seq in group.seqs - self._released:
                    failed[seq] = f"the swarm could not run this request: {e}"
                self._replace(group)
                continue
            row = 0
            for seq, n in group.launched:
                if seq.num_computed + n == seq.num_tokens:
                    if seq not in self._released:
                        sampled.append(seq)
                        logits.append(head[row])
                    row += 1
                if seq not in self._released:
                    completed.append((seq, n))
                    if (key := self._keys[seq]) in scores:
                        prompt_logits[seq] = scores[key]
            for seq in group.seqs & self._released:
                self._forget(seq)
        stacked = torch.stack(logits) if logits else torch.empty(0)
        return StepResult(completed, stacked, sampled, failed, prompt_logits)

    def _step(
        self, session: InferenceSession, inputs: dict[str, Tensor], sampling: list[str], scoring: list[str]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One group's step through the chain, then the head over its sampling rows' last positions (and
        over every position of the rows scoring their prompt), in the group's own thread: the engine loop is
        free meanwhile to sample and launch the groups already back."""
        with torch.inference_mode():
            outs = session.step_rows(inputs)
            scores = {key: self.span.head(outs[key]) for key in scoring}
            if not sampling:
                return torch.empty(0), scores
            plain = [key for key in sampling if key not in scores]  # one head call for all their last rows
            heads = {}
            if plain:
                heads = dict(zip(plain, self.span.head(torch.stack([outs[k][-1] for k in plain])), strict=True))
            return torch.stack([scores[k][-1] if k in scores else heads[k] for k in sampling]), scores

    def _embed(self, seq: Sequence, n: int) -> Tensor:
        return self.span.embed(torch.tensor(seq.token_slice(seq.num_computed, seq.num_computed + n)))

    def _replace(self, group: _Group) -> None:
        """A failed group's sequences are aborted; its session (whose chain may be half gone) is renewed."""
        group.session.close()
        group.session = self.remote.inference_session(None)
        for seq in list(group.seqs):
            self._forget(seq)

    def release(self, seq: Sequence) -> None:
        group = self._group_of.get(seq)
        if group is None:
            return
        if group.future is not None:  # its step is still in the chain: forget it when the step is back
            self._released.add(seq)
        else:
            self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        group = self._group_of.pop(seq)
        group.seqs.discard(seq)
        group.session.remove(self._keys.pop(seq))
        self._released.discard(seq)

    def close(self) -> None:
        for group in self.groups:
            group.session.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
