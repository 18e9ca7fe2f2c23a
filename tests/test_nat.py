"""Peers behind NAT: namespaces behind a masquerading router that drops every connection started outside
(launch/nat_lan.py), a relay on the public side, real peer processes, and a client on another public host.
The client's prompt is long enough (over 128 KiB of activations to each hop) that the relayed connection
alone could not carry it: the peers behind NAT dial back (core/relay.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmlm.core.relay import reachability
from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.launch.nat_lan import NatLan
from swarmlm.launch.peers import PeerProcess, stop_all
from swarmlm.model.loading import load_model

pytestmark = pytest.mark.slow

PUBLIC_PEER = "/ip4/11.91.0.2/tcp/4000/p2p/12D3KooWRelay"
TOKENS = 10

# Runs on the client's host: streams a greedy generation; after 4 tokens it prints the peers in use and
# waits for a line (the test kills one meanwhile); then prints the tokens and the failovers.
CLIENT = """
import json, sys
from swarmlm.engine.sampling import SamplingParams
from swarmlm.swarm.client import RemoteModel
from swarmlm.swarm.sequence_manager import ClientConfig

spec = json.loads(sys.argv[1])
config = ClientConfig(wire_dtype="fp32", host_maddrs=(spec["listen"],))
with RemoteModel(spec["model"], [spec["boot"]], config=config) as remote:
    out = []
    for token in remote.stream(spec["prompt"], SamplingParams(max_tokens=spec["tokens"], temperature=0)):
        out.append(token)
        if len(out) == 4:
            print(json.dumps({"active": sorted(remote.active_peers())}), flush=True)
            sys.stdin.readline()
    print(json.dumps({"tokens": out, "failovers": remote.stats.failovers}), flush=True)
"""


def test_what_a_peer_says_about_its_reachability() -> None:
    circuit = "/ip4/11.91.0.2/tcp/4000/p2p/12D3KooWRelay/p2p-circuit"
    assert "through a relay" in reachability([circuit, "/ip4/192.168.77.2/tcp/5000"], [PUBLIC_PEER], True)
    assert "no relay slot" in reachability(["/ip4/192.168.77.2/tcp/5000"], [PUBLIC_PEER], True)
    private = reachability(["/ip4/192.168.77.2/tcp/5000"], [PUBLIC_PEER], False)
    assert "--behind-nat" in private and "--public-ip" in private
    assert reachability(["/ip4/11.91.0.5/tcp/5000"], [PUBLIC_PEER], False).startswith("reachable directly")
    assert "this machine only" in reachability(["/ip4/127.0.0.1/tcp/5000"], [], False)


@pytest.fixture(scope="module")
def lan() -> Iterator[NatLan]:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "nft")):
        pytest.skip("NAT in network namespaces needs root, iproute2 (ip) and nftables (nft)")
    with NatLan(public=["relay", "client"], private=["home1", "home2"]) as built:
        yield built


def test_a_peer_behind_nat_serves_and_fails_over_through_a_relay(lan: NatLan, tiny_llama: Path) -> None:
    model = load_model(str(tiny_llama), device="cpu")
    prompt = model.tokenizer.encode(" ".join(f"word{i}" for i in range(400)))
    assert len(prompt) * model.config.hidden_size * 4 > 128 << 10  # more than a relayed connection carries
    engine = Engine(model, make_scheduler("fcfs"), EngineConfig(kv_budget_bytes=64 << 20))
    (seq,) = engine.add(prompt, SamplingParams(max_tokens=TOKENS, temperature=0))
    while engine.has_work:
        engine.step()

    serve = ("--model", str(tiny_llama), "--rebalance-period", "0")
    relay = PeerProcess(
        *serve, "--layers", "0:2", "--host-maddrs", f"/ip4/{lan.ip('relay')}/tcp/0", prefix=lan.prefix("relay")
    )
    peers = [relay]
    try:
        relay.wait_ready()
        assert "reachable directly at /ip4/11.91.0.2/tcp/" in relay.log.read_text()
        listen = ("--host-maddrs", "/ip4/0.0.0.0/tcp/0", "--behind-nat")
        homes = [
            PeerProcess(*serve, "--layers", "2:4", *listen, initial=relay.maddr, prefix=lan.prefix(h))
            for h in ("home1", "home2")
        ]
        peers += homes
        for home in homes:
            home.wait_ready()
            assert "behind NAT: others reach this peer through a relay (/ip4/11.91.0.2/" in home.log.read_text()
        spec = {"model": str(tiny_llama), "boot": relay.maddr, "prompt": prompt, "tokens": TOKENS}
        spec["listen"] = f"/ip4/{lan.ip('client')}/tcp/0"
        client = subprocess.Popen(
            [*lan.prefix("client"), sys.executable, "-c", CLIENT, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None
        first = client.stdout.readline()
        assert first, client.communicate(timeout=30)[1][-3000:]
        in_use = [h for h in homes if h.peer_id in json.loads(first)["active"]]
        assert len(in_use) == 1, first
        in_use[0].crash()  # kill -9 the peer behind NAT this session is using: the other takes over
        client.stdin.write("go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=180)
        assert client.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["tokens"] == seq.output_ids
        assert result["failovers"] >= 1
        assert "reaches us only through a relay" not in relay.log.read_text()  # every dial-back worked
    finally:
        stop_all(peers)
