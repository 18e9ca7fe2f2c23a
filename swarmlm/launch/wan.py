"""Hosts far apart on one machine: each host is a network namespace, and every packet between two hosts
passes through a router in this process that holds it for the one-way delay (optionally drops a share
and caps each host's incoming bandwidth). This kernel has no netem qdisc, so the delay cannot come from
`tc`; a TUN device per host hands the host's packets to user space instead. Everything between hosts is
delayed alike: DHT, peer-to-peer streams, all-reduce.

    with WanRouter(["a", "b", "c"], delay=0.025) as wan:   # 25 ms one way between any two hosts
        PeerProcess(..., "--host-maddrs", f"/ip4/{wan.ip('a')}/tcp/0", prefix=wan.prefix("a"))
    WanRouter(["a", "b", "c"], delay=0.0, distance={"c": 0.05})  # c is 50 ms from a and b, a and b close

Needs root, /dev/net/tun and iproute2. IPv4 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import os
import random
import selectors
import struct
import subprocess
import threading
import time
from types import TracebackType

from swarmlm.launch.host_namespaces import HostNamespaces, run_ip

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


class WanRouter(HostNamespaces):
    """Namespaces `swl-wan-NAME` with addresses SUBNET.1, .2, ... on a TUN device each, joined by a
    thread that forwards packets between them after `delay` seconds, plus `distance[NAME]` for every
    packet to or from that host (`loss`: share of packets dropped; `rate`: bits per second each host can
    receive, queued in order)."""

    network = "wan"

    def __init__(
        self,
        names: list[str],
        delay: float,
        loss: float = 0.0,
        rate: float | None = None,
        subnet: str = "10.80.0",
        distance: dict[str, float] | None = None,
    ) -> None:
        self.names, self.delay, self.loss, self.rate = list(names), delay, loss, rate
        super().__init__({name: f"{subnet}.{i + 1}" for i, name in enumerate(self.names)})
        distance = distance or {}
        # a host's address (4 bytes) -> the delay it adds to every packet it sends or receives
        self._distance = {bytes(map(int, ip.split("."))): distance.get(name, 0.0) for name, ip in self.ips.items()}
        self.fds: dict[bytes, int] = {}  # a host's address (4 bytes) -> its TUN device's file descriptor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._forward, name="swarmlm-wan", daemon=True)
        self._random = random.Random(0)

    def __enter__(self) -> WanRouter:
        try:
            for i, name in enumerate(self.names):
                ns, dev, ip = self.namespace(name), f"swlwan{i}", self.ips[name]
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover of a killed run
                run_ip("netns", "add", ns)
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", dev.encode(), _IFF_TUN | _IFF_NO_PI))
                self.fds[bytes(map(int, ip.split(".")))] = fd
                # The device moves into the host's namespace; our descriptor keeps reading and writing it.
                run_ip("link", "set", dev, "netns", ns)
                run_ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                run_ip("-n", ns, "link", "set", dev, "up")
                run_ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        for name in self.names:
            subprocess.run(["ip", "netns", "del", self.namespace(name)], capture_output=True)

    def _forward(self) -> None:
        """Read every host's packets, release each at its due time to the host it is addressed to."""
        selector = selectors.DefaultSelector()
        for fd in self.fds.values():
            selector.register(fd, selectors.EVENT_READ)
        due: list[tuple[float, int, int, bytes]] = []  # (release time, order, destination fd, packet)
        link_free = dict.fromkeys(self.fds.values(), 0.0)  # when each host's incoming link is idle again
        order = itertools.count()
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = min(max(due[0][0] - now, 0.0), 0.05) if due else 0.05
            for key, _ in selector.select(timeout):
                while True:
                    try:
                        packet = os.read(key.fd, 65536)
                    except BlockingIOError:
                        break
                    destination = self.fds.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
                    if destination is None or (self.loss and self._random.random() < self.loss):
                        continue
                    far = self._distance.get(packet[12:16], 0.0) + self._distance.get(packet[16:20], 0.0)
                    release = time.monotonic() + self.delay + far
                    if self.rate:
                        release = max(release, link_free[destination]) + len(packet) * 8 / self.rate
                        link_free[destination] = release
                    heapq.heappush(due, (release, next(order), destination, packet))
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, destination, packet = heapq.heappop(due)
                with contextlib.suppress(OSError):  # the host's device is gone or full: lost, as on a wire
                    os.write(destination, packet)
        selector.close()
