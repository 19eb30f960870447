"""Every stored event type, one tagged union, and the one codec that reads and writes them.

Event types are a storage contract: add fields with defaults; never change a field's type
or a tag.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import msgspec

from domain.deployment import (
    DeploymentEvent,
    DeploymentFailed,
    DeploymentQueued,
    DeploymentStarted,
    DeploymentSucceeded,
)
from domain.pipeline import PipelineCreated, PipelineDeleted, PipelineEvent, PipelineSpecSaved, PipelineUpdated
from domain.run import (
    ApprovalRequested,
    JobFinished,
    JobStarted,
    LogAppended,
    RunApproved,
    RunCancelled,
    RunEvent,
    RunFailed,
    RunPaused,
    RunRejected,
    RunResumed,
    RunStarted,
    RunStopped,
    RunSucceeded,
    RunTriggered,
    StageFailed,
    StageRetryScheduled,
    StageSkipped,
    StageStarted,
    StageSucceeded,
    StepFinished,
    StepRetryScheduled,
    StepStarted,
    UnitWaiting,
)

Event = (
    PipelineCreated
    | PipelineUpdated
    | PipelineDeleted
    | PipelineSpecSaved
    | RunTriggered
    | RunStarted
    | StageStarted
    | ApprovalRequested
    | StageSucceeded
    | StageFailed
    | StageRetryScheduled
    | RunApproved
    | RunRejected
    | RunCancelled
    | RunStopped
    | RunPaused
    | RunResumed
    | RunSucceeded
    | RunFailed
    | LogAppended
    | StageSkipped
    | JobStarted
    | JobFinished
    | StepStarted
    | StepFinished
    | StepRetryScheduled
    | UnitWaiting
    | DeploymentQueued
    | DeploymentStarted
    | DeploymentSucceeded
    | DeploymentFailed
)

PIPELINE_EVENTS: tuple[type[Any], ...] = PipelineEvent.__args__
RUN_EVENTS: tuple[type[Any], ...] = RunEvent.__args__
DEPLOYMENT_EVENTS: tuple[type[Any], ...] = DeploymentEvent.__args__


def is_pipeline_event(event: Event) -> TypeGuard[PipelineEvent]:
    return isinstance(event, PIPELINE_EVENTS)


def is_run_event(event: Event) -> TypeGuard[RunEvent]:
    return isinstance(event, RUN_EVENTS)


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def event_type(event: Event) -> str:
    tag = event.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    return _decoder.decode(data)


def pipeline_stream(pipeline_id: str) -> str:
    return f"pipeline-{pipeline_id}"


def run_stream(run_id: str) -> str:
    return f"run-{run_id}"


def run_log_stream(run_id: str) -> str:
    return f"runlog-{run_id}"


def deployment_stream(deployment_id: str) -> str:
    return f"deployment-{deployment_id}"


def is_deployment_event(event: Event) -> TypeGuard[DeploymentEvent]:
    return isinstance(event, DEPLOYMENT_EVENTS)


def aggregate_of(stream_id: str) -> tuple[str, str]:
    """`run-<id>` -> ("run", "<id>")."""
    kind, _, ident = stream_id.partition("-")
    return kind, ident
