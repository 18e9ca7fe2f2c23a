"""Where a swarm node listens and how others reach it: the settings of every DHT node a user starts
(`swarmlm peer`, `swarmlm dht`), apart from core/dht.py (which imports hivemind) so that building the
command line stays quick."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from swarmlm.core.settings import LOCALHOST_MADDRS, setting

_TCP_LISTEN = re.compile(r"^/ip[46]/[^/]+/tcp/(\d+)")


@dataclass
class NetworkConfig:
    initial_peers: list[str] = setting(
        help="Multiaddr of any node already in the swarm (repeatable: any one that answers will do; none: start "
        "a new swarm)",
        factory=list,
    )
    host_maddrs: list[str] = setting(help="Where to listen (repeatable)", factory=lambda: list(LOCALHOST_MADDRS))
    announce_maddrs: list[str] = setting(
        help="Where others dial us, when not at --host-maddrs (a forwarded port, a proxy; repeatable)", factory=list
    )
    public_ip: str | None = setting(
        None, help="This machine's public IP, where a router forwards our fixed --host-maddrs port: announced"
    )
    behind_nat: bool = setting(
        False,
        help="Nobody can dial this machine (NAT, firewall): take a relay slot at --initial-peers (which need a "
        "public address) and dial out to whoever sends us activations",
    )
    identity: str | None = setting(None, help="Private key file: a stable peer id (created if missing)")
    swarm_cert: str | None = setting(None, help="Membership certificate (`swarmlm swarm invite`): join a private swarm")

    def announced(self) -> list[str]:
        """--announce-maddrs, plus each fixed TCP port of --host-maddrs at --public-ip. Raises ValueError (a
        line for the user) for a --public-ip that is no IP address, or with no fixed port to announce."""
        if self.public_ip is None:
            return list(self.announce_maddrs)
        try:
            ip = ipaddress.ip_address(self.public_ip)
        except ValueError:
            raise ValueError(f"--public-ip {self.public_ip!r} is not an IP address") from None
        ports = [m.group(1) for m in map(_TCP_LISTEN.match, self.host_maddrs) if m and m.group(1) != "0"]
        if not ports:
            raise ValueError(
                "--public-ip needs a fixed port to announce: listen on one, e.g. --host-maddrs /ip4/0.0.0.0/tcp/31337, "
                "and forward it to this machine"
            )
        return [*self.announce_maddrs, *(f"/ip{ip.version}/{ip}/tcp/{port}" for port in dict.fromkeys(ports))]
