"""Config fields that declare a setting once: its type, its default and the help text of its flag.

A config dataclass (`ServeConfig`, `PeerConfig`, `TrainConfig`, ...) declares each field with `setting`
or `internal`; `swarmlm.cli.options` builds the command's options from those fields, so a new field is a
new flag with no second declaration, and the flag's default is the field's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from swarmlm.core.sizes import parse_size

HELP = "help"  # the flag's help text; absent on internal fields
INTERNAL = "internal"  # why a field has no flag (set by tests and launchers, not by users)
CHOICES = "choices"  # the only values the flag accepts
PARSE = "parse"  # str -> value, for a field whose type a flag cannot spell (raises ValueError)
METAVAR = "metavar"
FLAGS = "flags"  # extra spellings, e.g. ("-o",)

LOCALHOST_MADDRS = ("/ip4/127.0.0.1/tcp/0",)  # where a peer listens unless told: this machine, any free port
ADAPTERS_HELP = (
    "NAME=PATH: also serve the peft LoRA adapter in folder PATH; requests name it as model MODEL:NAME (repeatable)"
)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    choices: Sequence[str] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    flags: Sequence[str] = (),
) -> Any:
    """A field that is a command-line flag (required when it has neither `default` nor `factory`)."""
    meta: dict[str, Any] = {HELP: help}
    if choices is not None:
        meta[CHOICES] = tuple(choices)
    if parse is not None:
        meta[PARSE] = parse
    if metavar is not None:
        meta[METAVAR] = metavar
    if flags:
        meta[FLAGS] = tuple(flags)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def size_setting(*, help: str) -> Any:
    """A flag that takes a size in bytes as `parse_size` reads it (8GiB, 1.5GB, 800MB, 123456); None unless given."""
    return setting(None, help=help, parse=parse_size, metavar="SIZE")


def internal(default: Any, *, why: str) -> Any:
    """A field with no flag: set by the code that builds the config (tests, launchers), not by users."""
    return dataclasses.field(default=default, metadata={INTERNAL: why})
