"""launch/wan.py, the user-space router that puts hosts far apart on one machine: a TCP round trip
between two of its namespaces takes twice the one-way delay, and hosts reach each other by address."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
