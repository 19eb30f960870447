"""Deployments: one stream per deployment (`deployment-<id>`), written by the executor as a
deploy stage runs. Queued (waiting for its environment), started, then succeeded or failed.

Event types are a storage contract: add fields with defaults; never change a field's type or a tag.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

DeploymentStatus = Literal["queued", "running", "succeeded", "failed"]


class DeploymentQueued(msgspec.Struct, frozen=True, kw_only=True, tag="deployment_queued"):
    deployment_id: str
    organization_id: str | None
    environment_id: str
    environment_name: str | None = None
    component_id: str
    component_name: str | None = None
    run_id: str
    pipeline_id: str
    stage_id: str
    attempt: int = 1
    definition_version: int
    # The run's VERSION variable when set (what is being deployed), else None.
    version: str | None = None
    deployer: str
    triggered_by: str | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    at: datetime


class DeploymentStarted(msgspec.Struct, frozen=True, kw_only=True, tag="deployment_started"):
    deployment_id: str
    at: datetime


class DeploymentSucceeded(msgspec.Struct, frozen=True, kw_only=True, tag="deployment_succeeded"):
    deployment_id: str
    detail: str | None = None
    at: datetime


class DeploymentFailed(msgspec.Struct, frozen=True, kw_only=True, tag="deployment_failed"):
    deployment_id: str
    error: str
    at: datetime


DeploymentEvent = DeploymentQueued | DeploymentStarted | DeploymentSucceeded | DeploymentFailed


class AbandonDeployment(msgspec.Struct, frozen=True, kw_only=True):
    """Close a deployment whose executor is gone (or whose run stage ended without it): it is
    recorded as failed with `reason`. A deployment already finished, or never queued, is left as
    it is, so abandoning twice records one failure."""

    deployment_id: str
    reason: str
    at: datetime


DeploymentCommand = AbandonDeployment


class DeploymentState(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool = False
    deployment_id: str = ""
    organization_id: str | None = None
    environment_id: str = ""
    environment_name: str | None = None
    component_id: str = ""
    component_name: str | None = None
    run_id: str = ""
    pipeline_id: str = ""
    stage_id: str = ""
    attempt: int = 1
    definition_version: int = 0
    version: str | None = None
    deployer: str = ""
    triggered_by: str | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    status: DeploymentStatus = "queued"
    error: str | None = None
    detail: str | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


initial_state = DeploymentState()


def is_finished(state: DeploymentState) -> bool:
    return state.status in ("succeeded", "failed")


def decide(command: DeploymentCommand, state: DeploymentState) -> list[DeploymentEvent]:
    match command:
        case AbandonDeployment():
            if not state.exists or is_finished(state):
                return []
            return [DeploymentFailed(deployment_id=state.deployment_id, error=command.reason, at=command.at)]


def evolve(state: DeploymentState, event: DeploymentEvent) -> DeploymentState:
    r = msgspec.structs.replace
    match event:
        case DeploymentQueued():
            return DeploymentState(
                exists=True,
                deployment_id=event.deployment_id,
                organization_id=event.organization_id,
                environment_id=event.environment_id,
                environment_name=event.environment_name,
                component_id=event.component_id,
                component_name=event.component_name,
                run_id=event.run_id,
                pipeline_id=event.pipeline_id,
                stage_id=event.stage_id,
                attempt=event.attempt,
                definition_version=event.definition_version,
                version=event.version,
                deployer=event.deployer,
                triggered_by=event.triggered_by,
                approved_by=event.approved_by,
                approved_at=event.approved_at,
                status="queued",
                queued_at=event.at,
            )
        case DeploymentStarted():
            return r(state, status="running", started_at=event.at)
        case DeploymentSucceeded():
            return r(state, status="succeeded", detail=event.detail, finished_at=event.at)
        case DeploymentFailed():
            return r(state, status="failed", error=event.error, finished_at=event.at)
