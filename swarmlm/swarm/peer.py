"""`swarmlm peer`: join the DHT, pick a span, serve it to clients over P2P, heartbeat a record.

Threads (see async_engine.py for why the model's thread matters): the main thread loads the span and
runs the `SpanEngine`; an asyncio loop in a second thread serves P2P streams and hands steps to the
engine; a third refreshes the DHT record. The DHT itself and the libp2p daemon are hivemind's own
child processes; the peer runs in its own process group so a killed peer leaves none behind (its
parent or test harness kills the group).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator  # noqa: UP035 - hivemind's servicer recognises typing's alias, not collections.abc's

import torch
from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

import swarmlm
from swarmlm.engine.kv_cache import KVCacheError
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.engine.span_engine import SessionError, SpanEngine, SpanSession
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.loading import load_model, resolve_model
from swarmlm.swarm.loop import LoopThread
from swarmlm.swarm.protocol import ProtocolError, StepRequest, error_response, step_response
from swarmlm.swarm.records import DEFAULT_TTL, SpanRecord, announce, fetch_records, withdraw
from swarmlm.swarm.routing import choose_span

log = logging.getLogger("swarmlm.peer")

DAEMON_START_TIMEOUT = 60.0  # hivemind's 15 s default is too tight for a loaded 2-core machine


@dataclass
class PeerConfig:
    model: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    identity: str | None = None
    layers: str = "auto"  # "auto", "a:b" or "none"
    num_layers: int | None = None  # span size for "auto" (default: the whole model)
    dtype: str = "fp32"
    quant: str = "none"
    kv_budget: int = 1 << 30
    scheduler: str = "mlfq"
    ttl: float = DEFAULT_TTL
    threads: int | None = None  # torch intra-op threads; None: PyTorch's default (all cores)


def start_dht(
    initial_peers: list[str], host_maddrs: list[str], identity: str | None = None, client: bool = False
) -> DHT:
    return DHT(
        initial_peers=initial_peers or None,
        host_maddrs=host_maddrs,
        identity_path=identity,
        client_mode=client,
        startup_timeout=DAEMON_START_TIMEOUT,
        start=True,
    )


class SpanServicer(ServicerBase):
    """P2P handlers of a serving peer: `rpc_inference` is one session's stream."""

    def __init__(self, engine: SpanEngine, record: SpanRecord) -> None:
        self.engine = engine
        self.record = record

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: SpanSession | None = None
        try:
            async for msg in requests:
                step = StepRequest.from_proto(msg)
                if session is None:
                    session = self._open(step, str(context.remote_id))
                future = self.engine.submit(session, step.hidden, step.position)
                out = await asyncio.wrap_future(future)
                yield step_response(out.to(step.hidden.dtype))
        except (ProtocolError, SessionError, KVCacheError) as e:
            yield error_response(str(e))
        finally:
            if session is not None:
                self.engine.close(session)

    def _open(self, step: StepRequest, remote: str) -> SpanSession:
        h = step.header or {}
        r = self.record
        start, end = h.get("start"), h.get("end")
        ours = h.get("model_id") == r.model_id and isinstance(start, int) and isinstance(end, int)
        if not ours or not r.start <= start < end <= r.end:
            raise SessionError(
                f"this peer serves {r.model_id} layers {r.start}..{r.end}, "
                f"not {h.get('model_id')} layers {start}..{end}"
            )
        if not isinstance(h.get("max_length"), int) or not isinstance(h.get("session_id"), str):
            raise SessionError("the session header needs session_id and max_length")
        blocks = (start - r.start, end - r.start)  # which of our blocks this session runs through
        return self.engine.open(h["session_id"], h["max_length"], user=remote, blocks=blocks)


def parse_layers(layers: str, total: int) -> tuple[int, int] | None:
    """'a:b' -> (a, b); 'none' -> None. Raises ValueError with a message for the user."""
    if layers == "none":
        return None
    try:
        a, b = (int(x) for x in layers.split(":"))
    except ValueError:
        raise ValueError(f"--layers must be auto, none or START:END, not {layers!r}") from None
    if not 0 <= a < b <= total:
        raise ValueError(f"--layers {layers}: the model has layers 0..{total}")
    return a, b


def run_peer(cfg: PeerConfig) -> int:
    if cfg.threads is not None:
        # Several peers on one machine must not each spin a thread per core: OpenMP workers that busy-wait
        # between steps steal the cores the next peer in the chain needs.
        torch.set_num_threads(cfg.threads)
    model_id, path = resolve_model(cfg.model)
    total = open_checkpoint(path).config.num_layers
    if cfg.layers != "auto":
        span = parse_layers(cfg.layers, total)  # fail on a bad value before starting anything
    dht = start_dht(cfg.initial_peers, cfg.host_maddrs, cfg.identity)
    stop = threading.Event()
    engine: SpanEngine | None = None
    record: SpanRecord | None = None
    loop: LoopThread | None = None
    p2p: P2P | None = None
    try:
        for maddr in dht.get_visible_maddrs():
            print(f"swarmlm peer {dht.peer_id}: others join with --initial-peers {maddr}", flush=True)
        if cfg.layers == "auto":
            span = choose_span(fetch_records(dht, model_id), total, cfg.num_layers or total)
        start, end = span if span is not None else (0, 0)
        record = SpanRecord(str(dht.peer_id), model_id, start, end, version=swarmlm.__version__)
        if span is not None:
            model = load_model(cfg.model, layers=span, dtype=cfg.dtype, quant=cfg.quant, edges=False)
            engine = SpanEngine(model.span, make_scheduler(cfg.scheduler), cfg.kv_budget)
            record.digest, record.dtype = model.digest, cfg.dtype
            record.throughput = engine.measure_throughput()
            loop = LoopThread("swarmlm-p2p")
            p2p = loop.run(dht.replicate_p2p(), DAEMON_START_TIMEOUT)
            loop.run(SpanServicer(engine, record).add_p2p_handlers(p2p), DAEMON_START_TIMEOUT)
        _heartbeat(dht, record, engine, cfg.ttl)  # first announcement before we say we are ready
        threading.Thread(target=_heartbeats, args=(dht, record, engine, cfg.ttl, stop), daemon=True).start()
        print(f"swarmlm peer ready: {model_id} layers {start}..{end} ({record.throughput:.1f} tok/s)", flush=True)

        def request_exit(signum: int, _frame: object) -> None:
            log.info("signal %d: leaving the swarm", signum)
            stop.set()
            if engine is not None:
                engine.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_exit)
        if engine is not None:
            engine.run()
        else:
            stop.wait()
        return 0
    finally:
        stop.set()
        if record is not None:
            try:
                withdraw(dht, record)
            except Exception:  # Ctrl-C in a terminal also reaches the DHT process: it may be gone already
                log.warning("could not withdraw our record; it expires within %.0f s", cfg.ttl)
        if loop is not None:
            loop.stop(p2p)
        dht.shutdown()


def _heartbeat(dht: DHT, record: SpanRecord, engine: SpanEngine | None, ttl: float) -> None:
    if engine is not None:
        record.free_kv_tokens = engine.kv.capacity_tokens - engine.kv.used_tokens
        record.sessions = len(engine.sessions)
        record.queue = engine.waiting
    if not announce(dht, record, ttl):
        log.warning("could not store our record in the DHT (no reachable peers?)")


def _heartbeats(dht: DHT, record: SpanRecord, engine: SpanEngine | None, ttl: float, stop: threading.Event) -> None:
    while not stop.wait(ttl / 3):
        try:
            _heartbeat(dht, record, engine, ttl)
        except Exception:  # a DHT hiccup must not end the heartbeat; the next one retries
            log.exception("heartbeat failed")
