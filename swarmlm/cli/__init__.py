"""The `swarmlm` command: one module per command family, assembled here.

Commands whose settings live in a config dataclass get their options from it (`options.py`); bad input
is one `error:` line with a documented exit code (`errors.py`, the table in `swarmlm -h`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from swarmlm.cli.admin_commands import keys_app, ledger_app, swarm_app
from swarmlm.cli.demo_commands import demo_app
from swarmlm.cli.exits import EXIT_CODES_HELP, OneLineErrors
from swarmlm.cli.serve_commands import dht, peer, serve, status
from swarmlm.cli.train_commands import data_app, evaluate, export_model, train

app = OneLineErrors(
    help="Serve and train language models on a swarm of ordinary machines.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from swarmlm.core.version import __version__

        typer.echo(f"swarmlm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """Serve and train language models on a swarm of ordinary machines."""


app.command()(serve)
app.command()(peer)
app.command()(dht)
app.command()(status)
app.command()(train)
app.command("eval")(evaluate)
app.command("export")(export_model)
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")
app.add_typer(swarm_app, name="swarm")
app.add_typer(keys_app, name="keys")
app.add_typer(ledger_app, name="ledger")
