"""Joining the hivemind DHT: every peer, client, gateway and trainer starts its node here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hivemind import DHT

from swarmlm.core import process_guard
from swarmlm.core.identity import Identity
from swarmlm.core.relay import dht_relay_kwargs, is_public

if TYPE_CHECKING:
    from swarmlm.core.membership import Certificate

DAEMON_START_TIMEOUT = 60.0  # hivemind's 15 s default is too tight for a loaded 2-core machine
DHT_TIMEOUT = 10.0  # every DHT call has a deadline: a dead DHT process must not hang its caller
# How hivemind says that none of the initial peers answered: its libp2p daemon could not connect to any,
# or it connected but no DHT node there answered a ping.
UNREACHABLE_SIGNS = ("failed to connect to bootstrap peers", "none of the initial_peers responded")


class SwarmUnreachableError(RuntimeError):
    """None of the initial peers answered: wrong addresses, or those peers are down."""


def start_dht(
    initial_peers: list[str],
    host_maddrs: list[str],
    identity: Identity | None = None,
    client: bool = False,
    cert: Certificate | None = None,
    announce_maddrs: list[str] | None = None,
    behind_nat: bool = False,
) -> DHT:
    """Join the DHT as `identity` (a fresh Ed25519 one if None): the key that authenticates our streams is
    the one that signs our ledger entries. hivemind's own identity check reads RSA keys only, so it is
    off; an Ed25519 peer id is collision-free anyway. With `cert`, as a member of a private swarm: our
    records are signed as a member's, and records that are not are refused. `announce_maddrs`: where others
    dial us, when not where we listen (`NetworkConfig.announced`). `behind_nat`: nobody can dial us; take
    a relay slot at the initial peers (core/relay.py)."""
    from swarmlm.core.membership import MembershipValidator  # it needs DHT_TIMEOUT from here

    process_guard.install()  # before the fork: the DHT process and its p2pd must die with us, even on SIGKILL
    identity = identity or Identity.generate()
    public = any(is_public(m) for m in [*(announce_maddrs or []), *host_maddrs])
    relaying = dht_relay_kwargs(initial_peers, behind_nat, public and not client)
    validators = [MembershipValidator(cert, identity)] if cert is not None else []
    with identity.key_file() as key:
        try:
            return DHT(
                record_validators=validators,
                initial_peers=initial_peers or None,
                host_maddrs=host_maddrs,
                announce_maddrs=announce_maddrs or None,
                identity_path=str(key),
                check_if_identity_free=False,
                client_mode=client,
                startup_timeout=DAEMON_START_TIMEOUT,
                start=True,
                **relaying,
            )
        except Exception as e:  # P2PDaemonError or RuntimeError, raised in hivemind's DHT process
            if any(sign in str(e) for sign in UNREACHABLE_SIGNS):
                raise SwarmUnreachableError(
                    f"could not reach any of --initial-peers {' '.join(initial_peers)}: "
                    "check the addresses and that those peers are running"
                ) from None
            raise
