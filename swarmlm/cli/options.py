"""A command's options built from config dataclasses: each setting is declared once, in its dataclass.

`@config_options(cfg=ServeConfig)` on `def serve(cfg: ServeConfig, ...)` gives `serve` one option per
field of `ServeConfig` (flag `--field-name`, the field's default, the help text of `core.settings.setting`)
and calls it with the config built from them; the command's other parameters stay plain typer options.
This is how torchtitan builds its command line from its job config.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from swarmlm.cli.exits import UsageError
from swarmlm.core.settings import CHOICES, FLAGS, HELP, INTERNAL, METAVAR, PARSE

F = TypeVar("F", bound=Callable[..., Any])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of a config that the command line sets (all but those marked internal)."""
    fields = dataclasses.fields(cls)
    undeclared = [f.name for f in fields if HELP not in f.metadata and INTERNAL not in f.metadata]
    if undeclared:  # a new field must say how users reach it, or why they do not
        raise TypeError(f"{cls.__name__}: declare {', '.join(undeclared)} with setting() or internal()")
    return [f for f in fields if INTERNAL not in f.metadata]


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty  # a required option


def _parameter(f: dataclasses.Field[Any], hint: Any) -> inspect.Parameter:
    meta = f.metadata
    default = field_default(f)
    if PARSE in meta:  # the flag takes text; the field's parser turns it into the value
        hint = str if default is inspect.Parameter.empty else str | None
    if CHOICES in meta:  # typer offers (and checks) the values of a Literal
        hint = typing.Literal[meta[CHOICES]]
    info = typer.Option(
        flag(f.name),
        *meta.get(FLAGS, ()),
        help=meta[HELP],
        metavar=meta.get(METAVAR),
        show_default=default not in (None, inspect.Parameter.empty, []),
    )
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hint, info])


def _build(cls: type, values: dict[str, Any]) -> Any:
    """The config from its options' values; a value its parser or the config itself refuses is a usage
    error (exit code 2), its message the one the config raised (a parser's after the flag and value, since
    one parser may serve several flags)."""
    try:
        for f in cli_fields(cls):
            parse = f.metadata.get(PARSE)
            if parse is not None and values[f.name] is not None:
                try:
                    values[f.name] = parse(values[f.name])
                except ValueError as e:
                    raise ValueError(f"{flag(f.name)} {values[f.name]!r}: {e}") from None
            elif isinstance(values[f.name], tuple):  # click hands repeatable options over as tuples
                values[f.name] = list(values[f.name])
        return cls(**values)
    except ValueError as e:
        raise UsageError(str(e)) from None


def config_options(**configs: type) -> Callable[[F], F]:
    """Replace the parameters named in `configs` (name -> config dataclass) by the configs' fields as
    options; the command receives each built config under its parameter's name."""

    def decorate(command: F) -> F:
        own = inspect.signature(command, eval_str=True).parameters
        params: list[inspect.Parameter] = []
        owner: dict[str, str] = {}  # option name -> the config parameter it belongs to
        for config_name, cls in configs.items():
            hints = typing.get_type_hints(cls)
            for f in cli_fields(cls):
                if f.name in owner or f.name in own:
                    raise TypeError(f"{command.__name__}: option {flag(f.name)} is declared twice")
                owner[f.name] = config_name
                params.append(_parameter(f, hints[f.name]))
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in own.items() if n not in configs]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            grouped: dict[str, dict[str, Any]] = {name: {} for name in configs}
            for name in owner:
                grouped[owner[name]][name] = values.pop(name)
            built = {name: _build(configs[name], fields) for name, fields in grouped.items()}
            return command(**built, **values)

        signature = inspect.Signature([*params, *rest])
        run.__signature__ = signature  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return typing.cast(F, run)

    return decorate
