"""`pipelines envs|components|channels|deployments`: what deploy and notify stages name."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from services.cli.errors import USAGE, CliError
from services.cli.render import Output, OutputOption, emit_json, err, out, table
from services.cli.session import session

Name = Annotated[str, typer.Argument(help="its name")]
ItemId = Annotated[str, typer.Argument(help="its id", metavar="ID")]
Description = Annotated[str | None, typer.Option("--description", help="what it is for")]


def _list(ctx: typer.Context, path: str, output: Output, columns: list[tuple[str, str]]) -> None:
    found = session(ctx).api.get(path)
    items = found["data"] if isinstance(found, dict) else found
    if output is Output.json:
        emit_json(found)
        return
    table([title for title, _ in columns], [[_cell(item, key) for _, key in columns] for item in items])


def _cell(item: dict[str, Any], key: str) -> Any:
    value: Any = item
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _create(ctx: typer.Context, path: str, body: dict[str, Any], output: Output) -> None:
    created = session(ctx).api.post(path, {k: v for k, v in body.items() if v is not None})
    if output is Output.json:
        emit_json(created)
        return
    out.print(created["id"], markup=False)


def _delete(ctx: typer.Context, path: str, item_id: str) -> None:
    session(ctx).api.delete(f"{path}/{item_id}")
    err.print(f"deleted {item_id}", markup=False)


envs = typer.Typer(
    epilog="Example: pipelines envs list", help="Environments (where deploy stages deploy).", no_args_is_help=True
)
components = typer.Typer(
    epilog="Example: pipelines components list", help="Components (what deploy stages deploy).", no_args_is_help=True
)
channels = typer.Typer(
    epilog="Example: pipelines channels list",
    help="Notification channels (where notify stages post).",
    no_args_is_help=True,
)
deployments = typer.Typer(
    epilog="Example: pipelines deployments list -o json", help="Deployment history.", no_args_is_help=True
)


@envs.command("list", epilog="Example: pipelines envs list")
def list_envs(ctx: typer.Context, output: OutputOption = Output.text) -> None:
    """List environments."""
    _list(ctx, "/environments", output, [("ID", "id"), ("NAME", "name"), ("DEPLOYER", "deployer.type")])


@envs.command("create", epilog="Example: pipelines envs create staging --deployer-command './deploy.sh $VERSION'")
def create_env(
    ctx: typer.Context,
    name: Name,
    deployer_command: Annotated[str | None, typer.Option(help="a shell command template that deploys")] = None,
    deployer_url: Annotated[str | None, typer.Option(help="a webhook URL POSTed each deployment")] = None,
    deployer_secret: Annotated[str | None, typer.Option(help="HMAC secret of the webhook deployer")] = None,
    description: Description = None,
    output: OutputOption = Output.text,
) -> None:
    """Create an environment (admin) with a command or a webhook deployer."""
    if (deployer_command is None) == (deployer_url is None):
        raise CliError("give one of --deployer-command and --deployer-url", USAGE)
    deployer: dict[str, Any] = (
        {"type": "command", "command": deployer_command}
        if deployer_command is not None
        else {"type": "webhook", "url": deployer_url, **({"secret": deployer_secret} if deployer_secret else {})}
    )
    _create(ctx, "/environments", {"name": name, "description": description, "deployer": deployer}, output)


@envs.command("delete", epilog="Example: pipelines envs delete ENVIRONMENT_ID")
def delete_env(ctx: typer.Context, item_id: ItemId) -> None:
    """Delete an environment (admin)."""
    _delete(ctx, "/environments", item_id)


@components.command("list", epilog="Example: pipelines components list --output json")
def list_components(ctx: typer.Context, output: OutputOption = Output.text) -> None:
    """List components."""
    _list(ctx, "/components", output, [("ID", "id"), ("NAME", "name"), ("DESCRIPTION", "description")])


@components.command("create", epilog="Example: pipelines components create checkout-api")
def create_component(
    ctx: typer.Context, name: Name, description: Description = None, output: OutputOption = Output.text
) -> None:
    """Create a component (admin)."""
    _create(ctx, "/components", {"name": name, "description": description}, output)


@components.command("delete", epilog="Example: pipelines components delete COMPONENT_ID")
def delete_component(ctx: typer.Context, item_id: ItemId) -> None:
    """Delete a component (admin)."""
    _delete(ctx, "/components", item_id)


@channels.command("list", epilog="Example: pipelines channels list")
def list_channels(ctx: typer.Context, output: OutputOption = Output.text) -> None:
    """List notification channels."""
    _list(ctx, "/channels", output, [("ID", "id"), ("NAME", "name"), ("TYPE", "type"), ("URL", "url")])


@channels.command(
    "create", epilog="Example: pipelines channels create '#deploys' --type slack --url https://hooks.slack.com/..."
)
def create_channel(
    ctx: typer.Context,
    name: Name,
    url: Annotated[str, typer.Option(help="where notifications are POSTed")],
    kind: Annotated[str, typer.Option("--type", help="slack or webhook")] = "webhook",
    secret: Annotated[str | None, typer.Option(help="HMAC secret (webhook channels)")] = None,
    description: Description = None,
    output: OutputOption = Output.text,
) -> None:
    """Create a notification channel (admin)."""
    body = {"name": name, "type": kind, "url": url, "secret": secret, "description": description}
    _create(ctx, "/channels", body, output)


@channels.command("delete", epilog="Example: pipelines channels delete CHANNEL_ID")
def delete_channel(ctx: typer.Context, item_id: ItemId) -> None:
    """Delete a notification channel (admin)."""
    _delete(ctx, "/channels", item_id)


@deployments.command("list", epilog="Example: pipelines deployments list --output json")
def list_deployments(ctx: typer.Context, output: OutputOption = Output.text) -> None:
    """List deployments, newest first."""
    columns = [("ID", "id"), ("STATUS", "status"), ("ENVIRONMENT", "environmentId"), ("COMPONENT", "componentId")]
    _list(ctx, "/deployments", output, [*columns, ("VERSION", "version"), ("RUN", "runId")])


def register(app: typer.Typer) -> None:
    app.add_typer(envs, name="envs")
    app.add_typer(components, name="components")
    app.add_typer(channels, name="channels")
    app.add_typer(deployments, name="deployments")
