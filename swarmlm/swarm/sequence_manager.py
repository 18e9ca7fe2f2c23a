"""`RemoteSequenceManager`: a client's view of the swarm, shared by all its inference sessions.

It owns what outlives one generation (Petals' RemoteSequenceManager): the DHT node and the P2P handle
its streams use, the peers' records and routes through them, bans, the ledger view that says which
weights are the model's, spot-check verdicts, and the retry deadlines. Sessions (inference_session.py)
are handed a manager and use only its public methods.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from torch import Tensor

from swarmlm.core.dht import start_dht
from swarmlm.core.identity import Identity
from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Membership, load_membership
from swarmlm.core.relay import DirectLinks
from swarmlm.core.settings import LOCALHOST_MADDRS
from swarmlm.ledger.store import Ledger
from swarmlm.ledger.sync import SYNC_TIMEOUT, pull, push
from swarmlm.swarm.messages import WIRE_DTYPES, Row
from swarmlm.swarm.records import fetch_records
from swarmlm.swarm.routing import NoRouteError, RouteHop, find_route, holding_adapter
from swarmlm.swarm.servicer import PING_HANDLER, reach_directly
from swarmlm.swarm.span_record import SpanRecord
from swarmlm.swarm.span_stream import HopFailure, SpanStream
from swarmlm.swarm.versions import expected_digest, model_version

if TYPE_CHECKING:  # sessions are handed the manager; it only counts them
    from swarmlm.swarm.inference_session import InferenceSession

log = logging.getLogger("swarmlm.client")
T = TypeVar("T")

# How far a spot-check's recomputation may be from the hop's answer (relative L2 error): both crossed the
# wire in this format, and a prefill computes in another order than step-by-step decoding.
SPOT_CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 2e-2}
LEDGER_REFRESH_SECONDS = 30.0  # how often routing pulls new ledger entries (model versions) from a peer
RTT_REFRESH_SECONDS = 60.0  # how often a peer's round trip is measured again
PING_TIMEOUT = 2.0


@dataclass
class ClientConfig:
    wire_dtype: str = "bf16"
    step_timeout: float = 30.0  # a peer that does not answer a step within this is treated as dead
    route_timeout: float = 30.0  # how long to keep looking for a route before giving up
    ban_seconds: float = 15.0
    identity: str | None = None  # key file (default: a fresh identity)
    swarm_cert: str | None = None  # membership certificate of a private swarm, for that identity
    verify_weights: bool = True  # route only through peers serving the ledger's model version
    trusted_authors: tuple[str, ...] = ()  # whose model versions count (default: anyone's; see versions.py)
    spot_check: float = 0.0  # share of hop steps re-run on another peer to catch wrong activations
    allowed_peers: tuple[str, ...] = ()  # route only through these (Petals' allowed_servers); checks use any
    max_model_len: int | None = None  # context limit of generations (None: the model's), as `serve`'s
    # where our DHT node listens: peers behind NAT dial us back there (core/relay.py), so a client on another
    # machine than its peers listens on an address they can reach, e.g. /ip4/0.0.0.0/tcp/0
    host_maddrs: tuple[str, ...] = LOCALHOST_MADDRS


@dataclass
class SwarmStats:
    failovers: int = 0
    refused_weights: int = 0  # peers never routed through: their weights are not the model version's
    spot_checks: int = 0  # hop steps re-run on a second peer
    accusations: int = 0  # peers caught returning activations that two other peers disagree with
    recovery_seconds: list[float] = field(default_factory=list)  # failure seen -> the failed step answered
    on_recovery: Callable[[float], None] | None = None  # e.g. a Prometheus histogram's observe

    def recovered(self, seconds: float) -> None:
        self.failovers += 1
        self.recovery_seconds.append(seconds)
        if self.on_recovery is not None:
            self.on_recovery(seconds)


def relative_error(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


_replicas: dict[DHT, tuple[LoopThread, P2P]] = {}
_replicas_lock = threading.Lock()


def _shared_replica(dht: DHT) -> tuple[LoopThread, P2P]:
    """The one P2P replica (and loop) of a caller's DHT that all clients on it share in this process. A
    second replica of the same daemon gets no answer to unary calls (seen: the ledger pulls of every
    client after the first on one DHT timed out, while its streams worked), so replicas are not made per
    client. It lives as long as the process, like the DHT it serves."""
    with _replicas_lock:
        if dht not in _replicas:
            loop = LoopThread("swarmlm-client-shared")
            _replicas[dht] = (loop, loop.run(dht.replicate_p2p(), 60))
        return _replicas[dht]


class RemoteSequenceManager:
    """Routes through the swarm serving `model_id`'s `num_layers` layers, for any number of sessions."""

    def __init__(
        self,
        model_id: str,
        num_layers: int,
        initial_peers: Sequence[str] = (),
        *,
        dht: DHT | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        if self.config.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}")
        self.model_id, self.num_layers = model_id, num_layers
        self._own_dht, cert = dht is None, None
        identity = Identity.from_option(self.config.identity)
        if dht is None:
            cert = load_membership(self.config.swarm_cert, identity) if self.config.swarm_cert else None
            dht = start_dht(list(initial_peers), list(self.config.host_maddrs), identity, client=True, cert=cert)
        self.dht = dht
        self.membership = Membership(dht, cert)  # in a private swarm, peers serve us once this is published
        if self._own_dht:
            self._loop = LoopThread("swarmlm-client")
            self._p2p: P2P = self._loop.run(self.dht.replicate_p2p(), 60)
        else:
            self._loop, self._p2p = _shared_replica(dht)
        self._banned: dict[str, float] = {}
        self._links = DirectLinks()
        self.stats = SwarmStats()
        self.sessions: set[InferenceSession] = set()
        self.ledger = Ledger(None, identity)  # our view of the swarm's ledger: model versions, our accusations
        self._ledger_pulled = -math.inf
        self._refused: set[str] = set()
        self._rtt: dict[str, tuple[float | None, float]] = {}  # peer -> (round trip or None: no answer, when)

    # ----- transport: every stream and ledger call runs on the manager's loop --------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return self._loop.run(coro, timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return self._loop.submit(coro)

    @property
    def wire_dtype(self) -> torch.dtype:
        return WIRE_DTYPES[self.config.wire_dtype]

    async def open_stream(self, peer_id: str, handler: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await reach_directly(self._p2p, peer_id, self._links)  # a peer behind NAT dials us back first
        _, reader, writer = await self._p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
        return reader, writer

    # ----- records and routes ----------------------------------------------------------------------
    def records(self) -> list[SpanRecord]:
        """The swarm's live spans (called before every route, so it also keeps our membership published)."""
        if not self.membership.publish():
            log.warning("could not store our membership certificate in the DHT")
        return fetch_records(self.dht, self.model_id)

    def routable_records(self) -> list[SpanRecord]:
        """The live spans a route may use: with `verify_weights`, those whose announced weights digest is
        the ledger's model version's (a swarm whose ledger has no version yet cannot be checked)."""
        records = self.records()
        version = self.model_version(records) if self.config.verify_weights else None
        if version is None:
            return records
        routable = []
        for r in records:
            if expected_digest(version, r.start, r.end) == r.digest:
                routable.append(r)
            elif r.peer_id not in self._refused:
                self._refused.add(r.peer_id)
                self.stats.refused_weights += 1
                log.warning(
                    "not routing through %s: its weights for layers %d:%d are not the ledger's version of %s",
                    r.peer_id,
                    r.start,
                    r.end,
                    self.model_id,
                )
        return routable

    def model_version(self, records: list[SpanRecord]) -> dict[str, str] | None:
        """The model's version (layer digests) in the ledger, pulled from a random peer's copy now and then
        (often while there is none yet: the first peer signs it a moment after it starts)."""
        version = model_version(self.ledger.entries, self.model_id, self.config.trusted_authors)
        wait = LEDGER_REFRESH_SECONDS if version is not None else 2.0
        if records and time.monotonic() - self._ledger_pulled > wait:
            self._ledger_pulled = time.monotonic()
            peer = random.choice(records).peer_id
            try:
                self.run(pull(self._p2p, self.ledger, peer), 2 * SYNC_TIMEOUT)
            except Exception as e:  # unreachable, or a bad entry: what came before it is kept
                log.info("ledger pull from %s failed: %s", peer, e)
            version = model_version(self.ledger.entries, self.model_id, self.config.trusted_authors)
        return version

    def make_route(
        self, start: int, end: int | None = None, *, training: bool = False, adapters: set[str] | None = None
    ) -> list[RouteHop]:
        """The best chain from layer `start` to `end` (default: the last layer) through allowed, unbanned
        peers with the model's weights (for `training` passes, those that answer them; with `adapters`,
        those holding each of these LoRA adapters); NoRouteError when there is none now."""
        records = self.routable_records()
        if allowed := self.config.allowed_peers:
            records = [r for r in records if r.peer_id in allowed]
        if training:
            records = [r for r in records if r.gradients]
        for name in sorted(adapters or ()):
            records = holding_adapter(records, name)
        end = self.num_layers if end is None else end
        try:
            return find_route(records, start, end, self.banned_peers(), self.round_trips(records))
        except NoRouteError as e:
            if adapters:
                raise NoRouteError(f"{e} (with LoRA adapter {', '.join(sorted(adapters))})") from None
            raise

    def round_trips(self, records: list[SpanRecord]) -> dict[str, float]:
        """Seconds of a round trip to each peer of `records` that answers a ping (the best of two, measured
        again every RTT_REFRESH_SECONDS), so that routes prefer the nearer of equal spans."""
        now = time.monotonic()
        stale = {
            r.peer_id for r in records if now - self._rtt.get(r.peer_id, (None, -math.inf))[1] > RTT_REFRESH_SECONDS
        }
        if stale:
            measured = self.run(self._ping_all(sorted(stale)), 2 * PING_TIMEOUT + 5)
            self._rtt.update({peer: (rtt, now) for peer, rtt in measured.items()})
        return {peer: rtt for peer, (rtt, _) in self._rtt.items() if rtt is not None}

    async def _ping_all(self, peers: list[str]) -> dict[str, float | None]:
        return dict(zip(peers, await asyncio.gather(*(self._ping(p) for p in peers)), strict=True))

    async def _ping(self, peer_id: str) -> float | None:
        best = None
        for _ in range(2):  # the first may include dialing the peer
            t0 = time.perf_counter()
            try:
                call = self._p2p.call_protobuf_handler(
                    PeerID.from_base58(peer_id), PING_HANDLER, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
                )
                await asyncio.wait_for(call, PING_TIMEOUT)
            except Exception:  # unreachable, or a peer without rpc_ping: routing assumes HOP_SECONDS
                return best
            rtt = time.perf_counter() - t0
            best = rtt if best is None else min(best, rtt)
        return best

    # ----- bans ------------------------------------------------------------------------------------
    def ban(self, peer_id: str) -> None:
        """Route around `peer_id` for `ban_seconds` (it failed a step; it may be back soon)."""
        self._banned[peer_id] = time.monotonic() + self.config.ban_seconds

    def banned_peers(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in list(self._banned.items()) if until > now}  # sessions ban from many threads

    # ----- sessions --------------------------------------------------------------------------------
    def opened(self, session: InferenceSession) -> None:
        self.sessions.add(session)

    def closed(self, session: InferenceSession) -> None:
        self.sessions.discard(session)

    def active_peers(self) -> dict[str, int]:
        """Peer id -> how many of the open sessions route through it."""
        return dict(Counter(peer for session in list(self.sessions) for peer in session.peers()))

    # ----- verification ----------------------------------------------------------------------------
    def spot_check(
        self, hop: SpanStream, inputs: Tensor, output: Tensor, records: list[SpanRecord], adapter: str | None = None
    ) -> str | None:
        """Recompute `hop`'s last step on another peer among `records` covering its layers (and holding the
        row's LoRA `adapter`, the same file), from the session's whole input history into that hop
        (`inputs`); `output` is what the hop answered for the last rows. Outputs agree up to the wire
        format's rounding. On a mismatch a third peer decides who lied: that peer is banned for good and
        accused in the ledger. Returns the liar's peer id, or None."""
        start, end, suspect = hop.start, hop.end, hop.record.peer_id
        banned = self.banned_peers() | {suspect}
        others = [r for r in records if r.start <= start and end <= r.end and r.peer_id not in banned]
        if adapter is not None:
            others = [r for r in others if r.adapters.get(adapter) == hop.record.adapters.get(adapter)]
        if not others:
            return None  # nobody to compare with: this step goes unchecked
        random.shuffle(others)
        self.stats.spot_checks += 1
        tolerance = SPOT_CHECK_TOLERANCE[self.config.wire_dtype]
        n = output.shape[0]
        checks: list[tuple[str, Tensor]] = []  # (checker, its output) for the checkers that answered
        for record in others:
            checker = SpanStream(self, RouteHop(record, start, end), uuid.uuid4().hex)
            try:
                row = Row("0", 0, inputs.shape[0], inputs.shape[0], adapter)
                recomputed = checker.step(inputs, [row])[-n:]
            except HopFailure:
                continue  # an unreachable checker proves nothing; try the next one
            finally:
                checker.close()
            if not checks and relative_error(output, recomputed) <= tolerance:
                return None
            checks.append((record.peer_id, recomputed))
            if len(checks) == 2:
                break
        if len(checks) < 2:
            if checks:
                log.warning(
                    "peer %s and %s disagree on layers %d:%d; no third peer to decide",
                    suspect,
                    *checks[0][:1],
                    start,
                    end,
                )
            return None
        (first, out1), (_, out2) = checks
        liar = suspect if relative_error(out1, out2) <= tolerance else first
        error = relative_error(output, out1)
        self._banned[liar] = math.inf
        self.stats.accusations += 1
        log.warning(
            "peer %s returned wrong activations for layers %d:%d (relative error %.3g): banned",
            liar,
            start,
            end,
            error,
        )
        self.accuse(liar, {"span": [start, end], "relative_error": error, "checked_by": [p for p, _ in checks]})
        return liar

    def accuse(self, peer_id: str, evidence: dict[str, Any]) -> None:
        """Sign an accusation into our view of the ledger and hand it to the peers we still trust."""
        self.ledger.append("accusation", {"model": self.model_id, "accused": peer_id, **evidence})
        for record in self.routable_records():
            if record.peer_id not in self.banned_peers():
                try:
                    self.run(push(self._p2p, self.ledger, record.peer_id), 2 * SYNC_TIMEOUT)
                except Exception as e:  # unreachable or refusing: the others still get it
                    log.info("could not hand the accusation to %s: %s", record.peer_id, e)

    def close(self) -> None:
        for session in list(self.sessions):
            session.close()
        if self._own_dht:
            self._loop.stop(self._p2p)
            self.dht.shutdown()
