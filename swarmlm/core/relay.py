"""Peers behind NAT: relay settings for the libp2p daemon, and connection reversal.

A peer that nobody can dial (`--behind-nat`) reserves a slot at a relay among its --initial-peers; others
then reach it by its peer id alone, through `/p2p-circuit`. A relayed connection suits the DHT and small
calls, not tensors: the relay in hivemind 1.1.12's p2pd cuts every relayed connection after 128 KiB
(libp2p's default resources: p2pd starts a second relay service with them beside the one its
-relayDataLimit flag configures, and that one takes the hop protocol). So whoever must send a peer behind
NAT activations first asks it, over the relay, to dial back (`rpc_dial_back`): the peer behind NAT dials
out, which its NAT allows, and libp2p opens every later stream between the two on that direct
connection. Tested in namespaces behind a masquerading router: tests/test_nat.py.

This is the one module that reaches into hivemind's P2P internals, because hivemind has no public API for
either need: `P2P._make_process_args` (to pass p2pd's -relayDiscovery flag) and `P2P._client` (to dial a
peer at given addresses, and to see whether a connection is relayed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p import p2p_daemon as _p2p_daemon
from hivemind.utils.multiaddr import Multiaddr

CIRCUIT = "/p2p-circuit"
DIAL_TIMEOUT = 10.0
DIRECT_TTL = 30.0  # how long a checked direct connection is trusted before it is looked at again
MAX_DIAL_ADDRESSES = 8
_IP = re.compile(r"^/ip[46]/([^/]+)/")


def _static_relays(make_args: Any) -> Any:
    """p2pd's -relayDiscovery=1 (its default) hands the trusted relays to autorelay as a mere source of
    candidates, and autorelay waits out a 3-minute boot delay before reserving; with 0 they are static
    relays, reserved within milliseconds of start. Without autorelay the flag does nothing."""

    def make(*args: Any, **kwargs: Any) -> list[str]:
        return make_args(*args, **{**kwargs, "relayDiscovery": False})

    make.wrapped = True  # type: ignore[attr-defined]
    return make


if not getattr(_p2p_daemon.P2P._make_process_args, "wrapped", False):  # before any DHT process forks
    _p2p_daemon.P2P._make_process_args = staticmethod(_static_relays(_p2p_daemon.P2P._make_process_args))


def dht_relay_kwargs(initial_peers: list[str], behind_nat: bool, public: bool) -> dict[str, Any]:
    """hivemind DHT/P2P settings. Behind NAT: reserve a slot at the initial peers, which act as relays.
    Public (an announced address): say so at once, so that our relay service runs from the start (left
    to AutoNAT, it starts a minute later and drops the slots reserved meanwhile)."""
    if behind_nat:
        return {
            "use_relay": True,
            "use_auto_relay": True,
            "force_reachability": "private",
            "trusted_relays": list(initial_peers),
        }
    return {"use_relay": True, **({"force_reachability": "public"} if public else {})}


def is_public(maddr: str) -> bool:
    """Whether a multiaddr's IP is a global one (others on the internet could dial it)."""
    m = _IP.match(maddr)
    if m is None:
        return False
    try:
        return ipaddress.ip_address(m.group(1)).is_global
    except ValueError:  # a DNS name: assume it resolves to a public address
        return True


def direct_addresses(maddrs: list[str]) -> list[str]:
    """The addresses others may dial us at directly: no relay circuits, no loopback or wildcard ones."""
    out = []
    for m in maddrs:
        ip = _IP.match(m)
        if CIRCUIT in m or ip is None:
            continue
        try:
            address = ipaddress.ip_address(ip.group(1))
            if address.is_loopback or address.is_unspecified:
                continue
        except ValueError:  # a DNS name
            pass
        out.append(m.split("/p2p/")[0])
    return list(dict.fromkeys(out))


async def redial(p2p: P2P, peer_id: PeerID, maddrs: list[str]) -> None:
    """Replace our connection to `peer_id` by a direct one at `maddrs` (raises when none answers). The
    relayed connection is closed first: while any connection is open, the daemon's connect does nothing.
    The /p2p/ part is dropped: hivemind's Multiaddr encodes it in a form the daemon rejects."""
    addresses = [Multiaddr(m.split("/p2p/")[0]) for m in maddrs[:MAX_DIAL_ADDRESSES]]
    await p2p._client.disconnect(peer_id)
    await asyncio.wait_for(p2p._client.connect(peer_id, addresses), DIAL_TIMEOUT)


async def connection_kinds(p2p: P2P, peer_id: PeerID) -> set[str]:
    """ "direct" and/or "relayed": the kinds of our open connections to `peer_id` (empty: none)."""
    for info in await p2p._client.list_peers():
        if info.peer_id == peer_id:
            return {"relayed" if CIRCUIT in str(a) else "direct" for a in info.addrs}
    return set()


class DirectLinks:
    """Which peers we reached directly of late, so that a dial-back is asked for once, not per step."""

    def __init__(self) -> None:
        self._checked: dict[str, float] = {}

    def fresh(self, peer_id: str) -> bool:
        return time.monotonic() - self._checked.get(peer_id, -DIRECT_TTL) < DIRECT_TTL

    def mark(self, peer_id: str) -> None:
        self._checked[peer_id] = time.monotonic()


def reachability(visible: list[str], initial_peers: list[str], behind_nat: bool) -> str:
    """What a peer says at start about who can reach it, and what to do about it; `visible`: its DHT's
    visible multiaddrs once a relay slot had its chance."""
    circuits = [m for m in visible if CIRCUIT in m]
    direct = direct_addresses(visible)
    if behind_nat:
        if circuits:
            return (
                f"behind NAT: others reach this peer through a relay ({circuits[0]}); activations flow over "
                "connections it dials out, so a client behind NAT as well cannot use it: forward a port and "
                "pass --public-ip to be reached directly"
            )
        return (
            "behind NAT, but no relay slot yet: only peers this one dials can reach it (a relay is one of "
            "--initial-peers, with a public address)"
        )
    if direct and not any(is_public(m) for m in direct) and any(is_public(m) for m in initial_peers):
        return (
            f"reachable only at private addresses ({', '.join(direct)}) while the swarm is on public ones: others "
            "cannot dial this peer; pass --behind-nat (a relay), or forward a port and pass --public-ip"
        )
    if not direct:
        return "reachable on this machine only (--host-maddrs is loopback): listen on 0.0.0.0 to serve other machines"
    return f"reachable directly at {', '.join(direct)}"
