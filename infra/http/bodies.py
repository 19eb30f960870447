"""Request bodies, checked field by field so a 400 names every bad field at once."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from domain.errors import Invalid
from domain.pipeline import check_git_source
from domain.stages import DEFAULT_LIMITS, Limits, validate_stage_dicts


class CreatePipelineBody(msgspec.Struct, kw_only=True):
    """POST /pipelines. Also the shape of PUT (whole) and PATCH (any subset)."""

    name: str
    description: str | None = None
    stages: list[dict[str, Any]] | None = None
    # Git-backed pipelines: the spec lives in pipelineFilePath on defaultBranch of repoUrl.
    repoUrl: str | None = None
    defaultBranch: str | None = None
    pipelineFilePath: str | None = None


_FIELDS = {"name", "description", "stages", "repoUrl", "defaultBranch", "pipelineFilePath"}


def parse_pipeline_body(raw: bytes, *, partial: bool, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The body's fields, after checking all of them; raises Invalid listing every problem."""
    try:
        body = msgspec.json.decode(raw) if raw.strip() else {}
    except msgspec.DecodeError as exc:
        raise Invalid({"body": f"is not valid JSON: {exc}"}) from exc
    if not isinstance(body, dict):
        raise Invalid({"body": "must be a JSON object"})
    errors: dict[str, str] = {}
    for key in body:
        if key not in _FIELDS:
            errors[key] = "unknown field"
    if "name" in body or not partial:
        name = body.get("name")
        if not isinstance(name, str) or not 2 <= len(name.strip()) <= 100:
            errors["name"] = (
                "is required: a string of 2-100 characters"
                if name is None
                else ("must be a string of 2-100 characters")
            )
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 2000):
        errors["description"] = "must be a string of at most 2000 characters, or null"
    if body.get("stages") is not None:
        errors.update(validate_stage_dicts(body["stages"], limits=limits))
    errors.update(check_git_source(body.get("repoUrl"), body.get("defaultBranch"), body.get("pipelineFilePath")))
    if errors:
        raise Invalid(errors)
    return body


class PatchPipelineBody(msgspec.Struct, kw_only=True):
    """PATCH /pipelines/:id: any subset of the create fields."""

    name: str | None = None
    description: str | None = None
    stages: list[dict[str, Any]] | None = None
    repoUrl: str | None = None
    defaultBranch: str | None = None
    pipelineFilePath: str | None = None


class CommandDeployer(msgspec.Struct, kw_only=True, tag_field="type", tag="command"):
    command: str


class WebhookDeployer(msgspec.Struct, kw_only=True, tag_field="type", tag="webhook"):
    url: str
    secret: str | None = None


class EnvironmentBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    description: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    deployer: CommandDeployer | WebhookDeployer


class ComponentBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    description: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    # Deploy stages that name the component only deploy it here.
    defaultEnvironmentId: str | None = None


class ChannelBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    description: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    type: Literal["slack", "webhook"]
    url: Annotated[str, msgspec.Meta(max_length=2000)]
    secret: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
