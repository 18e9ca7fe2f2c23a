"""Hosts behind NAT on one machine: a public LAN of network namespaces, and private hosts behind a router
namespace that masquerades their traffic and drops every connection that starts outside.

    with NatLan(public=["relay", "client"], private=["home1", "home2"]) as lan:
        PeerProcess(..., "--host-maddrs", f"/ip4/{lan.ip('relay')}/tcp/0", prefix=lan.prefix("relay"))

The public LAN is 11.91.0.0/24: libp2p builds relay circuit addresses only from a relay's public
addresses, and an RFC 1918 range is not one (the namespaces reach nothing outside this machine, so the
range is never routed anywhere). The private hosts are 192.168.77.0/24 behind the router (11.91.0.1); the
public hosts have no route to them, as on the internet.

Needs root, iproute2 and nftables (`nft`). IPv4 only.
"""

from __future__ import annotations

import subprocess
from types import TracebackType

from swarmlm.launch.host_namespaces import HostNamespaces, run_ip

PUBLIC_NET, PRIVATE_NET = "11.91.0", "192.168.77"
_ROUTER_RULES = f"""
table ip swarmlm_nat {{
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "pub0" ip saddr {PRIVATE_NET}.0/24 masquerade
  }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "priv0" oifname "pub0" accept
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "pub0" ct state established,related accept
    iifname "pub0" drop
  }}
}}
"""


class NatLan(HostNamespaces):
    """Namespaces `swl-nat-NAME` for each public and private host, `swl-nat-lan` (the public bridge) and
    `swl-nat-router` (the NAT)."""

    network = "nat"

    def __init__(self, public: list[str], private: list[str]) -> None:
        self.public, self.private = list(public), list(private)
        ips = {name: f"{PUBLIC_NET}.{i + 2}" for i, name in enumerate(self.public)}
        super().__init__(ips | {name: f"{PRIVATE_NET}.{i + 2}" for i, name in enumerate(self.private)})
        self._made: list[str] = []

    def __enter__(self) -> NatLan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _netns(self, name: str) -> str:
        ns = self.namespace(name)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # left over by a killed run
        run_ip("netns", "add", ns)
        self._made.append(ns)
        run_ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _bridge(self, ns: str, bridge: str, address: str | None = None) -> None:
        run_ip("-n", ns, "link", "add", bridge, "type", "bridge")
        if address:
            run_ip("-n", ns, "addr", "add", address, "dev", bridge)
        run_ip("-n", ns, "link", "set", bridge, "up")

    def _attach(self, host: str, bridge_ns: str, bridge: str, address: str, port: str) -> None:
        """Host `host` gets eth0 with `address`, cabled to `bridge` in `bridge_ns` through `port`."""
        ns = self._netns(host)
        run_ip("link", "add", port, "netns", bridge_ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run_ip("-n", bridge_ns, "link", "set", port, "master", bridge)
        run_ip("-n", bridge_ns, "link", "set", port, "up")
        run_ip("-n", ns, "addr", "add", address, "dev", "eth0")
        run_ip("-n", ns, "link", "set", "eth0", "up")

    def _build(self) -> None:
        lan, router = self._netns("lan"), self._netns("router")
        self._bridge(lan, "br0")
        run_ip("link", "add", "pub-router", "netns", lan, "type", "veth", "peer", "name", "pub0", "netns", router)
        run_ip("-n", lan, "link", "set", "pub-router", "master", "br0")
        run_ip("-n", lan, "link", "set", "pub-router", "up")
        run_ip("-n", router, "addr", "add", f"{PUBLIC_NET}.1/24", "dev", "pub0")
        run_ip("-n", router, "link", "set", "pub0", "up")
        self._bridge(router, "priv0", f"{PRIVATE_NET}.1/24")
        for i, name in enumerate(self.public):
            self._attach(name, lan, "br0", f"{self.ips[name]}/24", f"pub{i}")
        for i, name in enumerate(self.private):
            self._attach(name, router, "priv0", f"{self.ips[name]}/24", f"home{i}")
            run_ip("-n", self.namespace(name), "route", "add", "default", "via", f"{PRIVATE_NET}.1")
        run_ip("netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run_ip("netns", "exec", router, "nft", "-f", "-", stdin=_ROUTER_RULES)

    def close(self) -> None:
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)
