"""No special first peer: a DHT node alone (`swarmlm dht`) as the swarm's door, several --initial-peers of
which any one answering will do, and a swarm that keeps admitting newcomers after its door and then its
first peer are gone (kill -9). Real processes on loopback, a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

from swarmlm.engine.sampling import SamplingParams
from swarmlm.launch.peers import DhtProcess, PeerProcess, free_port, stop_all
from swarmlm.model.loading import load_model
from swarmlm.swarm.client import RemoteModel
from tests.test_cli_errors import unreachable_peer
from tests.test_swarm import local_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_the_swarm_outlives_its_door_and_its_first_peer(tiny_llama: Path) -> None:
    port = free_port()
    # Listening everywhere, announcing the address a router would forward (127.0.0.2 is this machine too).
    door = DhtProcess("--host-maddrs", f"/ip4/0.0.0.0/tcp/{port}", "--public-ip", "127.0.0.2").wait_ready()
    assert door.maddr == f"/ip4/127.0.0.2/tcp/{port}/p2p/{door.peer_id}"
    serve = ("--model", str(tiny_llama), "--layers", "0:4", "--rebalance-period", "0")
    procs: list[PeerProcess] = [door]
    try:
        first = PeerProcess(*serve, "--initial-peers", unreachable_peer(), "--initial-peers", door.maddr)
        procs.append(first.wait_ready())
        model = load_model(str(tiny_llama), device="cpu")
        ids = model.tokenizer.encode("The swarm has no special peer")
        want = local_greedy(model, ids, GREEDY.max_tokens)
        with RemoteModel(str(tiny_llama), [door.maddr]) as remote:  # the door serves no layers, yet lets us in
            assert remote.generate(ids, GREEDY) == want

        door.crash()
        procs.append(second := PeerProcess(*serve, initial=first.maddr).wait_ready())
        first.crash()
        procs.append(third := PeerProcess(*serve, initial=second.maddr).wait_ready())
        with RemoteModel(str(tiny_llama), [unreachable_peer(), third.maddr]) as remote:
            assert {second.peer_id, third.peer_id} <= {r.peer_id for r in remote.records()}
            assert remote.generate(ids, GREEDY) == want
    finally:
        stop_all(procs)
