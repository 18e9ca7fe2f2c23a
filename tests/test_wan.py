"""launch/wan.py, the user-space router that puts hosts far apart on one machine: a TCP round trip
between two of its namespaces takes twice the one-way delay, and hosts reach each other by address. And
routing through it: of two peers serving the same layers, a client takes the nearer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarmlm.launch.peers import PeerProcess, stop_all
from swarmlm.launch.wan import WanRouter

# Run on host "a": connect to host "b" and exchange one message, 3 times; print the best round trip.
PROBE = """
import socket, sys, time
best = 1e9
for _ in range(3):
    t = time.perf_counter()
    with socket.create_connection((sys.argv[1], 7001), timeout=10) as c:
        c.sendall(b"ping"); reply = c.recv(16)
    best = min(best, (time.perf_counter() - t) / 2)  # connect and the exchange: two round trips
    assert reply == b"ping", reply
print(best)
"""
ECHO = """
import socket
s = socket.create_server(("0.0.0.0", 7001))
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(c.recv(16)); c.close()
"""


@pytest.fixture(autouse=True)
def needs_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists():
        pytest.skip("the WAN router needs root, iproute2 (ip) and /dev/net/tun")


@pytest.mark.parametrize("delay", [0.0, 0.03])
def test_a_round_trip_takes_twice_the_one_way_delay(delay: float) -> None:
    with WanRouter(["a", "b"], delay=delay, subnet="10.81.0") as wan:
        echo = subprocess.Popen([*wan.prefix("b"), sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
            cmd = [*wan.prefix("a"), sys.executable, "-c", PROBE, wan.ip("b")]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            rtt = float(done.stdout)
        finally:
            echo.kill()
            echo.wait()
    assert 2 * delay <= rtt < 2 * delay + 0.1, rtt  # the bound above: a loaded 2-core machine
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "swl-wan-" not in listed  # the namespaces went with the router


# Run on the client's host: the chain a fresh client routes, its measured round trips, and a greedy run.
ROUTE = """
import json, sys
from swarmlm.engine.sampling import SamplingParams
from swarmlm.swarm.client import RemoteModel
with RemoteModel(sys.argv[1], initial_peers=[sys.argv[2]]) as m:
    route = [hop.record.peer_id for hop in m.manager.make_route(0)]
    rtt = m.manager.round_trips(m.manager.records())
    ids = m.generate(m.tokenizer.encode("The river"), SamplingParams(max_tokens=6, temperature=0))
    print(json.dumps({"route": route, "rtt": rtt, "ids": ids}))
"""


def test_of_two_equal_spans_the_client_takes_the_nearer(tiny_llama: Path) -> None:
    """Peers "near" and "far" both serve every layer; "far" is 60 ms from everyone, one way, and is the one
    the client joins through (so it is not chosen for being first)."""
    with WanRouter(["client", "near", "far"], delay=0.0, distance={"far": 0.06}, subnet="10.82.0") as wan:
        peers: list[PeerProcess] = []
        try:
            for host in ("far", "near"):
                listen = ("--host-maddrs", f"/ip4/{wan.ip(host)}/tcp/0", "--model", str(tiny_llama))
                initial = peers[0].maddr if peers else None
                peers.append(PeerProcess("--layers", "0:4", *listen, initial=initial, prefix=wan.prefix(host)))
                peers[-1].wait_ready()
            far, near = peers
            cmd = [*wan.prefix("client"), sys.executable, "-c", ROUTE, str(tiny_llama), far.maddr]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr[-3000:]
            found = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            stop_all(peers)
    assert found["route"] == [near.peer_id]
    assert found["rtt"][far.peer_id] >= 0.12 > found["rtt"][near.peer_id]
    assert len(found["ids"]) == 6
