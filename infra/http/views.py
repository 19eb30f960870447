"""The shapes of answers handlers build themselves (as dicts or bytes), for the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from projections.views import RunView


class FieldError(msgspec.Struct, kw_only=True):
    path: str
    message: str


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: `errors` names each bad field of a 400."""

    statusCode: int
    error: str
    message: str
    errors: list[FieldError] | None = None


class _Item(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    organization_id: str | None
    name: str
    description: str | None
    created_by: str | None
    created_at: str | None
    updated_at: str | None


class DeployerView(msgspec.Struct, kw_only=True, rename="camel"):
    type: Literal["command", "webhook"] | None
    command: str | None
    url: str | None
    secret_configured: bool


class EnvironmentView(_Item, kw_only=True):
    deployer: DeployerView


class ComponentView(_Item, kw_only=True, rename="camel"):
    default_environment_id: str | None = None


class ChannelView(_Item, kw_only=True, rename="camel"):
    type: Literal["slack", "webhook"] | None
    url: str | None
    secret_configured: bool


class HookBody(msgspec.Struct, kw_only=True):
    """A push-style delivery as GitHub sends it (JSON, or form-encoded with the JSON in `payload`)."""

    ref: str | None = None
    after: str | None = None
    deleted: bool | None = None
    pusher: dict[str, Any] | None = None
    sender: dict[str, Any] | None = None


class HookResult(msgspec.Struct, kw_only=True):
    triggered: bool
    reason: str | None = None
    duplicate: bool | None = None
    run: RunView | None = None


class RunPage(msgspec.Struct, kw_only=True):
    """The runs list with `skip`/`take` or `page`/`limit`: one page of the filtered runs."""

    data: list[RunView]
    total: int


class BrokerCredentialBody(msgspec.Struct, kw_only=True, rename="camel"):
    """`POST /broker-credentials`: an optional lifetime (60 s to a year); no body: no expiry."""

    ttl_seconds: int | None = None


class BrokerSubjects(msgspec.Struct, kw_only=True):
    events: str
    logs: str
    notify: str


class BrokerCredentialView(msgspec.Struct, kw_only=True, rename="camel"):
    """Issued broker credentials: the only time the password is shown."""

    id: str
    servers: list[str]
    user: str
    password: str
    inbox_prefix: str
    js_prefix: str
    stream: str
    consumer: str
    subjects: BrokerSubjects
    expires_at: str | None = None


class AgentBody(msgspec.Struct, kw_only=True):
    """`POST /agents`: the agent's labels (what `runsOn` names), how many units it runs at once, a name."""

    labels: list[str] = msgspec.field(default_factory=list)
    capacity: int = 1
    name: str | None = None


class AgentView(msgspec.Struct, kw_only=True, rename="camel"):
    """An agent; `shared` (no organization): it runs units of every organization."""

    id: str
    name: str
    organization_id: str | None
    shared: bool
    labels: list[str]
    capacity: int
    created_by: str
    created_at: str


class IssuedAgentView(AgentView, kw_only=True, rename="camel"):
    """An agent's credentials: the only time the password is shown. Saved as is, this JSON is the
    agent's credential file (PIPELINES_AGENT_CREDS)."""

    servers: list[str]
    user: str
    password: str
