"""`RemoteModel`: generate with a model whose layers live on swarm peers, surviving peer failures.

The client holds the token embeddings, the final norm and the head (Petals' split): only hidden states
(bf16 by default, ~1 KB per token for SmolLM2) cross the network, sampling happens here with the
engine's own sampling code, and the prompt never leaves this machine as text.

A generation is an `InferenceSession`: a chain of hops (one P2P stream each) whose spans cover every
layer. The session remembers what it sent into each boundary of the chain. When a hop fails (killed,
timed out, or answered an error), the session bans that peer for a while, routes a new chain from that
boundary to the end, replays the remembered inputs through it to rebuild the peers' KV caches, and
carries on with the step that failed: the text is the same as without the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from torch import Tensor

from swarmlm.core.dht import start_dht
from swarmlm.core.identity import Identity
from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Membership, load_membership
from swarmlm.engine.sampling import SamplingParams, apply_penalties, sample_row
from swarmlm.ledger.store import Ledger
from swarmlm.ledger.sync import SYNC_TIMEOUT, pull, push
from swarmlm.model.loading import load_model
from swarmlm.swarm.messages import WIRE_DTYPES, RemoteError, StepRequest, read_response
from swarmlm.swarm.records import SpanRecord, fetch_records
from swarmlm.swarm.routing import NoRouteError, RouteHop, find_route
from swarmlm.swarm.servicer import SpanServicer
from swarmlm.swarm.versions import expected_digest, model_version

log = logging.getLogger("swarmlm.client")

# How far a spot-check's recomputation may be from the hop's answer (relative L2 error): both crossed the
# wire in this format, and a prefill computes in another order than step-by-step decoding.
SPOT_CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 2e-2}
LEDGER_REFRESH_SECONDS = 30.0  # how often routing pulls new ledger entries (model versions) from a peer


class HopFailure(RuntimeError):
    pass


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


class _Hop:
    """One peer of a session's chain: a P2P stream carrying this session's steps for its span.

    The stream is driven message by message (hivemind's framing, one request then one reply) rather
    than through `iterate_protobuf_handler`, whose reader waits for the request iterator to finish
    before it reports a closed connection: a dead peer must surface at once, not at the deadline."""

    HANDLER = SpanServicer._get_handle_name(None, "rpc_inference")  # the name add_p2p_handlers registers

    def __init__(self, client: RemoteModel, route: RouteHop, session_id: str, max_length: int) -> None:
        self.client, self.record, self.start, self.end = client, route.record, route.start, route.end
        self.header = {
            "session_id": session_id,
            "model_id": route.record.model_id,
            "start": route.start,
            "end": route.end,
            "max_length": max_length,
        }
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def step(self, hidden: Tensor, position: int) -> Tensor:
        return self.client._loop.run(self.call(hidden, position), self.client.config.step_timeout + 5)

    async def call(self, hidden: Tensor, position: int) -> Tensor:
        """One step through this hop, on the client's loop; any failure is a HopFailure."""
        try:
            return await asyncio.wait_for(self._step(hidden, position), self.client.config.step_timeout)
        except Exception as e:  # a dead, hung, refusing or misbehaving peer: the session routes around it
            where = f"peer {self.record.peer_id[:12]}… (layers {self.start}..{self.end})"
            raise HopFailure(f"{where}: {type(e).__name__}: {e}") from e

    async def _step(self, hidden: Tensor, position: int) -> Tensor:
        header = None
        if self._writer is None:
            peer = PeerID.from_base58(self.record.peer_id)
            _, self._reader, self._writer = await self.client._p2p.call_binary_stream_handler(peer, self.HANDLER)
            header = self.header
        assert self._reader is not None
        wire = WIRE_DTYPES[self.client.config.wire_dtype]
        await P2P.send_protobuf(StepRequest(hidden.to(wire), position, header).to_proto(), self._writer)
        reply, err = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self._reader)
        if err is not None:
            raise RemoteError(err.message)
        return read_response(reply).float()

    async def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):  # the peer may be gone already
                await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
            writer.close()

    def close(self) -> None:
        self.client._loop.submit(self._close())


class InferenceSession:
    """One generation's chain of hops; `step()` runs new tokens' hidden states through every layer."""

    def __init__(self, client: RemoteModel, max_length: int) -> None:
        self.client = client
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.num_layers = client.config_model.num_layers
        self.hops: list[_Hop] = []
        self.position = 0  # tokens already processed by every hop
        self._inputs: dict[int, Tensor] = {}  # boundary layer -> inputs sent into it for positions < position
        client.sessions.add(self)

    def step(self, hidden: Tensor) -> Tensor:
        """hidden: [n, hidden_size] at positions position..position+n. Returns the last layer's output."""
        if self.position + hidden.shape[0] > self.max_length:
            raise ValueError(f"the session holds {self.max_length} tokens")
        current = {0: hidden}  # this step's input at each boundary
        layer, i = 0, 0
        failed_at: float | None = None
        while layer < self.num_layers:
            if i == len(self.hops):
                self._route_from(layer)
            timeout = self.client.config.step_timeout * (len(self.hops) - i) + 5
            for out in self.client._loop.run(self._through(i, current[layer]), timeout):
                hop = self.hops[i]
                if isinstance(out, HopFailure):
                    log.warning("hop failed, rerouting: %s", out)
                    failed_at = failed_at or time.monotonic()
                    if time.monotonic() - failed_at > self.client.config.route_timeout:  # peers that keep refusing
                        raise NoRouteError(f"no peer completed layers {hop.start}-{hop.end - 1}: {out}")
                    self.client.ban(hop.record.peer_id)
                    self._drop_hops(i)
                    break
                layer = hop.end
                current[layer] = out
                i += 1
            if layer == self.num_layers and (caught := self._spot_check(current)) is not None:
                layer, i = self.hops[caught].start, caught  # redo this step from the liar's layers on
                self._drop_hops(caught)
                current = {b: t for b, t in current.items() if b <= layer}
        if failed_at is not None:
            self.client.stats.recovered(time.monotonic() - failed_at)
        for boundary, tensor in current.items():
            if boundary < self.num_layers:
                past = self._inputs.get(boundary)
                self._inputs[boundary] = tensor if past is None else torch.cat([past, tensor])
        self.position += hidden.shape[0]
        return current[self.num_layers]

    def _spot_check(self, current: dict[int, Tensor]) -> int | None:
        """Re-run some of this step's hops on other peers (`ClientConfig.spot_check`); the index of a hop
        whose peer was caught lying (its output must be recomputed), or None."""
        share = self.client.config.spot_check
        if share <= 0:
            return None
        records: list[SpanRecord] | None = None  # looked up once per step, and only when a hop is drawn
        for i, hop in enumerate(self.hops):
            if random.random() >= share:
                continue
            records = records if records is not None else self.client.routable_records()
            past = self._inputs.get(hop.start)
            inputs = current[hop.start] if past is None else torch.cat([past, current[hop.start]])
            if self.client.spot_check(hop, inputs, current[hop.end], records) == hop.record.peer_id:
                return i
        return None

    async def _through(self, i: int, hidden: Tensor) -> list[Tensor | HopFailure]:
        """Run `hidden` through hops i.. in one visit to the loop thread (one thread hand-off per token, not
        one per hop): each hop's output, up to the first failure, which comes last."""
        outs: list[Tensor | HopFailure] = []
        for hop in self.hops[i:]:
            try:
                hidden = await hop.call(hidden, self.position)
            except HopFailure as e:
                outs.append(e)
                break
            outs.append(hidden)
        return outs

    def _drop_hops(self, i: int) -> None:
        """Close hops i.. and forget what was sent past the failed hop's start (the new chain's boundaries
        may differ; replay recomputes them)."""
        start = self.hops[i].start
        for hop in self.hops[i:]:
            hop.close()
        del self.hops[i:]
        self._inputs = {b: t for b, t in self._inputs.items() if b <= start}

    def _route_from(self, layer: int) -> None:
        """Append a chain covering layer..end, replaying the session's history through each new hop."""
        deadline = time.monotonic() + self.client.config.route_timeout
        first_new = len(self.hops)
        while True:
            try:
                records = self.client.routable_records()
                if allowed := self.client.config.allowed_peers:
                    records = [r for r in records if r.peer_id in allowed]
                chain = find_route(records, layer, self.num_layers, self.client.banned_peers())
                for route in chain:
                    hop = _Hop(self.client, route, self.session_id, self.max_length)
                    self.hops.append(hop)
                    if self.position > 0:
                        past = self._inputs[hop.start]  # every boundary's history is kept (see step)
                        out = hop.step(past, 0)  # replay: rebuilds this peer's KV for the session so far
                        if hop.end < self.num_layers:
                            self._inputs[hop.end] = out
                return
            except (NoRouteError, HopFailure) as e:
                if isinstance(e, HopFailure):
                    self.client.ban(self.hops[-1].record.peer_id)
                for hop in self.hops[first_new:]:
                    hop.close()
                del self.hops[first_new:]
                if time.monotonic() > deadline:
                    raise NoRouteError(f"{e} (gave up after {self.client.config.route_timeout:.0f} s)") from e
                time.sleep(0.5)  # records refresh every few seconds; a new peer may be joining

    def close(self) -> None:
        for hop in self.hops:
            hop.close()
        self.hops.clear()
        self.client.sessions.discard(self)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class RemoteModel:
    """A model served by a swarm, used like a local one.

    model = RemoteModel(initial_peers=["/ip4/…/p2p/…"])
    ids = model.generate(model.tokenizer.encode("Hello"), SamplingParams(max_tokens=20, temperature=0))
    """

    def __init__(
        self,
        model: str | None = None,
        initial_peers: Sequence[str] = (),
        *,
        dht: DHT | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        if self.config.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}")
        self.local = load_model(model, layers=(0, 0))  # embeddings, final norm and head
        self.model_id, self.tokenizer, self.config_model = self.local.model_id, self.local.tokenizer, self.local.config
        self._own_dht, cert = dht is None, None
        identity = Identity.from_option(self.config.identity)
        if dht is None:
            cert = load_membership(self.config.swarm_cert, identity) if self.config.swarm_cert else None
            dht = start_dht(list(initial_peers), ["/ip4/127.0.0.1/tcp/0"], identity, client=True, cert=cert)
        self.dht = dht
        self.membership = Membership(dht, cert)  # in a private swarm, peers serve us once this is published
        if self._own_dht:
            self._loop = LoopThread("swarmlm-client")
            self._p2p: P2P = self._loop.run(self.dht.replicate_p2p(), 60)
        else:
            self._loop, self._p2p = _shared_replica(dht)
        self._banned: dict[str, float] = {}
        self.stats = SwarmStats()
        self.sessions: set[InferenceSession] = set()
        self.ledger = Ledger(None, identity)  # our view of the swarm's ledger: model versions, our accusations
        self._ledger_pulled = -math.inf
        self._refused: set[str] = set()

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
                    "not routing through %s: its weights for layers %d..%d are not the ledger's version of %s",
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
                self._loop.run(pull(self._p2p, self.ledger, peer), 2 * SYNC_TIMEOUT)
            except Exception as e:  # unreachable, or a bad entry: what came before it is kept
                log.info("ledger pull from %s failed: %s", peer, e)
            version = model_version(self.ledger.entries, self.model_id, self.config.trusted_authors)
        return version

    def spot_check(self, hop: _Hop, inputs: Tensor, output: Tensor, records: list[SpanRecord]) -> str | None:
        """Recompute `hop`'s last step on another peer among `records` covering its layers, from the
        session's whole input history into that hop (`inputs`); `output` is what the hop answered for the
        last rows. Outputs agree up to the wire format's rounding. On a mismatch a third peer decides who
        lied: that peer is banned for good and accused in the ledger. Returns the liar's peer id, or None."""
        start, end, suspect = hop.start, hop.end, hop.record.peer_id
        banned = self.banned_peers() | {suspect}
        others = [r for r in records if r.start <= start and end <= r.end and r.peer_id not in banned]
        if not others:
            return None  # nobody to compare with: this step goes unchecked
        random.shuffle(others)
        self.stats.spot_checks += 1
        tolerance = SPOT_CHECK_TOLERANCE[self.config.wire_dtype]
        n = output.shape[0]
        checks: list[tuple[str, Tensor]] = []  # (checker, its output) for the checkers that answered
        for record in others:
            hop2 = _Hop(self, RouteHop(record, start, end), uuid.uuid4().hex, inputs.shape[0])
            try:
                recomputed = hop2.step(inputs, 0)[-n:]
            except HopFailure:
                continue  # an unreachable checker proves nothing; try the next one
            finally:
                hop2.close()
            if not checks and relative_error(output, recomputed) <= tolerance:
                return None
            checks.append((record.peer_id, recomputed))
            if len(checks) == 2:
                break
        if len(checks) < 2:
            if checks:
                log.warning(
                    "peer %s and %s disagree on layers %d..%d; no third peer to decide",
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
            "peer %s returned wrong activations for layers %d..%d (relative error %.3g): banned",
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
                    self._loop.run(push(self._p2p, self.ledger, record.peer_id), 2 * SYNC_TIMEOUT)
                except Exception as e:  # unreachable or refusing: the others still get it
                    log.info("could not hand the accusation to %s: %s", record.peer_id, e)

    def ban(self, peer_id: str) -> None:
        self._banned[peer_id] = time.monotonic() + self.config.ban_seconds

    def banned_peers(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in list(self._banned.items()) if until > now}  # sessions ban from many threads

    def active_peers(self) -> dict[str, int]:
        """Peer id -> how many of this client's open sessions route through it."""
        return dict(Counter(hop.record.peer_id for session in list(self.sessions) for hop in list(session.hops)))

    def inference_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self, max_length)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids one by one (stops at EOS, a stop token id or max_tokens)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        span = self.local.span
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        output: list[int] = []
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.tokenizer.eos_token_ids))
        with self.inference_session(len(prompt_ids) + params.max_tokens) as session:
            new = list(prompt_ids)
            while len(output) < params.max_tokens:
                hidden = session.step(span.embed_tokens(torch.tensor(new)))
                logits = span.head(hidden[-1:])[0]
                apply_penalties(logits, params, prompt_ids, output)
                token = sample_row(logits, params, generator)
                output.append(token)
                yield token
                if token in stops:
                    return
                new = [token]

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        return list(self.stream(prompt_ids, params))

    def close(self) -> None:
        for session in list(self.sessions):
            session.close()
        if self._own_dht:
            self._loop.stop(self._p2p)
            self.dht.shutdown()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
