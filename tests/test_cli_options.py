"""The command line is generated from the config dataclasses: every field is a flag with the field's
default, or is marked internal; a new field needs no second declaration."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from swarmlm.cli import app
from swarmlm.cli.options import cli_fields, config_options, field_default, flag
from swarmlm.core.network_config import NetworkConfig
from swarmlm.core.settings import INTERNAL, internal, setting
from swarmlm.serve.server_config import GatewayConfig, ServeConfig
from swarmlm.swarm.peer_config import PeerConfig
from swarmlm.train.train_config import PrepareConfig, TrainConfig

COMMANDS = {
    "serve": [ServeConfig],
    "peer": [PeerConfig, GatewayConfig],
    "dht": [NetworkConfig],
    "train": [TrainConfig],
    "data prepare": [PrepareConfig],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_config_field_is_a_flag_with_the_fields_default(name: str) -> None:
    command = get_command(app)
    for word in name.split():
        command = command.commands[word]  # type: ignore[attr-defined]
    options = {opt: p for p in command.params for opt in p.opts}
    for cls in COMMANDS[name]:
        for f in dataclasses.fields(cls):
            if INTERNAL in f.metadata:
                assert flag(f.name) not in options, f"{cls.__name__}.{f.name} is internal but has a flag"
                continue
            param = options.get(flag(f.name))
            assert param is not None, f"{cls.__name__}.{f.name} has no flag on `swarmlm {name}`"
            default = field_default(f)
            expected = None if default is inspect.Parameter.empty else default
            if param.required:
                assert expected is None, f"{flag(f.name)} is required but {cls.__name__} has a default"
            elif f.metadata.get("parse") is None:
                got = list(param.default) if isinstance(param.default, tuple) else param.default
                assert got == expected, f"{flag(f.name)}: flag default {got!r}, field default {expected!r}"


def test_only_the_record_lifetime_is_internal() -> None:
    internal_fields = {
        f.name
        for cls in (ServeConfig, PeerConfig, GatewayConfig, TrainConfig, PrepareConfig)
        for f in dataclasses.fields(cls)
        if INTERNAL in f.metadata
    }
    assert internal_fields == {"ttl"}


@dataclass
class Example:
    data: Path = setting(help="required")
    rounds: int = setting(3, help="a default")
    peers: list[str] = setting(help="repeatable", factory=list)
    part: tuple[int, int] | None = setting(None, help="parsed", parse=lambda s: tuple(map(int, s.split("/"))))
    mode: str = setting("a", help="a or b", choices=("a", "b"))
    secret: float = internal(1.5, why="tests only")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("--rounds must be positive")


def example_app() -> tuple[typer.Typer, list[object]]:
    seen: list[object] = []
    example = typer.Typer()

    @example.command()
    @config_options(cfg=Example)
    def run(cfg: Example, verbose: bool = False) -> None:
        seen.append((cfg, verbose))

    return example, seen


def test_a_command_receives_the_config_built_from_its_flags() -> None:
    example, seen = example_app()
    done = CliRunner().invoke(
        example,
        ["--data", "d", "--rounds", "5", "--peers", "x", "--peers", "y", "--part", "1/3", "--mode", "b", "--verbose"],
    )
    assert done.exit_code == 0, done.output
    assert seen == [(Example(Path("d"), 5, ["x", "y"], (1, 3), "b"), True)]
    assert seen[0][0].secret == 1.5  # type: ignore[index]

    assert CliRunner().invoke(example, ["--data", "d"]).exit_code == 0
    assert seen[-1] == (Example(Path("d")), False)


@pytest.mark.parametrize(
    "args",
    [[], ["--data", "d", "--mode", "c"], ["--data", "d", "--rounds", "0"], ["--data", "d", "--secret", "2"]],
    ids=["required missing", "not a choice", "refused by the config", "internal has no flag"],
)
def test_bad_flags_are_usage_errors(args: list[str]) -> None:
    example, seen = example_app()
    done = CliRunner().invoke(example, args)
    assert done.exit_code == 2 and not seen


def test_a_field_without_a_declaration_is_refused() -> None:
    @dataclass
    class Undeclared:
        plain: int = 1

    with pytest.raises(TypeError, match="declare plain with setting"):
        cli_fields(Undeclared)


def test_a_commands_own_options_sit_beside_the_generated_ones() -> None:
    train = get_command(app).commands["train"]  # type: ignore[attr-defined]
    helps = {opt: p.help for p in train.params for opt in p.opts}  # type: ignore[attr-defined]
    assert "export the best round" in (helps["--export"] or "") and "threads" in (helps["--threads"] or "")
