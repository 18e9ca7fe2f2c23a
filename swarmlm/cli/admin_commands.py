"""`swarmlm swarm`, `swarmlm keys` and `swarmlm ledger`: private swarms, API keys and the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swarmlm.cli.exits import exit_with, fail

swarm_app = typer.Typer(help="Private swarms: an owner key and membership certificates.", no_args_is_help=True)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """'90' (seconds), '90s', '30m', '12h', '7d' -> seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 3600, 30m, 12h or 7d") from None
    if seconds <= 0:
        raise typer.BadParameter("must be positive")
    return seconds


@swarm_app.command("init")
def swarm_init(
    out: Annotated[Path, typer.Option("--out", help="Where to write the owner's key (keep it secret)")],
) -> None:
    """Make a swarm owner key; prints the swarm id (the owner's peer id)."""
    from swarmlm.core.identity import Identity

    if out.exists():
        fail(f"{out} exists; a swarm keeps its owner key")
    typer.echo(Identity.load_or_create(out).peer_id)


@swarm_app.command("id")
def swarm_id(
    identity: Annotated[Path, typer.Argument(help="A peer's key file (created if missing)")],
) -> None:
    """Print the peer id of a key file: what the owner invites."""
    from swarmlm.core.identity import Identity

    def run(path: Path) -> int:
        typer.echo(Identity.load_or_create(path).peer_id)
        return 0

    exit_with(run, identity)


@swarm_app.command("invite")
def swarm_invite(
    peer_id: Annotated[str, typer.Argument(help="The invited peer's id (`swarmlm swarm id KEYFILE`)")],
    owner: Annotated[Path, typer.Option(help="The owner key of `swarmlm swarm init`")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the certificate")],
    expires: Annotated[str, typer.Option(help="Lifetime: seconds, or 30m, 12h, 7d")] = "30d",
) -> None:
    """Sign a membership certificate for a peer; it joins with --identity KEYFILE --swarm-cert FILE."""
    from swarmlm.core.identity import Identity
    from swarmlm.core.membership import Certificate

    lifetime = _duration(expires)

    def run() -> int:
        Certificate.issue(Identity.load(owner), peer_id, lifetime).save(out)
        typer.echo(f"certificate for {peer_id} written to {out}", err=True)
        return 0

    exit_with(run)


keys_app = typer.Typer(help="API keys for `serve --api-keys` and `peer --api-keys`.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for (the user of per-user fairness)")],
    file: Annotated[Path, typer.Option("--file", help="The key file (created if missing; holds hashes only)")],
    rpm: Annotated[float | None, typer.Option(help="Requests per minute allowed (default: unlimited)")] = None,
    models: Annotated[list[str] | None, typer.Option("--model", help="Allow only this model (repeatable)")] = None,
) -> None:
    """Make a new API key: printed once, only its sha256 is stored."""
    from swarmlm.serve.auth import create_key

    def run() -> int:
        typer.echo(create_key(file, name, rpm, models))
        typer.echo(f"key {name!r} added to {file}; it is shown only now", err=True)
        return 0

    exit_with(run)


ledger_app = typer.Typer(
    help="The signed, hash-chained ledger of model versions and training rounds.", no_args_is_help=True
)
LedgerPath = Annotated[Path, typer.Argument(help="A copy of the ledger (a peer's --ledger file)")]


def _read_ledger(path: Path) -> list:
    from swarmlm.ledger.store import read_lines

    if not path.is_file():
        fail(f"no ledger at {path}")
    return read_lines(path)[0]


@ledger_app.command("show")
def ledger_show(
    path: LedgerPath,
    kind: Annotated[str | None, typer.Option(help="Only entries of this kind")] = None,
    last: Annotated[int | None, typer.Option(help="Only the last N entries")] = None,
) -> None:
    """List the entries of a copy of the ledger (unchecked: `swarmlm ledger verify` checks them)."""
    from rich.console import Console

    from swarmlm.ledger.render import entries_table

    Console().print(entries_table(_read_ledger(path), kind, last))


@ledger_app.command("verify")
def ledger_verify(
    path: LedgerPath,
    against: Annotated[
        Path | None, typer.Option(help="Another copy (e.g. another peer's): also report entries this one lacks")
    ] = None,
) -> None:
    """Check every hash, link and signature; name the first bad entry and exit 1 if there is one. With
    --against, also exit 1 if the other copy holds entries this one lacks (dropped newest entries leave a
    valid chain: only another copy shows them) or an author signed two different entries at one number."""
    from swarmlm.ledger.chain import compare_copies, verify_chain

    entries = _read_ledger(path)
    verdict = verify_chain(entries)
    if not verdict.ok:
        typer.secho(f"entry {verdict.first_bad} is bad: {verdict.reason}", fg=typer.colors.RED, err=True)
        typer.echo(f"the {verdict.entries} entries before it verify", err=True)
        raise typer.Exit(1)
    typer.secho(f"ok: {verdict.entries} entries, every hash, link and signature verified", fg=typer.colors.GREEN)
    if against is None:
        return
    others = _read_ledger(against)
    theirs = verify_chain(others)
    if not theirs.ok:  # its verified prefix still counts as evidence
        typer.echo(f"{against}: entry {theirs.first_bad} is bad ({theirs.reason}); compared its first {theirs.entries}")
    missing, forks = compare_copies(entries, others[: theirs.entries])
    for mine, other in forks:
        typer.secho(
            f"author {mine.author} signed two different entries #{mine.seq}: {mine.hash[:16]}… here, "
            f"{other.hash[:16]}… in {against}",
            fg=typer.colors.RED,
            err=True,
        )
    if missing:
        first = missing[0]
        typer.secho(
            f"this copy lacks {len(missing)} entries that {against} holds (the first: #{first.seq} by "
            f"{first.author}, {first.kind}): dropped, or not synced yet",
            fg=typer.colors.RED,
            err=True,
        )
    if missing or forks:
        raise typer.Exit(1)
    typer.secho(f"and it holds every entry of {against}", fg=typer.colors.GREEN)
