"""Verification of remote computation with real peers: a peer that announces the right weights but
perturbs its activations is caught by spot-checks, banned, and accused in the honest peers' ledgers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from swarmlm.core.dht import start_dht
from swarmlm.engine.sampling import SamplingParams
from swarmlm.launch.peers import PeerProcess, start_peers, stop_all
from swarmlm.ledger.chain import Entry
from swarmlm.ledger.store import ledger_path, read_lines
from swarmlm.model.loading import LoadedModel
from swarmlm.swarm.client import ClientConfig, RemoteModel
from swarmlm.swarm.routing import NoRouteError
from tests.test_swarm import local_greedy

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, PeerProcess]]:
    """Three peers holding every layer; the second returns its outputs with 5 % noise added."""
    names = ("honest1", "liar", "honest2")

    def make(rank: int, boot: str | None) -> PeerProcess:
        noise = ("--perturb-outputs", "0.05") if names[rank] == "liar" else ()
        return PeerProcess("--layers", "0:30", *noise, initial=boot)

    started = start_peers(len(names), make)
    try:
        yield dict(zip(names, started, strict=True))
    finally:
        stop_all(started)


def client_of(peers: dict[str, PeerProcess], **config: object) -> RemoteModel:
    client = RemoteModel(initial_peers=[peers["honest1"].maddr], config=ClientConfig(**config))  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while len(client.routable_records()) < 3:
        assert time.monotonic() < deadline, "the client never saw all three peers"
        time.sleep(0.5)
    return client


def test_a_lying_peer_is_caught_banned_and_accused(peers: dict[str, PeerProcess], model: LoadedModel) -> None:
    liar = peers["liar"].peer_id
    with client_of(peers, spot_check=1.0, allowed_peers=(liar,), route_timeout=5) as client:
        ids = client.tokenizer.encode(PROMPT)
        with pytest.raises(NoRouteError):  # caught at its first step; no other allowed peer is left
            client.generate(ids, SamplingParams(max_tokens=4, temperature=0))
        assert client.stats.accusations == 1 and liar in client.banned_peers()
    for name in ("honest1", "honest2"):
        entries = [e for e in read_lines(ledger_path(peers[name].peer_id))[0] if isinstance(e, Entry)]
        accused = [e.body for e in entries if e.kind == "accusation"]
        assert [a["accused"] for a in accused] == [liar], name
        assert accused[0]["relative_error"] > 0.02 and liar not in accused[0]["checked_by"]


def test_with_spot_checks_on_the_output_is_the_local_engines(peers: dict[str, PeerProcess], model: LoadedModel) -> None:
    """Honest peers agree within the wire format's rounding (no false accusation), and whichever peer the
    route takes, a lie would be caught and its step recomputed before a token is sampled."""
    with client_of(peers, spot_check=1.0) as client:
        ids = client.tokenizer.encode(PROMPT)
        for _ in range(2):
            assert client.generate(ids, SamplingParams(max_tokens=6, temperature=0)) == local_greedy(model, ids, 6)
        assert client.stats.spot_checks >= 12
        assert peers["honest1"].peer_id not in client.banned_peers()
        assert peers["honest2"].peer_id not in client.banned_peers()


def test_clients_sharing_one_dht_each_read_the_ledger(peers: dict[str, PeerProcess]) -> None:
    """Clients made one after another on the caller's DHT (as a gateway or a benchmark does) each pull the
    model version from a peer's ledger: a fresh P2P replica per client got no answer to unary calls."""
    dht = start_dht([peers["honest1"].maddr], ["/ip4/127.0.0.1/tcp/0"], client=True)
    try:
        for _ in range(2):
            with RemoteModel(dht=dht) as client:
                assert client.model_version(client.records()) is not None
    finally:
        dht.shutdown()
