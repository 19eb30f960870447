"""Reading pipeline files (JSON or YAML) and `K=V` / `K=@FILE` arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml

from services.cli.errors import FAILED, CliError

SPEC_KEYS = ("stages", "jobs", "variables", "triggers")
PIPELINE_KEYS = ("name", "description", *SPEC_KEYS)


def read_document(path: Path) -> tuple[dict[str, Any], str]:
    """The file's object and its format (`yaml` or `json`, by extension; YAML reads JSON too)."""
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(str(exc), param_hint="'-f'") from exc
    try:
        doc = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CliError(f"{path}: not valid {fmt.upper()}: {exc}", FAILED) from exc
    if not isinstance(doc, dict):
        raise CliError(f"{path}: must hold an object (name, description, stages or jobs, variables, triggers)")
    return doc, fmt


def split_pipeline(
    doc: dict[str, Any], path: Path, *, need_name: bool
) -> tuple[str | None, str | None, dict[str, Any]]:
    """(name, description, spec) of a pipeline file; every unknown key or bad field at once."""
    problems = [
        f"{key}: unknown field (allowed: {', '.join(PIPELINE_KEYS)})" for key in doc if key not in PIPELINE_KEYS
    ]
    name, description = doc.get("name"), doc.get("description")
    if need_name and (not isinstance(name, str) or not name.strip()):
        problems.append("name: is required: the pipeline's name")
    if description is not None and not isinstance(description, str):
        problems.append("description: must be a string")
    if problems:
        raise CliError(f"{path} is not a pipeline file", FAILED, problems)
    spec = {key: doc[key] for key in SPEC_KEYS if key in doc}
    return (name if isinstance(name, str) else None), description, spec


def pairs(values: list[str] | None, option: str, *, files: bool = False) -> dict[str, str]:
    """`K=V` arguments as a dict; with `files`, `K=@FILE` reads the value from FILE."""
    found: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not K=V", param_hint=f"'{option}'")
        if files and value.startswith("@"):
            try:
                value = Path(value[1:]).read_text(encoding="utf-8").rstrip("\n")
            except OSError as exc:
                raise typer.BadParameter(f"{key}: {exc}", param_hint=f"'{option}'") from exc
        found[key] = value
    return found
