"""The `pipelines` command line's help: every command explains itself with an example; usage errors exit 2."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.cli import main
from services.cli.app import app


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and group (typer carries its own click: groups are what has `commands`)."""
    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path
        if hasattr(command, "commands"):
            yield from _commands(command, path)


COMMANDS = sorted(_commands(typer.main.get_group(app)))


def test_the_command_line_has_the_commands_of_the_issue() -> None:
    names = {" ".join(path) for path in COMMANDS}
    expected = {
        "up", "token", "login", "whoami", "list", "show", "apply", "validate", "delete", "trigger", "runs", "run",
        "logs", "events", "approve", "reject", "cancel", "stop", "pause", "resume", "envs list", "envs create",
        "envs delete", "components list", "components create", "components delete", "channels list",
        "channels create", "channels delete", "deployments list",
    }  # fmt: skip
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="pipelines", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example: pipelines " + path[0] in result.output


def test_a_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trigger"]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["token", "--sub", "a", "--role", "boss"]) == 2


@pytest.mark.parametrize(
    ("shell", "env"),
    [
        ("bash", {"_PIPELINES_COMPLETE": "complete_bash", "COMP_WORDS": "pipelines envs cr", "COMP_CWORD": "2"}),
        ("zsh", {"_PIPELINES_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "pipelines envs cr"}),
    ],
)
def test_shell_completion_completes_commands(shell: str, env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, [], prog_name="pipelines", env=env)
    assert "create" in result.output, (shell, result.output)
