"""The `swarmlm` command: one module per command family, assembled here.

Commands whose settings live in a config dataclass get their options from it (`options.py`); bad input
is one `error:` line with a documented exit code (`errors.py`, the table in `swarmlm -h`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swarmlm.cli.admin_commands import keys_app, ledger_app, swarm_app
from swarmlm.cli.config_file import load_config
from swarmlm.cli.demo_commands import demo_app
from swarmlm.cli.exits import EXIT_CODES_HELP, OneLineErrors, fail
from swarmlm.cli.logs import LEVELS, SETTINGS
from swarmlm.cli.serve_commands import dht, peer, serve, status
from swarmlm.cli.train_commands import data_app, evaluate, export_model, train

app = OneLineErrors(
    help="Serve and train language models on a swarm of ordinary machines.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    # Every option also reads SWARMLM_<COMMAND>_<OPTION> (cli/config_file.py has the precedence).
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "SWARMLM"},
)


def _print_version(value: bool) -> None:
    if value:
        from swarmlm.core.version import __version__

        typer.echo(f"swarmlm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit", callback=_print_version, is_eager=True)
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A TOML file of settings, a table per command (serve, peer, ...): flags and "
            "SWARMLM_<COMMAND>_<OPTION> variables override it",
            metavar="FILE",
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error (default: the command's)", metavar="LEVEL")
    ] = None,
    log_format: Annotated[str, typer.Option(help="text, or json: one JSON object a line")] = "text",
    log_file: Annotated[Path | None, typer.Option(help="Write the logs to this file, not standard error")] = None,
) -> None:
    """Serve and train language models on a swarm of ordinary machines."""
    if log_level is not None and log_level.lower() not in LEVELS:
        fail(f"--log-level {log_level!r}: give one of {', '.join(LEVELS)}")
    if log_format not in ("text", "json"):
        fail(f"--log-format {log_format!r}: give text or json")
    SETTINGS.level, SETTINGS.json, SETTINGS.file = log_level and log_level.lower(), log_format == "json", log_file
    if config is not None:
        ctx.default_map = load_config(config, ctx.command, ctx)


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
