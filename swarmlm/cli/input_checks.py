"""Checks of a command's inputs that run before anything slow starts (hivemind, the model): a typo found
after a minute of loading, or as a libp2p daemon's stack trace, wastes the user's time."""

from __future__ import annotations

import socket

from swarmlm.cli.exits import fail
from swarmlm.core.multiaddr_parser import protocol_names


def check_multiaddrs(addresses: list[str], option: str, need_peer_id: bool = False) -> None:
    """Each address must parse as a multiaddr (hivemind's parser); a peer to join must end in /p2p/PEER_ID."""
    example = "/ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..." if need_peer_id else "/ip4/0.0.0.0/tcp/31337"
    for address in addresses:
        try:
            protocols = protocol_names(address)
        except Exception as e:  # the parser raises several kinds: ValueError, LookupError, binascii errors
            fail(f"{option} {address!r} is not a valid multiaddr ({e}); expected e.g. {example}")
        if need_peer_id and "p2p" not in protocols:
            fail(f"{option} {address!r} has no /p2p/PEER_ID part; expected e.g. {example}")


def check_port_free(host: str, port: int, option: str) -> None:
    """Bind HOST:PORT once, as the server will, so that a bad or busy port is refused before the model loads."""
    if not 0 < port < 65536:
        fail(f"{option} {port}: a port is a number from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        fail(f"{option}: cannot listen on host {host!r} ({e})")
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as e:
            fail(f"{option}: cannot listen on {host}:{port} ({e.strerror}); stop what uses it or choose another port")
