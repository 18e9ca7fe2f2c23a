"""A swarm peer's engine: runs its span of layers for many remote inference sessions at once.

Each session is one client's generation passing through this peer. A client sends hidden states for
its new tokens; the peer keeps the session's KV cache for its layers and returns the span's output.
Steps of different sessions that are waiting at the same moment run as one batched forward pass (the
same `ModelRunner` as the single-peer engine), in the order the scheduler ranks the sessions, so short
sessions are not stuck behind long ones here either.

Thread model as in `async_engine.py`: `run()` in the thread that loaded the model; `submit()` from any
thread returns a `concurrent.futures.Future`.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from swarmlm.engine.kv_cache import KVCacheError, KVCacheManager, KVLayout, SequenceKV
from swarmlm.engine.runner import ModelRunner, Segment
from swarmlm.engine.scheduler import SchedState, Scheduler
from swarmlm.model.llama import LlamaSpan


class SessionError(ValueError):
    """A session step this peer cannot serve; the message goes back to the client."""


@dataclass(eq=False)
class SpanSession:
    session_id: str
    max_length: int
    user: str
    arrival: float
    blocks: tuple[int, int]  # which of the span's blocks this session runs through
    sched: SchedState = field(default_factory=SchedState)
    kv: SequenceKV | None = None

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv.length


@dataclass
class _Open:
    session: SpanSession


@dataclass
class _Close:
    session: SpanSession


@dataclass
class _Step:
    session: SpanSession
    hidden: Tensor  # [n, hidden]
    start: int
    future: Future[Tensor]


# How long a step may wait for the rest of the previous batch (see _gather): a share of that batch's compute
# time, since a straggler left behind costs a whole extra step.
GATHER_FRACTION = 0.3
GATHER_MAX_SECONDS = 0.03


class SpanEngine:
    def __init__(
        self,
        span: LlamaSpan,
        scheduler: Scheduler,
        kv_budget_bytes: int,
        max_step_tokens: int = 2048,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.span = span
        self.runner = ModelRunner(span)
        cfg = span.cfg
        layout = KVLayout(len(span.layers), cfg.num_kv_heads, cfg.head_dim, self.runner.dtype, self.runner.device)
        self.kv = KVCacheManager(layout, kv_budget_bytes)
        self.scheduler = scheduler
        self.max_step_tokens = max_step_tokens
        self.clock = clock
        self.sessions: dict[str, SpanSession] = {}
        self._inbox: queue.SimpleQueue[_Step | _Open | _Close | None] = queue.SimpleQueue()
        self._waiting: dict[SpanSession, _Step] = {}
        self._last_batch: set[SpanSession] = set()  # sessions of the previous step, expected again soon
        self._last_step_seconds = 0.0

    @property
    def waiting(self) -> int:
        """Sessions with a step waiting to run."""
        return len(self._waiting)

    # ----- any thread -----------------------------------------------------------------------------
    def open(
        self, session_id: str, max_length: int, user: str = "", blocks: tuple[int, int] | None = None
    ) -> SpanSession:
        if max_length > min(self.kv.capacity_tokens, self.span.cfg.max_position_embeddings):
            raise SessionError(
                f"a session of {max_length} tokens does not fit this peer "
                f"(KV budget {self.kv.capacity_tokens} tokens, context {self.span.cfg.max_position_embeddings})"
            )
        session = SpanSession(session_id, max_length, user, self.clock(), blocks or (0, len(self.span.layers)))
        self.sessions[session_id] = session
        self._inbox.put(_Open(session))  # the scheduler is only ever touched by the engine thread
        return session

    def submit(self, session: SpanSession, hidden: Tensor, start: int) -> Future[Tensor]:
        """Run the span over `hidden` ([n, hidden_size]), the session's tokens at positions start..start+n.
        A start below the session's length rewinds it (a client replaying after a failure downstream)."""
        future: Future[Tensor] = Future()
        if hidden.ndim != 2 or hidden.shape[1] != self.span.cfg.hidden_size or hidden.shape[0] == 0:
            future.set_exception(SessionError(f"expected hidden states [n, {self.span.cfg.hidden_size}]"))
        elif not 0 <= start <= session.length or start + hidden.shape[0] > session.max_length:
            future.set_exception(
                SessionError(
                    f"positions {start}:{start + hidden.shape[0]} do not follow the session's "
                    f"{session.length} cached tokens within its {session.max_length}"
                )
            )
        else:
            self._inbox.put(_Step(session, hidden, start, future))
        return future

    def close(self, session: SpanSession) -> None:
        self._inbox.put(_Close(session))

    def stop(self) -> None:
        self._inbox.put(None)

    # ----- engine thread --------------------------------------------------------------------------
    def run(self) -> None:
        """Serve steps until `stop()`: take whatever arrived, run one batched step, repeat."""
        while self._collect():
            if self._waiting:
                self.step()
        self._fail_all(SessionError("the peer is shutting down"))

    def _collect(self) -> bool:
        """Take what arrived (waiting for something when idle), then, briefly, the rest of the previous
        batch. False on stop()."""
        for item in self._drain(block=not self._waiting):
            if item is None:
                return False
            self._take(item)
        return not self._waiting or self._gather()

    def _gather(self) -> bool:
        """Wait a little for the rest of the previous batch. A gateway sends all its sequences'
        steps at once, but they arrive up to a few milliseconds apart, one stream each: without this,
        the first one would run alone and the others a step later, and the batch would splinter down the
        chain. A lone session (single stream) never waits. Returns False on stop()."""
        deadline = time.monotonic() + min(GATHER_MAX_SECONDS, GATHER_FRACTION * self._last_step_seconds)
        while self._last_batch - self._waiting.keys():
            try:
                item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return True
            if item is None:
                return False
            self._take(item)
        return True

    def _drain(self, block: bool) -> list[_Step | _Open | _Close | None]:
        items = []
        try:
            if block:
                items.append(self._inbox.get(timeout=1.0))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            return items

    def _take(self, item: _Step | _Open | _Close) -> None:
        if isinstance(item, _Open):
            self.scheduler.admit(item.session, item.session.arrival, 0.0)
        elif isinstance(item, _Close):
            session = item.session
            step = self._waiting.pop(session, None)
            if step is not None:
                step.future.set_exception(SessionError("session closed"))
            self.kv.free(session.kv)
            session.kv = None
            self._last_batch.discard(session)
            self.sessions.pop(session.session_id, None)
            self.scheduler.forget(session)
        elif item.session in self._waiting:
            item.future.set_exception(SessionError("one step at a time per session"))
        else:
            self._waiting[item.session] = item

    def step(self) -> None:
        start = self.clock()
        ranked = self.scheduler.rank(list(self._waiting), start)
        blocks = ranked[0].blocks  # one forward runs one range of blocks: the best-ranked session's
        batch: list[_Step] = []
        tokens = 0
        for session in ranked:
            if session.blocks != blocks:
                continue
            step = self._waiting[session]
            n = step.hidden.shape[0]
            if batch and tokens + n > self.max_step_tokens:
                continue
            kv = self.kv.ensure(session.kv, step.start + n)
            if kv is None:
                del self._waiting[session]
                step.future.set_exception(KVCacheError("this peer's KV cache is full; try another peer"))
                continue
            session.kv = kv
            kv.length = step.start  # rewinding drops the cached tokens after `start`
            batch.append(step)
            tokens += n
        if not batch:
            return
        segments = [Segment(s.session.kv, s.start, s.hidden.shape[0]) for s in batch]
        inputs = torch.cat([s.hidden for s in batch]).to(self.runner.dtype)
        try:
            out = self.runner.forward(segments, inputs, blocks=blocks).cpu()  # one host copy: replies go on the wire
        except Exception as e:  # a bug or OOM in one step must not kill the peer
            for s in batch:
                del self._waiting[s.session]
                s.future.set_exception(e)
            return
        now = self.clock()
        self._last_batch, self._last_step_seconds = {s.session for s in batch}, now - start
        row = 0
        for s in batch:
            n = s.hidden.shape[0]
            del self._waiting[s.session]
            s.future.set_result(out[row : row + n])
            row += n
            self.scheduler.charge(s.session, now - start, now, prompt_tokens=n - 1, output_tokens=1)

    def _fail_all(self, error: Exception) -> None:
        for step in self._waiting.values():
            step.future.set_exception(error)
        self._waiting.clear()

    def measure_throughput(self, tokens: int = 16, repeats: int = 3) -> float:
        """Tokens per second this span decodes for one session (announced so clients can route)."""
        session = self.open("__throughput__", tokens + 1)
        self._take(self._inbox.get())  # its admission
        hidden = torch.zeros(1, self.span.cfg.hidden_size)
        best = float("inf")
        try:
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(tokens):
                    self._waiting[session] = _Step(session, hidden, i, Future())
                    self.step()
                best = min(best, (time.perf_counter() - t0) / tokens)
        finally:
            self._take(_Close(session))
        return 1.0 / best
