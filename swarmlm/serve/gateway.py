"""A swarm gateway (`swarmlm peer --api HOST:PORT`): the OpenAI-compatible API and the dashboard, backed
by the swarm. It runs as its peer's sidecar (`swarm/peer.py`): the peer starts it on its DHT node once up.

It is `swarmlm serve`'s stack unchanged (API, AsyncEngine, Engine with its scheduler, sampling and
metrics) with a `SwarmExecutor` in place of the local model, plus `/dashboard`. It joins the swarm through
its peer but as a client node of its own: a libp2p host cannot open a stream to itself, and a gateway
must be able to route through its own peer's span.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from typing import Any

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarmlm.core.keys import TRAINING_KEY
from swarmlm.engine.async_engine import AsyncEngine
from swarmlm.serve.auth import load_keys
from swarmlm.serve.dashboard import add_dashboard
from swarmlm.serve.server import ApiServer, build_app
from swarmlm.serve.server_config import GatewayConfig, ServeConfig, check_tls, parse_address, read_chat_template
from swarmlm.swarm.client import ClientConfig, RemoteModel
from swarmlm.swarm.peer import PeerConfig, run_peer
from swarmlm.swarm.records import fetch_records
from swarmlm.swarm.remote_executor import SwarmExecutor
from swarmlm.swarm.routing import NoRouteError, find_route, format_layers, peers_per_layer, uncovered_layers
from swarmlm.swarm.span_record import SpanRecord

log = logging.getLogger("swarmlm.gateway")

RATE_WINDOW = 10.0  # seconds of history behind the dashboard's tokens/s


def run_peer_with_gateway(peer: PeerConfig, gateway: GatewayConfig) -> int:
    """`swarmlm peer --api HOST:PORT`: the OpenAI API over the swarm runs beside the peer."""
    assert gateway.api is not None  # without --api the CLI runs swarm.peer.run_peer alone
    host, port = parse_address(gateway.api)
    if gateway.api_keys is not None:
        load_keys(gateway.api_keys)  # a bad key file fails now, not when the gateway starts
    serve = ServeConfig(
        peer.model,
        host,
        port,
        peer.scheduler,
        max_batch_seqs=gateway.max_batch_seqs,
        api_keys=gateway.api_keys,
        protect_metrics=gateway.protect_metrics,
        served_model_name=gateway.served_model_name,
        chat_template=gateway.chat_template,
        chat_max_tokens=gateway.chat_max_tokens,
        ssl_certfile=gateway.ssl_certfile,
        ssl_keyfile=gateway.ssl_keyfile,
    )
    check_tls(serve.ssl_certfile, serve.ssl_keyfile)
    if serve.chat_template is not None:
        read_chat_template(serve.chat_template)  # a bad template fails now, not when the gateway starts
    if gateway.micro_batches < 0:
        raise ValueError(f"--micro-batches must be 0 (automatic) or more, not {gateway.micro_batches}")
    # The gateway's client listens where its peer does (any free port): peers behind NAT dial it back there.
    listen = tuple(re.sub(r"/tcp/\d+", "/tcp/0", m) for m in peer.host_maddrs)
    client = ClientConfig(wire_dtype=gateway.wire_dtype, host_maddrs=listen)
    return run_peer(peer, lambda dht: Gateway(dht, serve, peer.ttl, gateway.micro_batches, client))


class Gateway:
    def __init__(
        self, dht: DHT, cfg: ServeConfig, ttl: float, micro_batches: int, client: ClientConfig | None = None
    ) -> None:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        self.remote = RemoteModel(cfg.model, initial_peers=maddrs, config=client)
        try:
            self._build(cfg, ttl, micro_batches)
        except BaseException:  # the client's DHT node would keep the peer's process alive after it gave up
            self.remote.close()
            raise

    def _build(self, cfg: ServeConfig, ttl: float, micro_batches: int) -> None:
        self.executor = SwarmExecutor(self.remote, micro_batches)
        self.ttl = ttl
        records = self.remote.records()
        layers = self.remote.config_model.num_layers
        try:  # skip-join needs a prefill cost; measure it now if the swarm can already serve
            find_route(records, 0, layers, set())
            profile = True
        except NoRouteError as e:
            log.warning("not profiling the swarm (%s); skip-join starts without a prefill estimate", e)
            profile = False
        app, self.engine, self.metrics = build_app(cfg, self.remote.local, self.executor, profile=profile)
        self.remote.stats.on_recovery = self.metrics.failover_recovery.observe
        add_dashboard(app, self.state)
        self.api = ApiServer(app, self.engine, cfg)
        self.address = f"{cfg.host}:{cfg.port}"
        self._rate: deque[tuple[float, int]] = deque()

    def start(self) -> None:
        self.api.start()
        print(f"swarmlm gateway: http://{self.address}/v1 (dashboard: /dashboard)", flush=True)

    def run(self) -> int:
        """The engine loop; returns 0 on a signal, 1 if the engine failed."""
        self.engine.run()
        return 1 if self.engine.error is not None else 0

    def stop(self) -> None:
        self.api.stop()

    def close(self) -> None:
        self.api.stop()
        self.api.join()
        self.executor.close()
        self.remote.close()

    async def state(self) -> dict[str, Any]:
        """What /dashboard shows: every peer of the swarm, per-layer coverage and this gateway's load."""
        records = await asyncio.get_running_loop().run_in_executor(
            None, lambda: fetch_records(self.remote.dht, self.remote.model_id, online_only=False)
        )
        records = [r for r in records if r.state != "offline"]
        online = [r for r in records if r.state == "online"]
        in_use = self.remote.active_peers()
        return {
            "model": self.remote.model_id,
            "num_layers": self.remote.config_model.num_layers,
            "ttl": self.ttl,
            "coverage": peers_per_layer(online, self.remote.config_model.num_layers),
            "peers": [self._peer(r, in_use) for r in records],
            "gateway": self._load(online),
            "training": await asyncio.get_running_loop().run_in_executor(None, self._training),
        }

    def _training(self) -> list[dict[str, Any]]:
        """Training runs in this DHT (`swarmlm train` peers announce their round and loss curve)."""
        found = self.remote.dht.get(TRAINING_KEY, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        runs = [{"run_id": run, **entry.value} for run, entry in found.value.items() if isinstance(entry.value, dict)]
        return sorted(runs, key=lambda r: str(r["run_id"]))

    def _peer(self, r: SpanRecord, in_use: dict[str, int]) -> dict[str, Any]:
        return {
            **r.to_wire(),
            "gateway_sessions": in_use.get(r.peer_id, 0),  # this gateway's requests in flight through it
            "last_seen": max(0.0, get_dht_time() - (r.expires - self.ttl)),  # stored with expiry = refresh + ttl
        }

    def _load(self, online: list[SpanRecord]) -> dict[str, Any]:
        engine: AsyncEngine = self.engine
        active = list(engine.engine.active)
        now, generated = time.monotonic(), self.metrics.generated
        self._rate.append((now, generated))
        while len(self._rate) > 2 and now - self._rate[0][0] > RATE_WINDOW:
            self._rate.popleft()
        t0, g0 = self._rate[0]
        missing = uncovered_layers(online, 0, self.remote.config_model.num_layers)
        if engine.error is not None:
            health = f"failed: {engine.error!r}"
        elif missing:
            health = f"degraded: no peer serves layers {format_layers(missing)}"
        else:
            health = "ok"
        stats = self.remote.stats
        return {
            "health": health,
            "running": sum(1 for s in active if s.first_scheduled is not None),
            "waiting": engine.num_queued + sum(1 for s in active if s.first_scheduled is None),
            "tokens_per_second": (generated - g0) / (now - t0) if now > t0 else 0.0,
            "failovers": stats.failovers,
            "recovery_seconds_median": sorted(stats.recovery_seconds)[len(stats.recovery_seconds) // 2]
            if stats.recovery_seconds
            else None,
        }


__all__ = ["Gateway", "GatewayConfig", "parse_address", "run_peer_with_gateway"]
