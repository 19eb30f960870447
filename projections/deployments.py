"""The deployment read model: a document per deployment, folded from its stream."""

from __future__ import annotations

import msgspec

from domain import deployment as dp
from domain.events import Event, is_deployment_event
from projections.views import iso


class DeploymentView(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    organization_id: str | None
    environment_id: str
    environment_name: str | None
    component_id: str
    component_name: str | None
    run_id: str
    pipeline_id: str
    stage_id: str
    attempt: int
    definition_version: int
    version: str | None
    deployer: str
    status: str
    error: str | None
    detail: str | None
    triggered_by: str | None
    approved_by: str | None
    approved_at: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None


_state_decoder = msgspec.json.Decoder(dp.DeploymentState)
_state_encoder = msgspec.json.Encoder()


def encode_state(state: dp.DeploymentState) -> bytes:
    return _state_encoder.encode(state)


def decode_state(raw: bytes | str) -> dp.DeploymentState:
    return _state_decoder.decode(raw)


def fold_deployment(state: dp.DeploymentState, event: Event) -> dp.DeploymentState:
    return dp.evolve(state, event) if is_deployment_event(event) else state


def deployment_view(s: dp.DeploymentState) -> DeploymentView:
    return DeploymentView(
        id=s.deployment_id,
        organization_id=s.organization_id,
        environment_id=s.environment_id,
        environment_name=s.environment_name,
        component_id=s.component_id,
        component_name=s.component_name,
        run_id=s.run_id,
        pipeline_id=s.pipeline_id,
        stage_id=s.stage_id,
        attempt=s.attempt,
        definition_version=s.definition_version,
        version=s.version,
        deployer=s.deployer,
        status=s.status,
        error=s.error,
        detail=s.detail,
        triggered_by=s.triggered_by,
        approved_by=s.approved_by,
        approved_at=iso(s.approved_at),
        queued_at=iso(s.queued_at),
        started_at=iso(s.started_at),
        finished_at=iso(s.finished_at),
    )
