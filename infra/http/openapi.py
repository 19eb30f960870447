"""The OpenAPI document served at /schema/openapi.json: litestar's, completed with what litestar
cannot see (bodies handlers read themselves, typed answers of `Response[bytes]` handlers) and
the one error schema on every error status an operation can answer."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from infra.http.bodies import ChannelBody, ComponentBody, CreatePipelineBody, EnvironmentBody
from infra.http.runs import ActionBody, TriggerBody
from infra.http.secrets import SecretView
from infra.http.specs import SaveBody, SavedView, ValidateBody
from infra.http.views import (
    AgentBody,
    AgentView,
    BrokerCredentialBody,
    BrokerCredentialView,
    ChannelView,
    ComponentView,
    EnvironmentView,
    ErrorBody,
    HookBody,
    HookResult,
    IssuedAgentView,
    RunPage,
)
from projections.deployments import DeploymentView
from projections.run_reports import RunComparison, RunStats
from projections.views import PipelineView, RunView

_REF = "#/components/schemas/{name}"
_ERROR = {"$ref": "#/components/schemas/ErrorBody"}
_PHRASES = {
    400: "Bad request: the `errors` name each bad field",
    401: "No valid token",
    403: "The token's role or organization does not allow this",
    404: "Not found (or not visible to the caller's organization)",
    409: "Conflict: a name in use, a concurrent change, or an Idempotency-Key reused",
    413: "The body is larger than the configured limit",
}
# Routes that take no token: webhooks (signed instead), and the documents any client may read.
_NO_TOKEN = ("/api/v1/schemas/", "/api/v1/asyncapi.json")
_PUBLIC = ("/api/v1/hooks/", *_NO_TOKEN)
_ACTIONS = ("approve", "reject", "cancel", "stop", "pause", "resume")
_REGISTRY = {"environments": EnvironmentBody, "components": ComponentBody, "channels": ChannelBody}
_REGISTRY_VIEW = {"environments": EnvironmentView, "components": ComponentView, "channels": ChannelView}

Key = tuple[str, str]


def _bodies() -> dict[Key, type[Any]]:
    out: dict[Key, type[Any]] = {
        ("post", "/api/v1/pipelines/{pipeline_id}/trigger"): TriggerBody,
        ("post", "/api/v1/pipelines/{pipeline_id}/spec/validate"): ValidateBody,
        ("post", "/api/v1/pipelines/{pipeline_id}/spec/save"): SaveBody,
        ("post", "/api/v1/pipelines"): CreatePipelineBody,
        ("put", "/api/v1/pipelines/{pipeline_id}"): CreatePipelineBody,
        ("post", "/api/v1/hooks/{pipeline_id}"): HookBody,
        ("post", "/api/v1/broker-credentials"): BrokerCredentialBody,
        ("post", "/api/v1/agents"): AgentBody,
        ("post", "/api/v1/pipelines/validate"): ValidateBody,
    }
    for action in _ACTIONS:
        out["post", f"/api/v1/pipelines/{{pipeline_id}}/runs/{{run_id}}/{action}"] = ActionBody
    for name, body in _REGISTRY.items():
        out["post", f"/api/v1/{name}"] = body
        out["put", f"/api/v1/{name}/{{item_id}}"] = body
    return out


def _results() -> dict[Key, dict[str, Any]]:
    """The 2xx answers litestar types `string` (their handlers encode the body themselves)."""
    out: dict[Key, dict[str, Any]] = {
        ("post", "/api/v1/pipelines"): {"201": PipelineView},
        ("post", "/api/v1/pipelines/{pipeline_id}/trigger"): {"201": RunView},
        ("post", "/api/v1/pipelines/{pipeline_id}/spec/save"): {"200": SavedView},
        ("put", "/api/v1/secrets/{name}"): {"200": SecretView, "201": SecretView},
        ("get", "/api/v1/deployments/{deployment_id}"): {"200": DeploymentView},
        ("post", "/api/v1/hooks/{pipeline_id}"): {"200": HookResult, "201": HookResult},
        ("get", "/api/v1/pipelines/{pipeline_id}/runs"): {"200": list[RunView] | RunPage},
        ("get", "/api/v1/pipelines/{pipeline_id}/runs/stats"): {"200": RunStats},
        ("get", "/api/v1/pipelines/{pipeline_id}/runs/compare"): {"200": RunComparison},
        ("post", "/api/v1/broker-credentials"): {"201": BrokerCredentialView},
        ("post", "/api/v1/agents"): {"201": IssuedAgentView},
        ("get", "/api/v1/agents"): {"200": list[AgentView]},
    }
    for action in _ACTIONS:
        out["post", f"/api/v1/pipelines/{{pipeline_id}}/runs/{{run_id}}/{action}"] = {"200": RunView}
    for name, view in _REGISTRY_VIEW.items():
        out["get", f"/api/v1/{name}"] = {"200": list[view]}  # type: ignore[valid-type]
        out["post", f"/api/v1/{name}"] = {"201": view}
        for method in ("get", "put", "patch"):
            out[method, f"/api/v1/{name}/{{item_id}}"] = {"200": view}
    return out


def _schemas(types: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    found, components = msgspec.json.schema_components(types, ref_template=_REF)
    return list(found), components


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _partial(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """PATCH: the same fields as PUT, none required."""
    ref = schema.get("$ref")
    target = components[ref.rsplit("/", 1)[1]] if isinstance(ref, str) else schema
    out = copy.deepcopy(target)
    out.pop("required", None)
    return out


def _errors(method: str, path: str, op: dict[str, Any], has_body: bool) -> list[int]:
    codes = [400]
    if not path.startswith(_NO_TOKEN):
        codes.append(401)
    if not path.startswith(_PUBLIC):
        codes.append(403)
    if not path.startswith(_NO_TOKEN):
        # An unknown id in the path, the query (pipelineId=) or the body (a deploy stage's ids).
        codes.append(404)
    if method in ("post", "put", "patch", "delete"):
        codes.append(409)
    if has_body or method in ("post", "put", "patch"):
        codes.append(413)
    return codes


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    """Litestar's document (`app.openapi_schema.to_schema()`) made whole; `doc` is not changed."""
    doc = copy.deepcopy(doc)
    bodies, results = _bodies(), _results()
    types: list[Any] = [ErrorBody, *bodies.values()]
    for answers in results.values():
        types.extend(answers.values())
    found, components = _schemas(types)
    schema_of = dict(zip((id(t) for t in types), found, strict=True))
    registry = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in components.items():
        registry.setdefault(name, schema)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            key = (method, path)
            body = bodies.get(key)
            if body is None and method == "patch" and path.startswith(("/api/v1/pipelines/", *_registry_paths())):
                put = bodies.get(("put", path))
                if put is not None:
                    op["requestBody"] = {
                        "required": False,
                        "content": _json(_partial(schema_of[id(put)], components)),
                    }
            elif body is not None:
                content = _json(schema_of[id(body)])
                if body is HookBody:
                    content["application/x-www-form-urlencoded"] = {
                        "schema": {"type": "object", "properties": {"payload": {"type": "string"}}}
                    }
                op["requestBody"] = {"required": False, "content": content}
            responses: dict[str, Any] = op["responses"]
            for status, typ in results.get(key, {}).items():
                for other in [s for s in responses if s.startswith("2") and s not in results.get(key, {})]:
                    responses.pop(other)
                responses[status] = {"description": responses.get(status, {}).get("description", "OK")}
                responses[status]["content"] = _json(schema_of[id(typ)])
            for code in _errors(method, path, op, "requestBody" in op):
                responses[str(code)] = {"description": _PHRASES[code], "content": _json(_ERROR)}
            if path.startswith(_PUBLIC):
                op["security"] = []
    return doc


def _registry_paths() -> tuple[str, ...]:
    return tuple(f"/api/v1/{name}/" for name in _REGISTRY)


class ContractJson(JsonRenderPlugin):
    """Serves `complete(...)` of litestar's document at /schema/openapi.json."""

    def __init__(self) -> None:
        super().__init__()
        self._doc: dict[str, Any] | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._doc is None:
            self._doc = complete(openapi_schema)
        return self.render_json(request, self._doc)
