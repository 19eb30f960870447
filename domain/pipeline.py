"""The Pipeline aggregate as a Decider: pure `decide` and `evolve`."""

from __future__ import annotations

from datetime import datetime

import msgspec

from domain.errors import NotFound, Refused
from domain.stages import Stage

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


PipelineCommand = CreatePipeline | UpdatePipeline | DeletePipeline

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


PipelineEvent = PipelineCreated | PipelineUpdated | PipelineDeleted

# ---- state ---------------------------------------------------------------------------------


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

    @property
    def live(self) -> bool:
        return self.exists and not self.deleted


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


def evolve(state: PipelineState, event: PipelineEvent) -> PipelineState:
    match event:
        case PipelineCreated():
            return PipelineState(
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
            return msgspec.structs.replace(
                state,
                name=event.name,
                description=event.description,
                stages=event.stages,
                updated_at=event.at,
                definition_version=event.definition_version,
            )
        case PipelineDeleted():
            return msgspec.structs.replace(state, deleted=True, updated_at=event.at)
