"""Build a serving peer from its settings: load the model, profile it, wire engine, metrics and API."""

from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn
from fastapi import FastAPI

from swarmlm.core.sizes import KV_DEFAULT_MAX
from swarmlm.engine.async_engine import AsyncEngine
from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.executor import Executor, LocalExecutor
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.loading import LoadedModel, load_model, resolve_device, resolve_dtype, resolve_model
from swarmlm.model.lora import load_adapters, parse_adapter_specs
from swarmlm.model.memory import MemoryBudget, span_need
from swarmlm.serve.api import create_app
from swarmlm.serve.auth import KeyChecker, load_keys
from swarmlm.serve.metrics import ServingMetrics
from swarmlm.serve.server_config import ServeConfig, check_tls, read_chat_template
from swarmlm.serve.serving import OpenAIServing

log = logging.getLogger("swarmlm.serve")


def build_app(
    cfg: ServeConfig, model: LoadedModel | None = None, executor: Executor | None = None, profile: bool = True
) -> tuple[FastAPI, AsyncEngine, ServingMetrics]:
    """The engine, its metrics and the API app. By default the engine runs the whole model loaded from
    `cfg`; a swarm gateway passes its edge-only `model` and a `SwarmExecutor` instead."""
    if cfg.protect_metrics and not cfg.api_keys:
        raise ValueError("--protect-metrics needs --api-keys")
    keys = KeyChecker(load_keys(cfg.api_keys)) if cfg.api_keys else None  # a bad key file fails before loading
    check_tls(cfg.ssl_certfile, cfg.ssl_keyfile)  # and so does a certificate that does not load
    template = read_chat_template(cfg.chat_template) if cfg.chat_template is not None else None  # and a template
    if cfg.chat_max_tokens < 1:
        raise ValueError(f"--chat-max-tokens must be at least 1, not {cfg.chat_max_tokens}")
    kv_budget = cfg.kv_budget
    if model is None:
        kv_budget = whole_model_kv_budget(cfg)  # a model too large for the memory budget fails before loading
        parse_adapter_specs(cfg.adapters)  # and so does a malformed --adapters
        model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, quant=cfg.quant)
        weight = next(model.span.parameters())
        adapters = load_adapters(
            cfg.adapters, model.config, range(model.config.num_layers), weight.device, weight.dtype
        )
        executor = LocalExecutor(model.span, kv_budget, adapters=adapters)
    scheduler = (
        make_scheduler(cfg.scheduler, cfg.fair, base_quantum=cfg.mlfq_quantum, starvation=cfg.starvation)
        if cfg.scheduler == "mlfq"
        else make_scheduler(cfg.scheduler, cfg.fair)
    )
    engine = Engine(
        model,
        scheduler,
        EngineConfig(
            kv_budget_bytes=kv_budget,
            max_batch_seqs=cfg.max_batch_seqs,
            max_step_tokens=cfg.max_step_tokens,
            max_model_len=cfg.max_model_len,
        ),
        executor=executor,
    )
    if profile:
        engine.profile()
    log.info(
        "%s (%d layers, digest %s…), %s; prefill %.2f ms/token, decode step %.1f ms",
        model.model_id,
        model.config.num_layers,
        model.digest[:12],
        scheduler.name,
        engine.prefill_seconds_per_token * 1e3,
        engine.decode_step_seconds * 1e3,
    )
    if template is not None:
        model.tokenizer.hf.chat_template = template
    name = cfg.served_model_name or model.model_id
    metrics = ServingMetrics(name)
    async_engine = AsyncEngine(
        engine,
        cfg.max_queued_requests,
        cfg.max_queued_tokens,
        on_output=metrics.observe_output,
        on_step=metrics.observe_step,
    )
    app = create_app(OpenAIServing(async_engine, name, metrics, keys, cfg.protect_metrics, cfg.chat_max_tokens))
    return app, async_engine, metrics


def whole_model_kv_budget(cfg: ServeConfig) -> int:
    """The KV budget of the whole model under the memory budget: --kv-budget, else what the budget leaves
    after the weights (at most KV_DEFAULT_MAX). Raises MemoryShortError when the weights and the KV
    (--kv-budget, else the KV reservation) do not fit."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    config = open_checkpoint(resolve_model(cfg.model)[1]).config
    need = span_need(config, 0, config.num_layers, True, dtype, cfg.quant, cfg.kv_budget)
    budget = MemoryBudget.of(cfg.max_memory, device)
    budget.check("the model needs", need, "run it on a swarm (swarmlm peer --layers auto)")
    return cfg.kv_budget or min(budget.size - need.weights, KV_DEFAULT_MAX)


class ApiServer:
    """uvicorn in a thread of its own, beside the engine loop (which runs where the model was loaded: see
    async_engine.py)."""

    def __init__(self, app: FastAPI, engine: AsyncEngine, cfg: ServeConfig) -> None:
        """Listens on `cfg.host:cfg.port`, over TLS with `cfg.ssl_certfile` and `cfg.ssl_keyfile`. uvicorn's
        own log lines go to the root logger, in the format `swarmlm --log-format` chose."""
        self.engine = engine
        config = uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="info",
            log_config=None,
            timeout_graceful_shutdown=5,
            ssl_certfile=cfg.ssl_certfile,
            ssl_keyfile=cfg.ssl_keyfile,
        )
        self.server = uvicorn.Server(config)
        self._http = threading.Thread(target=self.server.run, name="swarmlm-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start listening; raises if the address cannot be bound (uvicorn ends its thread then)."""
        self._http.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._http.is_alive() or time.monotonic() > deadline:
                config = self.server.config
                raise OSError(f"the API could not listen on {config.host}:{config.port} (see the log above)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.engine.stop()

    def join(self) -> None:
        self.server.should_exit = True
        self._http.join(timeout=30)


def run_server(cfg: ServeConfig) -> int:
    """Serve until SIGINT/SIGTERM; the engine loop runs in this (the main) thread. Returns an exit code."""
    app, engine, _ = build_app(cfg)
    api = ApiServer(app, engine, cfg)

    def request_exit(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        api.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_exit)
    api.start()
    engine.run()  # returns on stop() (signal or server shutdown) or when the engine fails
    api.join()
    return 1 if engine.error is not None else 0
