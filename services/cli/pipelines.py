"""`pipelines list|show|apply|validate|delete`: pipelines and their definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.client import Api
from services.cli.errors import FAILED, CliError
from services.cli.files import read_document, split_pipeline
from services.cli.render import Output, OutputOption, emit_json, err, fields, out, table
from services.cli.session import session

FileOption = Annotated[
    Path, typer.Option("--file", "-f", exists=True, dir_okay=False, help="a JSON or YAML pipeline file")
]
Ref = Annotated[str, typer.Argument(help="the pipeline's name or id", metavar="NAME|ID")]


def list_pipelines(ctx: typer.Context, output: OutputOption = Output.text) -> None:
    """List the pipelines of your organization."""
    pipelines = session(ctx).api.pipelines()
    if output is Output.json:
        emit_json(pipelines)
        return
    table(
        ["ID", "NAME", "VERSION", "UPDATED"],
        [(p["id"], p["name"], p.get("definitionVersion"), p.get("updatedAt")) for p in pipelines],
    )


def show(ctx: typer.Context, ref: Ref, output: OutputOption = Output.text) -> None:
    """Show one pipeline and its current definition."""
    api = session(ctx).api
    pipeline = api.pipeline(ref)
    if output is Output.json:
        emit_json(pipeline)
        return
    fields(
        [
            ("id", pipeline["id"]),
            ("name", pipeline["name"]),
            ("description", pipeline.get("description") or ""),
            ("version", pipeline.get("definitionVersion")),
            ("updated", pipeline.get("updatedAt")),
        ]
    )
    spec = api.get(f"/pipelines/{pipeline['id']}/spec", format="yaml")
    out.print(spec.get("content", ""), markup=False, highlight=False, end="")


def _report_validation(result: dict[str, Any], path: Path) -> None:
    for issue in result.get("warnings") or []:
        err.print(f"warning: {issue['path']}: {issue['message']}", markup=False)
    if not result["valid"]:
        raise CliError(
            f"{path} is invalid", FAILED, [f"{issue['path']}: {issue['message']}" for issue in result["errors"]]
        )


def validate(ctx: typer.Context, file: FileOption, output: OutputOption = Output.text) -> None:
    """Validate a pipeline file: every error with its path; exit 1 when it is invalid."""
    doc, fmt = read_document(file)
    _, _, spec = split_pipeline(doc, file, need_name=False)
    result = session(ctx).api.post("/pipelines/validate", {"spec": spec, "format": fmt})
    if output is Output.json:
        emit_json(result)
        if not result["valid"]:
            raise typer.Exit(FAILED)
        return
    _report_validation(result, file)
    out.print(f"{file} is valid", markup=False)


def apply(ctx: typer.Context, file: FileOption, output: OutputOption = Output.text) -> None:
    """Create the pipeline the file names, or save its spec as the pipeline's next definition version."""
    doc, fmt = read_document(file)
    name, description, spec = split_pipeline(doc, file, need_name=True)
    assert name is not None
    api = session(ctx).api
    # The validation checks what the save does (the spec and the components and environments
    # it names), so an invalid file is refused before any pipeline is created.
    _report_validation(api.post("/pipelines/validate", {"spec": spec, "format": fmt}), file)
    pipeline = api.find_pipeline(name)
    created = pipeline is None
    if pipeline is None:
        pipeline = api.post("/pipelines", {"name": name, "description": description})
    elif "description" in doc and description != pipeline.get("description"):
        api.request("PATCH", f"/pipelines/{pipeline['id']}", json={"description": description})
    try:
        saved = api.post(f"/pipelines/{pipeline['id']}/spec/save", {"spec": spec, "format": fmt})
    except CliError as exc:
        if created:
            _undo_create(api, pipeline, exc)
        raise
    if output is Output.json:
        emit_json(saved)
        return
    verb = "created" if created else "updated"
    out.print(f"{verb} pipeline {name} ({pipeline['id']}): version {saved['version']}", markup=False)


def _undo_create(api: Api, pipeline: dict[str, Any], refused: CliError) -> None:
    """Delete the pipeline `apply` just created when its spec is refused after all (e.g. a component
    deleted since the validation), so that no empty pipeline is left; deleting takes the admin role,
    so without it the error says what was left and how to remove it."""
    try:
        api.delete(f"/pipelines/{pipeline['id']}")
    except CliError as exc:
        refused.details.append(
            f"pipeline {pipeline['name']} ({pipeline['id']}) was created without a definition and could not"
            f" be deleted ({exc.message}): apply a corrected file, or delete it as an admin"
            f" with `pipelines delete {pipeline['id']}`"
        )
        return
    refused.details.append(f"pipeline {pipeline['name']} was not created")


def delete(ctx: typer.Context, ref: Ref) -> None:
    """Delete a pipeline (admin); its active runs are cancelled."""
    api = session(ctx).api
    pipeline = api.pipeline(ref)
    api.delete(f"/pipelines/{pipeline['id']}")
    err.print(f"deleted pipeline {pipeline['name']} ({pipeline['id']})", markup=False)


def register(app: typer.Typer) -> None:
    app.command("list", epilog="Example: pipelines list --output json")(list_pipelines)
    app.command(epilog="Example: pipelines show deploy-to-production")(show)
    app.command(epilog="Example: pipelines apply -f pipeline.yaml")(apply)
    app.command(epilog="Example: pipelines validate -f pipeline.yaml")(validate)
    app.command(epilog="Example: pipelines delete deploy-to-production")(delete)
