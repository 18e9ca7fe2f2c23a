"""A swarm peer's engine: runs its span of layers for many remote inference sessions at once.

Each session is one sequence passing through this peer (a gateway's micro-batch brings several at once,
in one message). A client sends hidden states for its new tokens; the peer keeps the session's KV cache
for its layers and returns the span's output. Steps of different sessions that are waiting at the same
moment run as one batched forward pass (the same `ModelRunner` as the single-peer engine), in the order
the scheduler ranks the sessions, so short sessions are not stuck behind long ones here either.

Thread model as in `async_engine.py`: `run()` in the thread that loaded the model; `submit()` from any
thread returns `concurrent.futures.Future`s.
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
from swarmlm.model.lora import LoraAdapter


class SessionError(ValueError):
    """A session step this peer cannot serve; the message goes back to the client."""


@dataclass(eq=False)
class SpanSession:
    session_id: str
    max_length: int
    user: str
    arrival: float
    blocks: tuple[int, int]  # which of the span's blocks this session runs through
    adapter: LoraAdapter | None = None
    sched: SchedState = field(default_factory=SchedState)
    kv: SequenceKV | None = None
    closed: bool = False

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


class SpanEngine:
    def __init__(
        self,
        span: LlamaSpan,
        scheduler: Scheduler,
        kv_budget_bytes: int,
        max_step_tokens: int = 2048,
        clock: Callable[[], float] = time.monotonic,
        adapters: dict[str, LoraAdapter] | None = None,
    ) -> None:
        """`adapters`: LoRA adapters by name (their tensors for this span's layers) that sessions may use."""
        self.span = span
        self.adapters = adapters or {}
        self.runner = ModelRunner(span)
        cfg = span.cfg
        layout = KVLayout(len(span.layers), cfg.num_kv_heads, cfg.head_dim, self.runner.dtype, self.runner.device)
        self.kv = KVCacheManager(layout, kv_budget_bytes)
        self.scheduler = scheduler
        self.max_step_tokens = max_step_tokens
        self.clock = clock
        self.sessions: dict[str, SpanSession] = {}
        self._inbox: queue.SimpleQueue[list[_Step] | _Open | _Close | None] = queue.SimpleQueue()
        self._waiting: dict[SpanSession, _Step] = {}

    @property
    def waiting(self) -> int:
        """Sessions with a step waiting to run."""
        return len(self._waiting)

    # ----- any thread -----------------------------------------------------------------------------
    def open(
        self,
        session_id: str,
        max_length: int,
        user: str = "",
        blocks: tuple[int, int] | None = None,
        adapter: str | None = None,
    ) -> SpanSession:
        if adapter is not None and adapter not in self.adapters:
            raise SessionError(
                f"this peer has no LoRA adapter {adapter!r} (it has: {', '.join(self.adapters) or 'none'})"
            )
        if max_length > min(self.kv.capacity_tokens, self.span.cfg.max_position_embeddings):
            raise SessionError(
                f"a session of {max_length} tokens does not fit this peer "
                f"(KV budget {self.kv.capacity_tokens} tokens, context {self.span.cfg.max_position_embeddings})"
            )
        session = SpanSession(session_id, max_length, user, self.clock(), blocks or (0, len(self.span.layers)))
        session.adapter = self.adapters[adapter] if adapter is not None else None
        self.sessions[session_id] = session
        self._inbox.put(_Open(session))  # the scheduler is only ever touched by the engine thread
        return session

    def submit(self, steps: list[tuple[SpanSession, Tensor, int]]) -> list[Future[Tensor]]:
        """Run the span over each session's `hidden` ([n, hidden_size]), its tokens at positions
        start..start+n; the steps of one call reach the engine together, so they share a forward pass. A
        start below the session's length rewinds it (a client replaying after a failure downstream)."""
        futures: list[Future[Tensor]] = [Future() for _ in steps]
        for (session, hidden, start), future in zip(steps, futures, strict=True):
            if hidden.ndim != 2 or hidden.shape[1] != self.span.cfg.hidden_size or hidden.shape[0] == 0:
                future.set_exception(SessionError(f"expected hidden states [n, {self.span.cfg.hidden_size}]"))
            elif not 0 <= start <= session.length or start + hidden.shape[0] > session.max_length:
                future.set_exception(
                    SessionError(
                        f"positions {start}:{start + hidden.shape[0]} do not follow the session's "
                        f"{session.length} cached tokens within its {session.max_length}"
                    )
                )
        if any(f.done() for f in futures):  # one bad row fails the message: the client resends it whole
            for future in futures:
                if not future.done():
                    future.set_exception(SessionError("another row of this step was refused"))
            return futures
        self._inbox.put([_Step(s, h, p, f) for (s, h, p), f in zip(steps, futures, strict=True)])
        return futures

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
        """Take what arrived, waiting for something when idle. False on stop()."""
        for item in self._drain(block=not self._waiting):
            if item is None:
                return False
            self._take(item)
        return True

    def _drain(self, block: bool) -> list[list[_Step] | _Open | _Close | None]:
        items = []
        try:
            if block:
                items.append(self._inbox.get(timeout=1.0))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            return items

    def _take(self, item: list[_Step] | _Open | _Close) -> None:
        if isinstance(item, list):
            for step in item:
                self._wait(step)
        elif isinstance(item, _Open):
            self.scheduler.admit(item.session, item.session.arrival, 0.0)
        elif isinstance(item, _Close):
            session = item.session
            step = self._waiting.pop(session, None)
            if step is not None:
                step.future.set_exception(SessionError("session closed"))
            self.kv.free(session.kv)
            session.kv, session.closed = None, True
            self.sessions.pop(session.session_id, None)
            self.scheduler.forget(session)

    def _wait(self, step: _Step) -> None:
        if step.session.closed:
            step.future.set_exception(SessionError("session closed"))
        elif step.session in self._waiting:
            step.future.set_exception(SessionError("one step at a time per session"))
        else:
            self._waiting[step.session] = step

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
        segments = [Segment(s.session.kv, s.start, s.hidden.shape[0], s.session.adapter) for s in batch]
        inputs = torch.cat([s.hidden for s in batch]).to(self.runner.dtype)
        try:
            out = self.runner.forward(segments, inputs, blocks=blocks).cpu()  # one host copy: replies go on the wire
        except Exception as e:  # a bug or OOM in one step must not kill the peer
            for s in batch:
                del self._waiting[s.session]
                s.future.set_exception(e)
            return
        now = self.clock()
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
