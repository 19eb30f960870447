"""What the HTTP layer needs (`Deps`), how a handler reaches it, and the visibility checks they share."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from nats.aio.client import Client as NATS

from domain import pipeline as pl
from domain import run as rn
from domain.stages import Limits
from infra.app.commands import Commands
from infra.auth import Principal
from infra.config import Settings
from infra.http.idempotency import IdempotencyKeys
from infra.http.queries import ReadModels
from infra.secrets import SecretStore

API = "/api/v1"
# Pages past this are refused (400 naming `page`): the offset must fit PostgreSQL's bigint.
MAX_PAGE = 1_000_000


@dataclass
class Deps:
    """What the API needs, assembled by services/api.py (or a test)."""

    settings: Settings
    commands: Commands
    read_models: ReadModels
    idempotency: IdempotencyKeys
    ready: Callable[[], Awaitable[dict[str, bool]]]
    close: Callable[[], Awaitable[None]]
    # Values of run secrets, encrypted at rest; None: triggers with secrets are refused.
    secrets: SecretStore | None = None
    # The API's broker connection (its own user): it creates the consumers of broker credentials.
    nc: NATS | None = None


def limits_of(settings: Settings) -> Limits:
    """The definition size limits of PIPELINES_MAX_*."""
    return settings.definition_limits()


def deps_of(request: Request[Any, Any, State]) -> Deps:
    deps: Deps = request.app.state.deps
    return deps


def uuid_or_404(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFoundException(f"{what} not found") from None


async def visible_pipeline(deps: Deps, principal: Principal, pipeline_id: str) -> pl.PipelineState:
    """The pipeline, if it exists, is not deleted and belongs to the caller's organization; else 404."""
    state, _ = await deps.commands.load_pipeline(uuid_or_404(pipeline_id, "pipeline"))
    if not state.live or state.organization_id != principal.org:
        raise NotFoundException("pipeline not found")
    return state


async def load_visible_pipeline(request: Request[Principal, Any, State], pipeline_id: str) -> pl.PipelineState:
    return await visible_pipeline(deps_of(request), request.user, pipeline_id)


async def visible_run(deps: Deps, principal: Principal, pipeline_id: str | None, run_id: str) -> rn.RunState:
    """The run, if it exists in the caller's organization (and in `pipeline_id` when given); else 404."""
    state, _ = await deps.commands.load_run(uuid_or_404(run_id, "run"))
    if not state.exists or state.organization_id != principal.org:
        raise NotFoundException("run not found")
    if pipeline_id is not None and state.pipeline_id != pipeline_id:
        raise NotFoundException("run not found in this pipeline")
    return state
