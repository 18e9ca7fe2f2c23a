"""Drive an `Engine` in one thread and stream its outputs into an asyncio event loop in another.

The engine is single-threaded: only the engine thread touches it. The event loop hands it commands
(add, abort) through a queue, and gets `StepOutput`s back through each request's asyncio.Queue, so the
HTTP server stays responsive while a forward pass runs (PyTorch releases the GIL in its kernels).

The engine should run in the thread that loaded the model (normally the main thread): PyTorch's OpenMP
pool belongs to the thread that first ran parallel work, and a second thread doing the same work runs
decode steps about 2x slower on CPU (measured: 27 vs 12 tok/s). So the server runs `run()` in the main
thread and the HTTP server beside it; `start()` spawns an engine thread only for embedding and tests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from swarmlm.engine.engine import Engine
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.sequence import FinishReason, Sequence, StepOutput

T = TypeVar("T")

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """The engine gave up on one request (its executor could not run it); the others carry on."""


@dataclass
class RequestHandle:
    request_id: str
    n: int
    prompt_tokens: int
    outputs: asyncio.Queue[StepOutput | BaseException] = field(default_factory=asyncio.Queue)
    seqs: list[Sequence] = field(default_factory=list)
    finished: int = 0  # sequences whose last output was delivered (event-loop side)

    async def stream(self) -> AsyncIterator[StepOutput]:
        """Yield outputs until all n sequences finished; raises if the engine failed the request."""
        done = 0
        while done < self.n:
            item = await self.outputs.get()
            if isinstance(item, BaseException):
                raise item
            if item.seq.finished:
                done += 1
            yield item


@dataclass
class _Add:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    user: str
    adapter: str | None


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    future: asyncio.Future


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        max_queued_requests: int = 256,
        max_queued_tokens: int = 262144,
        on_output: Callable[[StepOutput], None] | None = None,
        on_step: Callable[[Engine], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.on_output = on_output
        self.on_step = on_step
        self._commands: queue.SimpleQueue[_Add | _Call | str | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._handles: dict[str, RequestHandle] = {}
        self._pending: dict[str, int] = {}  # queued, not yet scheduled requests -> prompt tokens
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self.error: BaseException | None = None

    # ----- lifecycle ------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver outputs into `loop` (the HTTP server's); requests are accepted from now on."""
        self._loop = loop

    def run(self) -> None:
        """The engine loop, in the calling thread, until `stop()`."""
        self._running = True
        try:
            self._run()
        finally:
            self._running = False

    def start(self) -> None:
        """Attach to the running loop and run the engine in a thread of its own."""
        self.attach(asyncio.get_running_loop())
        self._thread = threading.Thread(target=self.run, name="swarmlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(None)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def num_queued(self) -> int:
        return len(self._pending)

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, n: int = 1, user: str = "", adapter: str | None = None
    ) -> RequestHandle:
        """Validate and queue a request (with the LoRA adapter named `adapter`, if any). Raises ValueError
        (bad request), QueueFullError (overload) or EngineDeadError."""
        if self.error is not None or not self._running or self._loop is None:
            raise EngineDeadError(f"the engine is not running ({self.error or 'stopped'})")
        self.engine.validate(prompt_ids, params, adapter)
        queued_tokens = sum(self._pending.values())
        if len(self._pending) >= self.max_queued_requests or queued_tokens + len(prompt_ids) > self.max_queued_tokens:
            wait = (
                self.engine.decode_step_seconds
                * 64
                * (1 + len(self._pending) / max(1, self.engine.config.max_batch_seqs))
            )
            raise QueueFullError(
                f"server busy: {len(self._pending)} requests ({queued_tokens} prompt tokens) queued",
                retry_after=max(1, round(wait)),
            )
        handle = RequestHandle(f"cmpl-{next(self._ids)}", n, len(prompt_ids))
        self._handles[handle.request_id] = handle
        self._pending[handle.request_id] = len(prompt_ids) * n
        self._commands.put(_Add(handle, list(prompt_ids), params, user, adapter))
        self._wake.set()
        return handle

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """`fn(engine)` run on the engine thread between two steps (the model never runs in two threads
        at once); its exception is raised here."""
        if self.error is not None or not self._running or self._loop is None:
            raise EngineDeadError(f"the engine is not running ({self.error or 'stopped'})")
        future: asyncio.Future = self._loop.create_future()
        self._commands.put(_Call(fn, future))
        self._wake.set()
        return await future

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone); its KV is freed at the next step boundary."""
        if request_id in self._handles:
            self._commands.put(request_id)
            self._wake.set()

    def _deliver(self, request_id: str, item: StepOutput | BaseException) -> None:
        handle = self._handles.get(request_id)
        if handle is None:
            return
        self._pending.pop(request_id, None)
        handle.outputs.put_nowait(item)
        # Count deliveries, not `seq.finished`: the engine thread may already have finished sequences
        # whose outputs are still on their way here.
        handle.finished += isinstance(item, BaseException) or item.seq.finished
        if isinstance(item, BaseException) or handle.finished == handle.n:
            self._handles.pop(request_id, None)

    def _scheduled(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    # ----- engine thread --------------------------------------------------------------------------
    def _post(self, fn: Callable, *args: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _emit(self, out: StepOutput) -> None:
        if self.on_output is not None:
            self.on_output(out)
        item = out if out.seq.error is None else RequestFailedError(out.seq.error)
        self._post(self._deliver, out.seq.request_id, item)

    def _run(self) -> None:
        engine = self.engine
        unscheduled: set[str] = set()  # requests added but not yet in any step (engine-thread side)
        try:
            while True:
                if not engine.has_work:
                    self._wake.wait(timeout=1.0)
                self._wake.clear()
                if not self._apply_commands(unscheduled):
                    return
                outputs = engine.step()
                started = {s.request_id for s in engine.active if s.first_scheduled is not None} & unscheduled
                for request_id in started:
                    self._post(self._scheduled, request_id)
                unscheduled -= started
                for out in outputs:
                    self._emit(out)
                if self.on_step is not None:
                    self.on_step(engine)
        except BaseException as e:  # a bug or OOM in a step: fail every request, refuse new ones
            log.exception("engine thread failed")
            self.error = e
            for seq in list(engine.active):
                self._post(self._deliver, seq.request_id, EngineDeadError(f"engine failed: {e!r}"))

    def _apply_commands(self, unscheduled: set[str]) -> bool:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if cmd is None:
                return False
            if isinstance(cmd, str):
                for out in self.engine.abort(cmd):
                    self._emit(out)
                continue
            if isinstance(cmd, _Call):
                try:
                    result, error = cmd.fn(self.engine), None
                except Exception as e:  # the caller's to handle, not the engine's
                    result, error = None, e
                self._post(_settle, cmd.future, result, error)
                continue
            try:
                cmd.handle.seqs = self.engine.add(
                    cmd.prompt_ids, cmd.params, cmd.handle.n, cmd.user, cmd.handle.request_id, cmd.adapter
                )
                unscheduled.add(cmd.handle.request_id)
            except ValueError as e:  # validated already; only a race with a config change lands here
                self._post(self._deliver, cmd.handle.request_id, e)


__all__ = ["AsyncEngine", "EngineDeadError", "FinishReason", "QueueFullError", "RequestFailedError", "RequestHandle"]
