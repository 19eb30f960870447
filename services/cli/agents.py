"""`pipelines agents create|list|revoke` (admin: agent credentials) and `pipelines agent` (run one
on this host: python -m services.agent)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from services.cli.render import Output, OutputOption, emit_json, err, out, table
from services.cli.session import session

agents = typer.Typer(
    epilog="Example: pipelines agents create --label linux --label arm64 --capacity 4 --save agent.json",
    help="Agents: hosts that run the steps the executor hands them (docs/scaling.md).",
    no_args_is_help=True,
)


@agents.command("create", epilog="Example: pipelines agents create --label linux --capacity 2 --save agent.json")
def create(
    ctx: typer.Context,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="a label it has (repeat)")] = None,
    capacity: Annotated[int, typer.Option(help="units it runs at once")] = 1,
    name: Annotated[str | None, typer.Option(help="a name to recognise it by")] = None,
    save: Annotated[
        Path | None, typer.Option(help="write its credentials (with the password) to this file, mode 0600")
    ] = None,
    output: OutputOption = Output.text,
) -> None:
    """Issue an agent's credentials (admin): the broker servers, its user and password, its labels."""
    body: dict[str, object] = {"labels": label or [], "capacity": capacity}
    if name is not None:
        body["name"] = name
    created = session(ctx).api.post("/agents", body)
    if save is not None:
        fd = os.open(save, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(created, f, indent=1)
        err.print(f"saved to {save}: run it with PIPELINES_AGENT_CREDS={save} pipelines agent", markup=False)
    if output is Output.json:
        emit_json(created)
        return
    out.print(created["id"], markup=False)


@agents.command("list", epilog="Example: pipelines agents list -o json")
def list_agents(ctx: typer.Context, output: OutputOption = Output.text) -> None:
    """List the agents this organization's runs may use (admin)."""
    found = session(ctx).api.get("/agents")
    if output is Output.json:
        emit_json(found)
        return
    rows = [[a["id"], a["name"], ",".join(a["labels"]), a["capacity"], "yes" if a["shared"] else ""] for a in found]
    table(["ID", "NAME", "LABELS", "CAPACITY", "SHARED"], rows)


@agents.command("revoke", epilog="Example: pipelines agents revoke ag_0123456789abcdef")
def revoke(ctx: typer.Context, agent_id: Annotated[str, typer.Argument(help="its id", metavar="ID")]) -> None:
    """Revoke an agent's credentials (admin): the broker disconnects it."""
    session(ctx).api.delete(f"/agents/{agent_id}")
    err.print(f"revoked {agent_id}", markup=False)


def run_agent() -> None:
    """Run an agent on this host (PIPELINES_AGENT_CREDS names its credential file)."""
    os.execv(sys.executable, [sys.executable, "-m", "services.agent"])


def register(app: typer.Typer) -> None:
    app.add_typer(agents, name="agents")
    example = "Example: pipelines agent  (PIPELINES_AGENT_CREDS=agent.json in its environment)"
    app.command("agent", epilog=example)(run_agent)
