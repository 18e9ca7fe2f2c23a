"""A training peer's link to its run's swarm: the DHT, the averager, the ledger copy, and the rules for
using them.

- catch-up: a newcomer, or a peer restarted behind the others, downloads the global weights, the shared
  optimizer state and the round from the most advanced peer (hivemind's state sharing, priority = round);
- averaging: matchmaking keyed by the round, started early so the group is formed when the update is
  ready, and retried within `--averaging-timeout`; a failure may be one-sided (the others finished the
  round), so after one the peer looks whether it can take their state instead;
- announcements: the run's loss curve in the DHT, where a gateway's dashboard finds it;
- the end: linger while a straggler still needs our state, and collect the last round's ledger entries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from hivemind import DHT
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from torch import Tensor

from swarmlm.core.identity import Identity
from swarmlm.core.keys import TRAINING_KEY, training_start_key
from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Membership, load_membership
from swarmlm.ledger.store import Ledger
from swarmlm.ledger.sync import LedgerSync
from swarmlm.train.allreduce import RobustAverager
from swarmlm.train.ledger_rounds import RoundLedger
from swarmlm.train.replica import Download, Replica
from swarmlm.train.state_download import download_state
from swarmlm.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

TRAINING_TTL = 600.0
CURVE_POINTS = 200
ROUND_KEY_BITS = 16  # rounds in the matchmaking key, modulo 2**16: only neighbours need to differ


Gathered = dict[PeerID, object]  # what each member of a group sent along (its round and digest)


def group_base(gathered: Gathered, ours: tuple[int, str]) -> tuple[int, str]:
    """The (round, digest) most of a group started from; ties go to the highest, so every member picks
    the same one from the same gathered data."""
    bases = [(info["round"], info["digest"]) for info in gathered.values() if isinstance(info, dict)]
    return max(set(bases), key=lambda b: (bases.count(b), b)) if bases else ours


class SwarmLink:
    """Joins the run's swarm on creation (DHT, membership, ledger service, averager); `close` leaves it."""

    def __init__(
        self,
        cfg: TrainConfig,
        identity: Identity,
        replica: Replica,
        like: list[Tensor],
        names: list[str],
        dht: DHT | None = None,
        rewritten: Sequence[Tensor] = (),
    ) -> None:
        """`like`: tensors shaped as what is averaged; `names`: the trained tensors' names, which a download
        must match; `dht`: a node already started (the link owns it from then on), else it starts one;
        `rewritten`: tensors the trainer rewrites every step (its weights). hivemind forks the averager's
        process from ours: pages it inherits copy-on-write, our steps then copy, so it would keep a stale
        copy of every weight (3.8 GB in a 1.7B stage's averager). They go to shared memory first."""
        from swarmlm.core.dht import DAEMON_START_TIMEOUT, start_dht

        self.cfg, self.replica, self.names = cfg, replica, names
        self.ledger: RoundLedger | None = None
        self.averager: RobustAverager | None = None
        cert = load_membership(cfg.swarm_cert, identity) if cfg.swarm_cert else None
        ledger = Ledger(cfg.run_dir / "ledger.jsonl", identity)  # a tampered copy stops us here
        self.dht: DHT = dht or start_dht(cfg.initial_peers, cfg.host_maddrs, identity, cert=cert)
        try:
            self.membership = Membership(self.dht, cert)
            self.membership.publish()
            # The one P2P replica of our DHT in this process (a second one's handlers never get registered):
            # the ledger's service runs on it, and a pipeline stage's (pipeline_trainer.py).
            self.loop = LoopThread("swarmlm-ledger")
            self.p2p = self.loop.run(self.dht.replicate_p2p(), DAEMON_START_TIMEOUT)
            self.ledger = RoundLedger(LedgerSync(ledger, self.loop, self.p2p, self.membership), cfg, identity.peer_id)
            for tensor in rewritten:
                tensor.share_memory_()
            self.averager = RobustAverager(
                [torch.zeros_like(t) for t in like],
                self.dht,
                prefix=cfg.run_id,
                aggregation=cfg.aggregation,
                wire=cfg.wire,
                state_fn=replica.shared,
                membership=self.membership,
                target_group_size=cfg.target_group_size,
                min_group_size=cfg.min_group_size,
                min_matchmaking_time=cfg.matchmaking_time,
                request_timeout=cfg.matchmaking_time / 2,  # hivemind: below the matchmaking time
                allreduce_timeout=cfg.averaging_timeout,
                next_chunk_timeout=10.0,
                start=True,
            )
        except BaseException:
            self.close()
            raise
        self.offer(replica.round)

    @property
    def peer_id(self) -> PeerID:
        return self.dht.peer_id

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        if self.averager is not None:
            self.averager.shutdown()
        self.dht.shutdown()

    def _averager(self) -> RobustAverager:
        assert self.averager is not None, "the averager did not start"
        return self.averager

    def offer(self, round_: int) -> None:
        """Newcomers download from the peer offering the highest round."""
        self._averager().state_sharing_priority = float(round_)

    def publish_membership(self) -> None:
        if not self.membership.publish():
            logger.warning("could not store our membership certificate in the DHT")

    # ---- catch-up ----------------------------------------------------------------------------------

    def catch_up(self, at_least: int | None = None, wait: float = 0.0) -> bool:
        """Download the global state from the most advanced peer: if it is ahead of ours, or (`at_least`)
        once some peer has reached that round, trying for up to `wait` seconds."""
        deadline = time.monotonic() + wait
        wanted = self.replica.round + 1 if at_least is None else at_least
        while True:
            offers = sorted(self.offers().items(), key=lambda offer: offer[1], reverse=True)
            for peer in (p for p, r in offers if r >= wanted and p != self.peer_id):
                if self._download(peer, wanted):
                    self.offer(self.replica.round)
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def _download(self, peer: PeerID, wanted: int) -> bool:
        """`peer`'s state, if it is of round `wanted` or later and of our tensors. Its weights are staged in
        the averager's buffers, idle between rounds (held meanwhile: an all-reduce waits for them)."""

        def open_sink(meta: Mapping[str, object]) -> Download | None:
            round_ = meta.get("round")
            fits = isinstance(round_, int) and round_ >= wanted and meta.get("names") == self.names
            return self.replica.download(meta, staging) if fits else None

        with self.update_buffers() as staging:
            try:
                return self.loop.run(download_state(self.p2p, self.cfg.run_id, peer, open_sink, timeout=10.0), None)
            except Exception as e:  # a peer gone or broken mid-stream: the next one is asked
                logger.warning("downloading the state from %s failed: %s", peer, str(e) or type(e).__name__)
                return False

    def offers(self) -> dict[PeerID, float]:
        """The round each peer of this run offers its state at (read from the DHT: no download)."""
        found = self.dht.get(f"{self.cfg.run_id}.all_averagers", latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {
            PeerID(subkey): info.value
            for subkey, info in found.value.items()
            if isinstance(getattr(info, "value", None), float | int)
        }

    def best_shared_round(self) -> float:
        return max(self.offers().values(), default=-1.0)

    def wait_for_peers(self, count: int, wait: float) -> int:
        """Before a fresh run's first round: say we are ready, then wait up to `wait` seconds until `count`
        peers (this one included) are, so that peers started by hand a minute apart average from round 1
        instead of the first training alone, and start it within a moment of each other. Returns how many
        are ready."""
        key = training_start_key(self.cfg.run_id)
        self.dht.store(key, True, get_dht_time() + wait + TRAINING_TTL, subkey=str(self.peer_id))
        ready = self._ready_peers(key)
        if ready >= count:
            return ready
        logger.info(
            "waiting up to %.0f s for %d peers of run %s before round 1 (start them with --initial-peers "
            "and this peer's address; --min-peers 1 trains alone at once)",
            wait,
            count,
            self.cfg.run_id,
        )
        deadline = time.monotonic() + wait
        while ready < count and time.monotonic() < deadline:
            time.sleep(0.5)
            ready = self._ready_peers(key)
        if ready < count:
            logger.info("%d peer(s) of run %s ready after %.0f s: training with those", ready, self.cfg.run_id, wait)
        else:
            logger.info("%d peers of run %s ready: starting round 1", ready, self.cfg.run_id)
        return ready

    def _ready_peers(self, key: str) -> int:
        found = self.dht.get(key, latest=True)
        return len(found.value) if found is not None and isinstance(found.value, dict) else 0

    # ---- averaging ---------------------------------------------------------------------------------

    def _match_within_round(self, round_: int) -> None:
        """Match only with peers averaging from the same round: the round goes into the matchmaking key
        (hivemind's group bits). A straggler retrying round r would otherwise join the others' group for
        round r + 1 and mix a pseudo-gradient from stale weights into it. Set before every matchmaking:
        hivemind rewrites the bits each time a group assembles.

        With `--min-group-size 1` (the default) the group must also wait for the peers at our round: hivemind
        lets a peer that may average alone start alone as soon as it declares itself, before it has seen
        who else is looking, so two peers finishing a round together would each average alone."""
        averager = self._averager()
        averager.set_group_bits(format(round_ % 2**ROUND_KEY_BITS, f"0{ROUND_KEY_BITS}b"))
        if self.cfg.min_group_size == 1:
            here = sum(1 for r in self.offers().values() if r == round_)
            averager.set_min_group_size(max(1, min(here, self.cfg.target_group_size)))

    def _attempt_window(self) -> float:
        """How long one matchmaking attempt may wait before we look whether the others moved on: short,
        so a straggler notices a finished run while its peers still linger (see `linger`)."""
        return 3 * self.cfg.matchmaking_time

    def begin_average(self, base: tuple[int, str], whole_round: bool = False) -> StepControl:
        """Start matchmaking in the background while the last inner steps run (as hivemind's Optimizer
        pre-schedules it): the group is formed by the time the update is ready, and its all-reduce waits
        for `allow_allreduce`. The base sent along is already known: global weights do not change mid-round.
        The window covers the steps still to run: with `whole_round` (begun at the round's first step) the
        averaging timeout."""
        self._match_within_round(base[0])
        window = self.cfg.averaging_timeout if whole_round else self._attempt_window() + self.cfg.matchmaking_time
        gather = {"round": base[0], "digest": base[1]}
        return self._averager().step(
            gather=gather, timeout=window, allow_retries=False, wait=False, require_trigger=True
        )

    @contextmanager
    def update_buffers(self) -> Iterator[list[Tensor]]:
        """The averager's own tensors: an update is written into them in place before `average`, and the
        group's average read from them after it, so a round holds no other copy of the trained tensors.
        Hold them briefly: the all-reduce waits for them."""
        with self._averager().get_tensors() as buffers:
            yield list(buffers)

    def average(
        self, base: tuple[int, str], refill: Callable[[list[Tensor]], None], early: StepControl | None = None
    ) -> Gathered | None:
        """All-reduce the update in `update_buffers` with the current group (`early`: the matchmaking
        `begin_average` started), sending `base` (our round and digest) along. Returns what the members
        sent, the buffers then holding the average; None when no group formed or the round failed (the
        buffers then hold what a broken all-reduce left). A failed attempt may have written part of its
        result into the buffers: `refill` writes the update into them again before the next."""
        averager = self._averager()
        gather = {"round": base[0], "digest": base[1]}
        deadline = time.monotonic() + self.cfg.averaging_timeout
        failed = False
        while True:
            if failed:
                with self.update_buffers() as buffers, torch.no_grad():
                    refill(buffers)
                failed = False
            try:
                if early is not None:
                    control, early = early, None  # one try: a retry is a fresh step
                    control.allow_allreduce()
                    gathered = self._early_result(control, base[0])
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= self.cfg.matchmaking_time:
                        return None
                    window = min(remaining, self._attempt_window())
                    self._match_within_round(base[0])
                    gathered = averager.step(gather=gather, timeout=window, allow_retries=False)
                if gathered:
                    return gathered
            except Exception as e:  # hivemind raises on a failed group; the caller keeps its progress
                logger.warning("averaging failed in round %d: %s", self.replica.round, e)
                failed = True
            # A failure can be one-sided: the others may have finished this round. Then take their state.
            if self.catch_up() or time.monotonic() >= deadline:
                return None

    def _early_result(self, control: StepControl, round_: int) -> Gathered | None:
        """The group of a step begun early; None, cancelling it, if the others finished `round_` while we
        were still looking for them (a late peer's window is long: see `begin_average`)."""
        while True:
            try:
                return control.result(timeout=self.cfg.matchmaking_time)
            except TimeoutError:
                if control.stage == AveragingStage.LOOKING_FOR_GROUP and self.best_shared_round() > round_:
                    control.cancel()
                    return None

    def bytes_sent(self) -> int:
        return int(self._averager().bytes_sent.value)

    # ---- announcements and the end -----------------------------------------------------------------

    def announce(self, round_: int, group_size: int, curve: list[tuple[int, float]]) -> None:
        """Put the run's progress and loss curve in the DHT, where a gateway's dashboard finds it. Every
        peer of the run writes the same entry (its peers hold the same weights and curve)."""
        value = {"round": round_, "group": group_size, "curve": curve[-CURVE_POINTS:]}
        self.dht.store(TRAINING_KEY, value, get_dht_time() + TRAINING_TTL, subkey=self.cfg.run_id, return_future=True)

    def linger(self, round_: int) -> None:
        """Stay a moment after the last round, and longer while a peer of the run is still behind: a
        straggler (its last all-reduce broke on its side, or it came back late) downloads the final state
        from us. Bounded: a crashed peer's entry stays in the DHT until it expires."""
        time.sleep(self.cfg.linger)
        deadline = time.monotonic() + self.cfg.averaging_timeout
        while min(self.offers().values(), default=round_) < round_ and time.monotonic() < deadline:
            time.sleep(1.0)

    def wind_down(self, group: list[str], round_: int) -> None:
        """The end of a run: collect the last round's ledger entries while its signers linger, linger for
        stragglers ourselves, then collect what the other members signed meanwhile."""
        assert self.ledger is not None, "the ledger service did not start"
        self.ledger.pull(group, round_, wait=self.cfg.linger)
        self.linger(round_)
        self.ledger.pull(group, round_)
