"""The `pipelines` typer application: the root options and every command group."""

from __future__ import annotations

from typing import Annotated

import typer

from services.cli import agents, auth, control, local, pipelines, registry, runs
from services.cli.session import Session

app = typer.Typer(
    name="pipelines",
    help=(
        "Event-sourced CI/CD pipeline orchestrator: apply pipelines, trigger and follow runs, approve them.\n\n"
        "Exit codes: 0 ok (the run succeeded), 1 the run failed or the API refused, 2 usage, "
        "3 the run was cancelled or stopped, 4 authentication or permission, 5 the server cannot be reached."
    ),
    epilog="Example: pipelines trigger deploy-to-production --follow",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            "-p",
            help="the profile to use (default: the current one; PIPELINES_API_URL and PIPELINES_TOKEN override it)",
        ),
    ] = None,
) -> None:
    session = Session(profile)
    ctx.obj = session
    ctx.call_on_close(session.close)


for group in (local, auth, pipelines, runs, control, registry, agents):
    group.register(app)
