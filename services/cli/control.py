"""`pipelines approve|reject|cancel|stop|pause|resume RUN_ID`: run control; a refusal names the run's status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from services.cli.client import ApiError
from services.cli.errors import FAILED, CliError
from services.cli.render import Output, OutputOption, emit_json, out
from services.cli.runs import RunId
from services.cli.session import session

Reason = Annotated[str | None, typer.Option("--reason", help="why (recorded on the run and in its events)")]
_HELP = {
    "approve": "Approve a run waiting for approval (admin); it goes on.",
    "reject": "Reject a run waiting for approval (admin); it fails.",
    "cancel": "Cancel a run (admin): nothing new starts; a running step finishes.",
    "stop": "Stop a run (admin): like cancel, and its running steps are killed.",
    "pause": "Pause a running run (admin): the running step finishes, nothing new starts.",
    "resume": "Resume a paused run (admin).",
}


def _act(ctx: typer.Context, action: str, run_id: str, body: dict[str, str], output: Output) -> None:
    api = session(ctx).api
    run = api.run(run_id)
    try:
        answer = api.post(f"/pipelines/{run['pipelineId']}/runs/{run['id']}/{action}", body or None)
    except ApiError as exc:
        if exc.status not in (400, 409):
            raise
        now = api.run(run_id)["status"]
        raise CliError(f"{action} refused: run {run_id} is {now}", FAILED, [exc.message]) from exc
    if output is Output.json:
        emit_json(answer)
        return
    out.print(f"run {answer['id']}: {answer['status']}", markup=False)


def _command(action: str) -> Callable[..., None]:
    def command(ctx: typer.Context, run_id: RunId, reason: Reason = None, output: OutputOption = Output.text) -> None:
        _act(ctx, action, run_id, {"reason": reason} if reason else {}, output)

    command.__doc__ = _HELP[action]
    command.__name__ = action
    return command


def approve(
    ctx: typer.Context,
    run_id: RunId,
    comment: Annotated[str | None, typer.Option("--comment", help="a comment, recorded with the approval")] = None,
    reason: Reason = None,
    output: OutputOption = Output.text,
) -> None:
    """Approve a run waiting for approval (admin); it goes on."""
    body = {key: value for key, value in (("comment", comment), ("reason", reason)) if value}
    _act(ctx, "approve", run_id, body, output)


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: pipelines approve RUN_ID --comment 'looks good'")(approve)
    for action in ("reject", "cancel", "stop", "pause", "resume"):
        app.command(action, epilog=f"Example: pipelines {action} RUN_ID --reason 'not today'")(_command(action))
