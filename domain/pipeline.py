"""The Pipeline aggregate as a Decider: pure `decide` and `evolve`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from domain.errors import NotFound, Refused
from domain.stages import Stage, stage_to_dict

SpecFormat = Literal["json", "yaml", "yml"]


def stages_spec(stages: tuple[Stage, ...]) -> dict[str, Any]:
    """The spec of a pipeline whose stages came from the API reference's `stages` field."""
    return {"stages": [stage_to_dict(s) for s in stages]}


# ---- commands ------------------------------------------------------------------------------


class CreatePipeline(msgspec.Struct, frozen=True, kw_only=True, tag="create_pipeline"):
    pipeline_id: str
    name: str
    description: str | None
    stages: tuple[Stage, ...]
    organization_id: str | None
    by: str
    at: datetime


class UpdatePipeline(msgspec.Struct, frozen=True, kw_only=True, tag="update_pipeline"):
    """PATCH sends only some fields (None = unchanged); PUT sends all of them."""

    name: str | None = None
    description: str | None = None
    set_description: bool = False
    stages: tuple[Stage, ...] | None = None
    by: str
    at: datetime


class DeletePipeline(msgspec.Struct, frozen=True, kw_only=True, tag="delete_pipeline"):
    by: str
    at: datetime


class SaveSpec(msgspec.Struct, frozen=True, kw_only=True, tag="save_spec"):
    """Save a validated spec as the pipeline's next definition version."""

    spec: dict[str, Any]
    stages: tuple[Stage, ...]
    format: SpecFormat = "json"
    commit_message: str | None = None
    by: str
    at: datetime


PipelineCommand = CreatePipeline | UpdatePipeline | DeletePipeline | SaveSpec

# ---- events --------------------------------------------------------------------------------


class PipelineCreated(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_created"):
    pipeline_id: str
    name: str
    description: str | None
    stages: tuple[Stage, ...]
    organization_id: str | None
    created_by: str
    at: datetime
    definition_version: int = 1


class PipelineUpdated(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_updated"):
    """Carries the pipeline's new values in full, so a fold needs no merging."""

    name: str
    description: str | None
    stages: tuple[Stage, ...]
    updated_by: str
    at: datetime
    definition_version: int


class PipelineDeleted(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_deleted"):
    deleted_by: str
    at: datetime


class PipelineSpecSaved(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_spec_saved"):
    spec: dict[str, Any]
    stages: tuple[Stage, ...]
    format: SpecFormat = "json"
    commit_message: str | None = None
    saved_by: str
    at: datetime
    definition_version: int


PipelineEvent = PipelineCreated | PipelineUpdated | PipelineDeleted | PipelineSpecSaved

# ---- state ---------------------------------------------------------------------------------


class DefinitionVersion(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    spec: dict[str, Any]
    format: SpecFormat
    saved_by: str
    saved_at: datetime
    commit_message: str | None = None


class PipelineState(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool = False
    deleted: bool = False
    pipeline_id: str = ""
    name: str = ""
    description: str | None = None
    stages: tuple[Stage, ...] = ()
    organization_id: str | None = None
    created_by: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    definition_version: int = 0
    variables: dict[str, str] = msgspec.field(default_factory=dict)
    triggers: tuple[dict[str, Any], ...] = ()
    spec_format: SpecFormat = "json"
    # Every definition version, kept forever.
    versions: tuple[DefinitionVersion, ...] = ()

    @property
    def live(self) -> bool:
        return self.exists and not self.deleted

    def version(self, number: int) -> DefinitionVersion | None:
        return next((v for v in self.versions if v.version == number), None)


initial_state = PipelineState()


def decide(command: PipelineCommand, state: PipelineState) -> list[PipelineEvent]:
    match command:
        case CreatePipeline():
            if state.exists:
                raise Refused(f"pipeline {command.pipeline_id} already exists")
            return [
                PipelineCreated(
                    pipeline_id=command.pipeline_id,
                    name=command.name,
                    description=command.description,
                    stages=command.stages,
                    organization_id=command.organization_id,
                    created_by=command.by,
                    at=command.at,
                )
            ]
        case UpdatePipeline():
            if not state.live:
                raise NotFound("pipeline not found")
            stages = state.stages if command.stages is None else command.stages
            description = command.description if command.set_description else state.description
            name = state.name if command.name is None else command.name
            version = state.definition_version + (1 if stages != state.stages else 0)
            return [
                PipelineUpdated(
                    name=name,
                    description=description,
                    stages=stages,
                    updated_by=command.by,
                    at=command.at,
                    definition_version=version,
                )
            ]
        case DeletePipeline():
            if not state.live:
                raise NotFound("pipeline not found")
            return [PipelineDeleted(deleted_by=command.by, at=command.at)]
        case SaveSpec():
            if not state.live:
                raise NotFound("pipeline not found")
            return [
                PipelineSpecSaved(
                    spec=command.spec,
                    stages=command.stages,
                    format=command.format,
                    commit_message=command.commit_message,
                    saved_by=command.by,
                    at=command.at,
                    definition_version=state.definition_version + 1,
                )
            ]


def evolve(state: PipelineState, event: PipelineEvent) -> PipelineState:
    match event:
        case PipelineCreated():
            first = DefinitionVersion(
                version=event.definition_version,
                spec=stages_spec(event.stages),
                format="json",
                saved_by=event.created_by,
                saved_at=event.at,
            )
            return PipelineState(
                versions=(first,),
                exists=True,
                pipeline_id=event.pipeline_id,
                name=event.name,
                description=event.description,
                stages=event.stages,
                organization_id=event.organization_id,
                created_by=event.created_by,
                created_at=event.at,
                updated_at=event.at,
                definition_version=event.definition_version,
            )
        case PipelineUpdated():
            versions = state.versions
            if event.definition_version != state.definition_version:
                spec = {**(versions[-1].spec if versions else {}), **stages_spec(event.stages)}
                spec.pop("jobs", None)
                versions = (
                    *versions,
                    DefinitionVersion(
                        version=event.definition_version,
                        spec=spec,
                        format=state.spec_format,
                        saved_by=event.updated_by,
                        saved_at=event.at,
                    ),
                )
            return msgspec.structs.replace(
                state,
                name=event.name,
                description=event.description,
                stages=event.stages,
                updated_at=event.at,
                definition_version=event.definition_version,
                versions=versions,
            )
        case PipelineSpecSaved():
            variables = event.spec.get("variables") or {}
            return msgspec.structs.replace(
                state,
                stages=event.stages,
                variables=dict(variables),
                triggers=tuple(event.spec.get("triggers") or ()),
                spec_format=event.format,
                updated_at=event.at,
                definition_version=event.definition_version,
                versions=(
                    *state.versions,
                    DefinitionVersion(
                        version=event.definition_version,
                        spec=event.spec,
                        format=event.format,
                        saved_by=event.saved_by,
                        saved_at=event.at,
                        commit_message=event.commit_message,
                    ),
                ),
            )
        case PipelineDeleted():
            return msgspec.structs.replace(state, deleted=True, updated_at=event.at)
