"""`swarmlm dht`: a DHT node that loads no model and serves no layers (Petals' `run_dht`), so that no
serving peer is the swarm's door. Peers, clients and trainers join through any node: list several with
`--initial-peers`, and the swarm admits newcomers as long as one of them is up. A node with a stable
`--identity` keeps the address others have written down across restarts."""

from __future__ import annotations

import signal
import threading

from swarmlm.core.dht import start_dht
from swarmlm.core.identity import Identity
from swarmlm.core.membership import load_membership
from swarmlm.core.network_config import NetworkConfig


def run_dht_node(cfg: NetworkConfig) -> int:
    """Join (or start) the swarm's DHT and hold its records until SIGINT or SIGTERM; exit code 0."""
    announce = cfg.announced()  # a bad --public-ip fails before anything starts
    identity = Identity.from_option(cfg.identity)
    cert = load_membership(cfg.swarm_cert, identity) if cfg.swarm_cert else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dht = start_dht(
        cfg.initial_peers, cfg.host_maddrs, identity, cert=cert, announce_maddrs=announce, behind_nat=cfg.behind_nat
    )
    try:
        for maddr in dht.get_visible_maddrs():
            print(f"swarmlm dht {dht.peer_id}: others join with --initial-peers {maddr}", flush=True)
        print("swarmlm dht ready", flush=True)
        stop.wait()
    finally:
        dht.shutdown()
    return 0
