"""`swarmlm serve`, `swarmlm peer`, `swarmlm dht` and `swarmlm status`: serving a model, alone or with a
swarm."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from swarmlm.cli.exits import exit_with, fail
from swarmlm.cli.input_checks import check_multiaddrs, check_port_free
from swarmlm.cli.logs import setup_logging
from swarmlm.cli.options import config_options
from swarmlm.core.network_config import NetworkConfig
from swarmlm.serve.server_config import GatewayConfig, ServeConfig, parse_address
from swarmlm.swarm.peer_config import PeerConfig


@config_options(cfg=ServeConfig)
def serve(cfg: ServeConfig) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    check_port_free(cfg.host, cfg.port, "--port")
    from swarmlm.serve.server import run_server

    setup_logging(logging.INFO)
    exit_with(run_server, cfg)


@config_options(cfg=PeerConfig, gateway=GatewayConfig)
def peer(cfg: PeerConfig, gateway: GatewayConfig) -> None:
    """Join (or start) a swarm and serve a span of the model's layers to its clients."""
    check_network(cfg)
    if gateway.api is not None:
        try:
            host, port = parse_address(gateway.api)
        except ValueError as e:
            fail(str(e))
        check_port_free(host, port, "--api")
        from swarmlm.serve.gateway import run_peer_with_gateway

        setup_logging(logging.INFO)
        exit_with(run_peer_with_gateway, cfg, gateway)
    from swarmlm.swarm.peer import run_peer  # no gateway: no HTTP stack, tokenizer or engine to import (3 s)

    setup_logging(logging.INFO)
    exit_with(run_peer, cfg)


@config_options(cfg=NetworkConfig)
def dht(cfg: NetworkConfig) -> None:
    """Run a DHT node alone: a door into the swarm that loads no model (list several with --initial-peers)."""
    check_network(cfg)
    from swarmlm.core.dht_node import run_dht_node

    setup_logging(logging.INFO)
    exit_with(run_dht_node, cfg)


def check_network(cfg: NetworkConfig) -> None:
    """Refuse malformed addresses and a bad --public-ip before anything slow starts."""
    check_multiaddrs(cfg.initial_peers, "--initial-peers", need_peer_id=True)
    check_multiaddrs(cfg.host_maddrs, "--host-maddrs")
    check_multiaddrs(cfg.announce_maddrs, "--announce-maddrs")
    try:
        cfg.announced()
    except ValueError as e:
        fail(str(e))


def status(
    initial_peers: Annotated[
        list[str] | None, typer.Option("--initial-peers", help="Multiaddr of any peer in the swarm (repeatable)")
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option(help="URL of a gateway (`swarmlm peer --api`): ask it instead of joining the DHT; quickest"),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="With --gateway: its API key, if /dashboard is protected")] = None,
    model: Annotated[str | None, typer.Option(help="The model whose swarm to show (default: the embedded one)")] = None,
    identity: Annotated[str | None, typer.Option(help="Key file (with --swarm-cert: the member's key)")] = None,
    swarm_cert: Annotated[
        str | None, typer.Option(help="Membership certificate (`swarmlm swarm invite`): look into a private swarm")
    ] = None,
) -> None:
    """Show the swarm's peers and per-layer coverage; exit code 1 if some layer has no live peer."""
    if gateway is not None:
        from swarmlm.swarm.status import GatewayStateError, fetch_gateway_state, print_gateway_state

        try:
            state = fetch_gateway_state(gateway, api_key)
        except GatewayStateError as e:
            fail(str(e), e.exit_code)
        raise typer.Exit(print_gateway_state(state))
    if not initial_peers:
        fail("give --initial-peers (any peer of the swarm) or --gateway (a gateway's URL)")
    check_multiaddrs(initial_peers, "--initial-peers", need_peer_id=True)

    def run() -> int:
        from swarmlm.core.dht import start_dht
        from swarmlm.core.identity import Identity
        from swarmlm.core.membership import load_membership
        from swarmlm.core.settings import LOCALHOST_MADDRS
        from swarmlm.model.loading import resolve_model
        from swarmlm.swarm.records import DEFAULT_TTL, fetch_records
        from swarmlm.swarm.status import model_layers, print_status

        model_id, path = resolve_model(model)
        me = Identity.from_option(identity)
        cert = load_membership(swarm_cert, me) if swarm_cert else None
        dht = start_dht(initial_peers, list(LOCALHOST_MADDRS), me, client=True, cert=cert)
        try:
            records = fetch_records(dht, model_id, online_only=False)
        finally:
            dht.shutdown()
        num_layers = model_layers(records)
        if not num_layers:  # no peer says (none, or older ones): the checkpoint does
            from swarmlm.model.checkpoint import open_checkpoint

            num_layers = open_checkpoint(path).config.num_layers
        return print_status(records, model_id, num_layers, DEFAULT_TTL)

    exit_with(run)
