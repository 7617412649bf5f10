"""Every command and every option of ``databroker`` says what it is for in ``--help``."""

from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from proxy.cli import main


def commands(
    command: click.Command, path: str = "databroker"
) -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from commands(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help() -> None:
    found = list(commands(main))
    assert {"databroker serve", "databroker sources apply"} <= {path for path, _ in found}
    missing = [
        f"{path} {'/'.join(param.opts)}"
        for path, command in found
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden and not param.help
    ]
    assert missing == []
    assert [path for path, command in found if not command.help] == []


def test_help_shows_the_log_variables() -> None:
    shown = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    for variable in ("DATABROKER_LOG_LEVEL", "DATABROKER_LOG_FORMAT", "DATABROKER_ACCESS_LOG"):
        assert variable in shown
