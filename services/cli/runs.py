"""`pipelines trigger|runs|run|logs|events`: start runs, follow them, read them back."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer

from services.cli.errors import INTERRUPTED
from services.cli.files import pairs
from services.cli.follow import follow
from services.cli.pipelines import Ref
from services.cli.render import Output, OutputOption, duration, emit_json, err, run_tree, status_line, table
from services.cli.session import Session, session

RunId = Annotated[str, typer.Argument(help="the run's id", metavar="RUN_ID")]


def watch(s: Session, run_id: str, *, statuses: bool = True) -> int:
    """Follows the run to its end (exit code of its outcome); Ctrl-C stops following, not the run."""
    gateway = s.api.info()["gatewayUrl"]
    try:
        return asyncio.run(follow(gateway, s.profile.token, run_id, statuses=statuses))
    except KeyboardInterrupt:
        err.print(f"stopped following; run {run_id} goes on (pipelines run {run_id})", markup=False)
        return INTERRUPTED


def trigger(
    ctx: typer.Context,
    ref: Ref,
    var: Annotated[list[str] | None, typer.Option("--var", help="a variable K=V (repeatable)")] = None,
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="a secret K=V, or K=@FILE to read it from FILE (repeatable)")
    ] = None,
    follow_run: Annotated[
        bool, typer.Option("--follow", help="stream the run's logs and statuses; exit 0/1/3 as it succeeds/fails/ends")
    ] = False,
    output: OutputOption = Output.text,
) -> None:
    """Trigger a run; prints its id (or, with --follow, follows it to its end)."""
    variables, secrets = pairs(var, "--var"), pairs(secret, "--secret", files=True)
    s = session(ctx)
    pipeline = s.api.pipeline(ref)
    body: dict[str, Any] = {}
    if variables:
        body["variables"] = variables
    if secrets:
        body["secrets"] = secrets
    run = s.api.post(f"/pipelines/{pipeline['id']}/trigger", body or None)
    if output is Output.json:
        emit_json(run)
    elif not follow_run:
        sys.stdout.write(run["id"] + "\n")
    if follow_run:  # the run's own status lines follow, from its first event
        raise typer.Exit(watch(s, run["id"]))
    status_line(f"run {run['id']} of {pipeline['name']}: {run['status']}", run["status"])


def runs(ctx: typer.Context, ref: Ref, output: OutputOption = Output.text) -> None:
    """List the pipeline's last 50 runs, newest first."""
    api = session(ctx).api
    pipeline = api.pipeline(ref)
    found = api.get(f"/pipelines/{pipeline['id']}/runs")
    if output is Output.json:
        emit_json(found)
        return
    table(
        ["ID", "STATUS", "VERSION", "BY", "CREATED", "DURATION"],
        [
            (
                r["id"],
                r["status"],
                r["definitionVersion"],
                r["triggeredBy"],
                r.get("createdAt"),
                duration(r["durationMs"]),
            )
            for r in found
        ],
    )


def run(ctx: typer.Context, run_id: RunId, output: OutputOption = Output.text) -> None:
    """Show a run: its stages, jobs and steps with their statuses and durations."""
    found = session(ctx).api.run(run_id)
    if output is Output.json:
        emit_json(found)
        return
    run_tree(found)


def logs(
    ctx: typer.Context,
    run_id: RunId,
    follow_logs: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming until the run ends")] = False,
) -> None:
    """Print a run's log (with -f, stream it live until the run ends)."""
    s = session(ctx)
    if follow_logs:
        raise typer.Exit(watch(s, run_id, statuses=False))
    sys.stdout.write(s.api.run(run_id)["logs"])


def events(ctx: typer.Context, run_id: RunId, output: OutputOption = Output.text) -> None:
    """List a run's stored events, in order."""
    api = session(ctx).api
    found = api.run(run_id)
    history = api.get(f"/pipelines/{found['pipelineId']}/runs/{found['id']}/events")
    if output is Output.json:
        emit_json(history)
        return
    table(["POSITION", "TYPE", "RECORDED"], [(e["position"], e["type"], e["recordedAt"]) for e in history])


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: pipelines trigger deploy-to-production --var VERSION=1.2.3 --follow")(trigger)
    app.command(epilog="Example: pipelines runs deploy-to-production --output json")(runs)
    app.command(epilog="Example: pipelines run 0b8e6c1e-2f5c-4a8e-9d2a-6f1f3c1d2e4f")(run)
    app.command(epilog="Example: pipelines logs 0b8e6c1e-2f5c-4a8e-9d2a-6f1f3c1d2e4f -f")(logs)
    app.command(epilog="Example: pipelines events 0b8e6c1e-2f5c-4a8e-9d2a-6f1f3c1d2e4f")(events)
