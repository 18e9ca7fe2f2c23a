"""`swarmlm peer`: join the DHT, pick a span, serve it to clients over P2P, heartbeat a record.

Threads (see async_engine.py for why the model's thread matters): the main thread loads the span and
runs the `SpanEngine`; an asyncio loop in a second thread serves P2P streams and hands steps to the
engine; a third refreshes the DHT record. The DHT itself and the libp2p daemon are hivemind's own
child processes; the peer runs in its own process group so a killed peer leaves none behind (its
parent or test harness kills the group).

A peer may carry a *sidecar*: something that runs beside it on the same DHT node and is announced in its
record. The serve layer's gateway (`serve/gateway.py`, `--api`) is the one sidecar; this module only knows
the `Sidecar` protocol, so the swarm layer never imports the HTTP layer above it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch
from hivemind import DHT
from hivemind.p2p import P2P

from swarmlm.core.dht import DAEMON_START_TIMEOUT, start_dht
from swarmlm.core.identity import Identity
from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Membership, load_membership
from swarmlm.core.relay import CIRCUIT, reachability
from swarmlm.core.sizes import format_size
from swarmlm.core.version import __version__
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.engine.span_engine import SpanEngine
from swarmlm.ledger.store import Ledger, ledger_path
from swarmlm.ledger.sync import LedgerSync
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.loading import checkpoint_digests, load_model, resolve_model
from swarmlm.model.lora import load_adapter, load_adapters, parse_adapter_specs
from swarmlm.swarm.peer_config import PeerConfig, parse_layers
from swarmlm.swarm.placement import Placement, host_fingerprint, place
from swarmlm.swarm.records import announce, fetch_records, withdraw
from swarmlm.swarm.routing import better_span, choose_span
from swarmlm.swarm.servicer import SpanServicer
from swarmlm.swarm.span_gradients import SpanGradients
from swarmlm.swarm.span_record import SpanRecord
from swarmlm.swarm.versions import expected_digest, model_version, version_body

log = logging.getLogger("swarmlm.peer")

RELAY_WAIT = 15.0  # behind NAT: how long the start waits for a relay slot before saying it has none


class Sidecar(Protocol):
    """What runs beside a peer (the gateway): started once the peer is up, announced in its record."""

    address: str  # host:port, announced as the record's `api`

    def start(self) -> None: ...

    def run(self) -> int:
        """Its main loop; returns an exit code when stopped."""
        ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


SidecarFactory = Callable[[DHT], Sidecar]  # given the peer's DHT node


def run_peer(cfg: PeerConfig, sidecar: SidecarFactory | None = None) -> int:
    if cfg.threads is not None:
        # Several peers on one machine must not each spin a thread per core: OpenMP workers that busy-wait
        # between steps steal the cores the next peer in the chain needs.
        torch.set_num_threads(cfg.threads)
    model_id, path = resolve_model(cfg.model)
    model = open_checkpoint(path).config
    span = None if cfg.layers == "auto" else parse_layers(cfg.layers, model.num_layers)  # fail early on a bad value
    placement = place(cfg, model, span)  # a budget too small for the span fails here, before joining
    for folder in parse_adapter_specs(cfg.adapters).values():
        load_adapter(folder, model, range(0))  # and so does an adapter that does not fit the model
    log.info(
        "%s, memory budget %s: %d layers of %s",
        placement.device,
        format_size(placement.budget.size),
        placement.span_layers,
        model_id,
    )
    identity = Identity.from_option(cfg.identity)
    cert = load_membership(cfg.swarm_cert, identity) if cfg.swarm_cert else None
    if sidecar is not None and cert is not None:
        raise ValueError("--api on a private swarm is not supported yet: its client would need its own certificate")
    ledger = Ledger(cfg.ledger or ledger_path(identity.peer_id), identity)  # a tampered copy stops us here
    try:
        dht = start_dht(
            cfg.initial_peers,
            cfg.host_maddrs,
            identity,
            cert=cert,
            announce_maddrs=cfg.announced(),
            behind_nat=cfg.behind_nat,
        )
    except BaseException:
        ledger.close()
        raise
    peer = Peer(cfg, model_id, model.num_layers, placement, dht, ledger, Membership(dht, cert), sidecar)
    try:
        return peer.serve(span)
    finally:
        peer.shutdown()


def gradients_refusal(cfg: PeerConfig) -> str | None:
    """Why this peer answers no fine-tuning passes, or None."""
    if cfg.no_gradients:
        return "this peer serves without gradients (--no-gradients): fine-tune through other peers"
    if cfg.quant != "none":
        return f"this peer's weights are {cfg.quant}-quantized, which have no gradients: fine-tune through other peers"
    return None


class Peer:
    """One running peer: its DHT node, its record, and the engine serving its current span."""

    def __init__(
        self,
        cfg: PeerConfig,
        model_id: str,
        num_layers: int,
        placement: Placement,
        dht: DHT,
        ledger: Ledger,
        membership: Membership,
        sidecar: SidecarFactory | None = None,
    ) -> None:
        self.cfg, self.model_id, self.num_layers, self.dht, self.ledger = cfg, model_id, num_layers, dht, ledger
        self.membership, self.placement = membership, placement
        self.record = SpanRecord(
            str(dht.peer_id),
            model_id,
            0,
            0,
            model_layers=num_layers,
            version=__version__,
            device=placement.device,
            host=host_fingerprint(),
            memory_budget=placement.budget.size,
            gradients=gradients_refusal(cfg) is None,
        )
        self.engine: SpanEngine | None = None
        self.stop = threading.Event()
        self.announcing = threading.Lock()  # a heartbeat in flight must not re-announce us after we withdrew
        self.move_to: tuple[int, int] | None = None
        self.loop: LoopThread | None = None
        self.p2p: P2P | None = None
        gradients = SpanGradients(gradients_refusal(cfg))
        self.servicer = SpanServicer(None, self.record, membership, cfg.perturb_outputs, gradients)
        self.make_sidecar = sidecar
        self.sidecar: Sidecar | None = None
        self.ledger_sync: LedgerSync | None = None
        self.version_checked = False  # the ledger's model version, against our span (`_check_version`)
        self.exit_code = 0  # 1 once the sidecar failed to start

    def serve(self, span: tuple[int, int] | None) -> int:
        for maddr in self.dht.get_visible_maddrs():
            print(f"swarmlm peer {self.dht.peer_id}: others join with --initial-peers {maddr}", flush=True)
        print(f"swarmlm peer: {self._reachability()}", flush=True)
        auto = self.cfg.layers == "auto"
        if auto:
            span = choose_span(fetch_records(self.dht, self.model_id), self.num_layers, self.placement.span_layers)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_exit)
        self.loop = LoopThread("swarmlm-p2p")
        self.p2p = self.loop.run(self.dht.replicate_p2p(), DAEMON_START_TIMEOUT)
        self.ledger_sync = LedgerSync(self.ledger, self.loop, self.p2p, self.membership, DAEMON_START_TIMEOUT)
        self.ledger.append("join", {"model": self.model_id, "version": __version__})
        if span is None:  # serves no layers: a bootstrap or gateway node
            self._heartbeat()
            threading.Thread(target=self._heartbeats, daemon=True).start()
            print(f"swarmlm peer ready: {self.model_id} layers 0:0 (no layers)", flush=True)
            if self.make_sidecar is None:
                self.stop.wait()
                return 0
            return self._start_sidecar().run()  # in the main thread, where its head runs fastest
        self.servicer.p2p = self.p2p  # pushes to the next peer of a chain go out through it
        self.loop.run(self.servicer.add_p2p_handlers(self.p2p), DAEMON_START_TIMEOUT)
        threading.Thread(target=self._heartbeats, daemon=True).start()
        while not self.stop.is_set():
            self._load(span)
            if self.stop.is_set():  # a signal that came while loading found no engine to stop
                break
            self._heartbeat()  # announce the (new) span before saying we are ready
            print(
                f"swarmlm peer ready: {self.model_id} layers {span[0]}:{span[1]} ({self.record.throughput:.1f} tok/s)",
                flush=True,
            )
            assert self.engine is not None
            if self.make_sidecar is not None and self.sidecar is None:
                # In a thread: starting the gateway profiles the swarm, which needs our own engine running.
                threading.Thread(target=self._run_sidecar, name="swarmlm-sidecar", daemon=True).start()
            self.engine.run()  # returns on a signal, or when the heartbeat decides to move
            if self.move_to is None:
                break
            span, self.move_to = self.move_to, None
        return self.exit_code

    def _reachability(self) -> str:
        """Who can reach us; behind NAT, waits up to RELAY_WAIT s for the relay slot (taken within
        milliseconds when a relay answers)."""
        deadline = time.monotonic() + RELAY_WAIT
        while True:
            visible = [str(m) for m in self.dht.get_visible_maddrs(latest=True)]
            if not self.cfg.behind_nat or CIRCUIT in " ".join(visible) or time.monotonic() > deadline:
                return reachability(visible, self.cfg.initial_peers, self.cfg.behind_nat)
            time.sleep(0.5)

    def _load(self, span: tuple[int, int]) -> None:
        cfg = self.cfg
        dtype = self.placement.dtype
        model = load_model(cfg.model, layers=span, dtype=dtype, device=cfg.device, quant=cfg.quant, edges=False)
        weight = next(model.span.parameters())
        adapters = load_adapters(cfg.adapters, model.config, range(*span), weight.device, weight.dtype)
        engine = SpanEngine(model.span, make_scheduler(cfg.scheduler), self.placement.kv_budget, adapters=adapters)
        r = self.record
        r.start, r.end, r.digest, r.dtype = span[0], span[1], model.digest, dtype
        r.adapters = {name: adapter.digest for name, adapter in adapters.items()}
        r.throughput = engine.measure_throughput()
        r.state = "online"
        self.engine = self.servicer.engine = engine
        self.version_checked = False
        attestation = {"model": self.model_id, "span": list(span), "digest": model.digest, "dtype": dtype}
        self.ledger.append("attestation", {**attestation, "quant": cfg.quant})

    def _start_sidecar(self) -> Sidecar:
        """Start the sidecar on our DHT node and announce its address in our record."""
        assert self.make_sidecar is not None
        self.sidecar = self.make_sidecar(self.dht)
        self.sidecar.start()
        self.record.api = self.sidecar.address
        self._heartbeat()
        return self.sidecar

    def _run_sidecar(self) -> None:
        try:
            sidecar = self._start_sidecar()
        except Exception:
            log.exception("the gateway failed to start; stopping the peer")
            self.exit_code = 1
            self._request_exit(signal.SIGTERM, None)
            return
        if not self.stop.is_set():  # a signal may have come while it started
            sidecar.run()

    def _request_exit(self, signum: int, _frame: object) -> None:
        log.info("signal %d: leaving the swarm", signum)
        self.stop.set()
        if self.engine is not None:
            self.engine.stop()
        if self.sidecar is not None:
            self.sidecar.stop()

    def _heartbeat(self) -> None:
        if (engine := self.engine) is not None:
            self.record.free_kv_tokens = engine.kv.capacity_tokens - engine.kv.used_tokens
            self.record.sessions = len(engine.sessions)
            self.record.queue = engine.waiting
        with self.announcing:
            if self.record.state == "offline":  # withdrawn: we are leaving
                return
            if not self.membership.publish():
                log.warning("could not store our membership certificate in the DHT")
            if not announce(self.dht, self.record, self.cfg.ttl):
                log.warning("could not store our record in the DHT (no reachable peers?)")
        if self.ledger_sync is not None:
            others = [r.peer_id for r in fetch_records(self.dht, self.model_id) if r.peer_id != self.record.peer_id]
            self.ledger_sync.pull_from_any(others)
            self._check_version()

    def _check_version(self) -> None:
        """Once per loaded span, after a ledger pull: sign the model's version if the ledger has none yet,
        and say so if our span is not that version's (clients will not route through us)."""
        if self.version_checked or self.engine is None:
            return
        self.version_checked = True
        version = model_version(self.ledger.entries, self.model_id)
        if version is None:
            version = checkpoint_digests(self.cfg.model)
            self.ledger.append("model_version", version_body(self.model_id, version))
            log.info("signed the model version of %s (%d layers) into the ledger", self.model_id, len(version))
        r = self.record
        if expected_digest(version, r.start, r.end) != r.digest:
            log.warning(
                "our weights for layers %d:%d differ from the ledger's version of %s: clients will not use us",
                r.start,
                r.end,
                self.model_id,
            )

    def _heartbeats(self) -> None:
        last_balance = time.monotonic()
        while not self.stop.wait(self.cfg.ttl / 3):
            try:
                self._heartbeat()
                period = self.cfg.rebalance_period
                if self.cfg.layers == "auto" and period > 0 and time.monotonic() - last_balance > period:
                    last_balance = time.monotonic()
                    self._rebalance()
            except Exception:  # a DHT hiccup must not end the heartbeat; the next one retries
                log.exception("heartbeat failed")

    def _rebalance(self) -> None:
        """Move to a better span when that raises the swarm's weakest layer by a clear margin."""
        if self.engine is None or self.move_to is not None:
            return
        records = [r for r in fetch_records(self.dht, self.model_id, online_only=False) if r.state != "offline"]
        target = better_span(records, self.record, self.num_layers, self.placement.span_layers)
        if target is not None:
            log.info("moving from layers %d:%d to %d:%d", self.record.start, self.record.end, *target)
            # Claim the target at once ("moving": counted for balance, skipped by routing) so that other
            # peers checking meanwhile do not all rush to the same hole.
            self.record.start, self.record.end, self.record.state = *target, "moving"
            self._heartbeat()
            self.move_to = target
            self.servicer.engine = None  # new sessions are refused at once until the new span is loaded
            self.engine.stop()

    def shutdown(self) -> None:
        self.stop.set()
        self.servicer.gradients.close()
        if self.sidecar is not None:
            self.sidecar.close()
        try:
            with self.announcing:
                withdraw(self.dht, self.record)
                self.record.state = "offline"
        except Exception:  # Ctrl-C in a terminal also reaches the DHT process: it may be gone already
            log.warning("could not withdraw our record; it expires within %.0f s", self.cfg.ttl)
        try:
            self.ledger.append("leave", {"model": self.model_id})
        finally:
            self.ledger.close()
        if self.loop is not None:
            self.loop.stop(self.p2p)
        self.dht.shutdown()
