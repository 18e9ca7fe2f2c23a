"""Build a serving peer from its settings: load the model, profile it, wire engine, metrics and API."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from swarmlm.engine.async_engine import AsyncEngine
from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.model.loading import load_model
from swarmlm.serve.api import create_app
from swarmlm.serve.metrics import ServingMetrics

log = logging.getLogger("swarmlm.serve")


@dataclass
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    scheduler: str = "mlfq"
    fair: bool = False
    kv_budget: int | None = None
    dtype: str = "fp32"
    quant: str = "none"
    device: str = "auto"
    max_batch_seqs: int = 32
    max_step_tokens: int = 256
    max_model_len: int | None = None
    max_queued_requests: int = 256
    max_queued_tokens: int = 262144
    mlfq_quantum: float = 0.25
    starvation: float = 10.0


def build_app(cfg: ServeConfig) -> tuple[FastAPI, AsyncEngine]:
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, quant=cfg.quant)
    scheduler = (
        make_scheduler(cfg.scheduler, cfg.fair, base_quantum=cfg.mlfq_quantum, starvation=cfg.starvation)
        if cfg.scheduler == "mlfq"
        else make_scheduler(cfg.scheduler, cfg.fair)
    )
    engine = Engine(
        model,
        scheduler,
        EngineConfig(
            kv_budget_bytes=cfg.kv_budget,
            max_batch_seqs=cfg.max_batch_seqs,
            max_step_tokens=cfg.max_step_tokens,
            max_model_len=cfg.max_model_len,
        ),
    )
    engine.profile()
    log.info(
        "loaded %s (%d layers, digest %s…, %s/%s), %s; prefill %.2f ms/token, decode step %.1f ms, KV budget %.0f MiB",
        model.model_id,
        model.config.num_layers,
        model.digest[:12],
        cfg.dtype,
        cfg.quant,
        scheduler.name,
        engine.prefill_seconds_per_token * 1e3,
        engine.decode_step_seconds * 1e3,
        engine.kv.budget_bytes / 2**20,
    )
    metrics = ServingMetrics(model.model_id)
    async_engine = AsyncEngine(
        engine,
        cfg.max_queued_requests,
        cfg.max_queued_tokens,
        on_output=metrics.observe_output,
        on_step=metrics.observe_step,
    )
    return create_app(async_engine, model.model_id, metrics), async_engine


def run_server(cfg: ServeConfig) -> int:
    """Serve until SIGINT/SIGTERM. The engine loop runs in this (the main) thread, where the model was
    loaded, and uvicorn in a thread beside it (see async_engine.py for why). Returns an exit code."""
    app, engine = build_app(cfg)
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
    )
    http = threading.Thread(target=server.run, name="swarmlm-http", daemon=True)

    def request_exit(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        server.should_exit = True
        engine.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_exit)
    http.start()
    engine.run()  # returns on stop() (signal or server shutdown) or when the engine fails
    server.should_exit = True
    http.join(timeout=30)
    return 1 if engine.error is not None else 0
