"""What a user sees when a command cannot do what was asked: one `error: ...` line and an exit code.

Tracebacks are for bugs. A bad flag value, a missing file, a busy port or an unreachable swarm is the
user's to fix, so it is one line saying what is wrong and what to do, and an exit code a script can test.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer

# Recent typer releases carry their own copy of click: take the exception classes from wherever typer's
# own BadParameter comes from, so that `except` matches what typer raises.
_click_errors = importlib.import_module(typer.BadParameter.__module__)
ClickException: type[Exception] = _click_errors.ClickException
UsageError: type[Exception] = _click_errors.UsageError
NoArgsIsHelpError: type[Exception] = _click_errors.NoArgsIsHelpError

EXIT_USAGE = 2  # a bad flag value or input file: the command did not start
EXIT_UNREACHABLE = 3  # none of --initial-peers answered

EXIT_CODES_HELP = """Exit codes:

0 done, or stopped by Ctrl-C / SIGTERM

1 `status`: some layer has no live peer; `ledger verify`: a bad or missing entry; a server's engine failed

2 bad input: an unknown option or value; a bad multiaddr, port, --public-ip, --layers or --device; a busy port; \
a --max-memory too small for what was asked; a model or key file that cannot be read

3 the swarm is unreachable: no --initial-peers answered (`train`: also no group for --patience rounds)"""


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: message` in red on stderr and exit with `code`."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def exit_with(run: Callable[..., int], *args: Any) -> NoReturn:
    """Run a command's work and exit with its code; what the user can fix becomes one line, not a
    traceback: an unreachable swarm exit code 3, a bad model, setting or file exit code 2."""
    from swarmlm.core.dht import SwarmUnreachableError
    from swarmlm.model.checkpoint import CheckpointError

    try:
        code = run(*args)
    except SwarmUnreachableError as e:
        fail(str(e), EXIT_UNREACHABLE)
    except (CheckpointError, ValueError, OSError) as e:  # OSError: a file that cannot be read or written
        fail(str(e))
    raise typer.Exit(code)


class OneLineErrors(typer.Typer):
    """A typer app whose usage errors (unknown option, value of the wrong type) are one `error:` line too,
    with the command's `-h` as the hint, instead of a boxed panel."""

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs.setdefault("prog_name", "swarmlm")
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # `swarmlm data` alone: its help, as click does
            e.show()
            code = e.exit_code
        except UsageError as e:
            hint = f" (see `{e.ctx.command_path} -h`)" if e.ctx else ""
            typer.secho(f"error: {e.format_message()}{hint}", fg=typer.colors.RED, err=True)
            code = e.exit_code
        except ClickException as e:
            typer.secho(f"error: {e.format_message()}", fg=typer.colors.RED, err=True)
            code = e.exit_code
        except typer.Abort:
            code = 130
        sys.exit(code if isinstance(code, int) else 0)
