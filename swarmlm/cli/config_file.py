"""`swarmlm --config FILE COMMAND ...`: settings from a TOML file, one table per command (`[serve]`,
`[peer]`, `[demo.train]`), keys named as the command's options (`max-batch-seqs` or `max_batch_seqs`).

Precedence is flag > environment > file > default, which is click's own order for a parameter (command
line, then its environment variable, then the context's `default_map`, then the default): the file
becomes the `default_map`, and every option reads `SWARMLM_<COMMAND>_<OPTION>` (click's
`auto_envvar_prefix`, e.g. SWARMLM_SERVE_PORT; SWARMLM_CONFIG names the file). Values are converted and
checked by the options themselves; a key that names no command or option is refused, not ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from swarmlm.cli.exits import UsageError


def load_config(path: Path, root: Any, ctx: Any) -> dict[str, Any]:
    """The `default_map` for `root` (the command group, typer's click) from the TOML file at `path`."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not TOML ({e})") from None
    return _defaults(table, root, ctx, path)


def _defaults(table: dict[str, Any], command: Any, ctx: Any, path: Path) -> dict[str, Any]:
    # click's classes are typer's own copy of click (cli/exits.py): told apart by what they have
    out: dict[str, Any] = {}
    for key, value in table.items():
        if hasattr(command, "get_command"):  # a group: its tables are its commands
            sub = command.get_command(ctx, key)
            if sub is None or not isinstance(value, dict):
                raise UsageError(f"--config {path}: [{key}] is not a command (tables: {', '.join(command.commands)})")
            out[key] = _defaults(value, sub, ctx, path)
            continue
        name = key.replace("-", "_")
        if name not in {p.name for p in command.params if p.param_type_name == "option"}:
            raise UsageError(f"--config {path}: `{command.name}` has no option --{key.replace('_', '-')}")
        out[name] = value
    return out
