"""Environments, components and notification channels (viewers read, admins change), the
deployment history, and the save-time check of deploy stages' references."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, FromQuery, Parameter

from domain.errors import Invalid
from infra.auth import Principal
from infra.delivery.deliveries import Item, Kind, NameInUse, Registry
from infra.delivery.outbound import OutboundPolicy, OutboundRefused, check_saved
from infra.delivery.redaction import is_credential_url, shown_url
from infra.http.deps import API, MAX_PAGE, deps_of
from infra.http.errors import error_response
from infra.http.guards import admin, viewer
from infra.http.keyed import idempotent
from infra.http.responses import json_response
from infra.store.postgres import PostgresEventStore
from projections.deployments import DeploymentView
from projections.views import iso

_deployment = msgspec.json.Decoder(DeploymentView)
_NAME = re.compile(r"^\S(.{0,98}\S)?$")
STATUSES = ("queued", "running", "succeeded", "failed")


def registry_of(request: Request[Any, Any, State]) -> Registry:
    deps = deps_of(request)
    store = deps.commands.store
    assert isinstance(store, PostgresEventStore), "environments need the PostgreSQL store"
    return Registry(store.pool, deps.secrets)


async def _body(request: Request[Any, Any, State]) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = msgspec.json.decode(raw) if raw.strip() else None
    except msgspec.DecodeError as exc:
        raise Invalid({"body": f"is not valid JSON: {exc}"}) from exc
    if not isinstance(data, dict):
        raise Invalid({"body": "must be a JSON object"})
    return data


def _check_url(value: Any, path: str, errors: dict[str, str], policy: OutboundPolicy) -> None:
    if not isinstance(value, str) or not value:
        errors[path] = "is required: an http or https URL"
        return
    if len(value) > 2000:
        errors[path] = "must be an http or https URL of at most 2000 characters"
        return
    try:
        policy.check_url(value)
    except OutboundRefused as exc:
        errors[path] = str(exc)


def _check_secret(value: Any, path: str, errors: dict[str, str]) -> None:
    if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= 256):
        errors[path] = "must be a string of 1-256 characters"


def _common(body: dict[str, Any], allowed: set[str], errors: dict[str, str]) -> None:
    for key in body:
        if key not in allowed:
            errors[key] = "unknown field"
    name = body.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        errors["name"] = "is required: 1-100 characters, not starting or ending with a space"
    desc = body.get("description")
    if desc is not None and (not isinstance(desc, str) or len(desc) > 2000):
        errors["description"] = "must be a string of at most 2000 characters"


def _deployer(raw: Any, errors: dict[str, str], policy: OutboundPolicy) -> tuple[dict[str, Any], str | None]:
    if not isinstance(raw, dict):
        errors["deployer"] = 'is required: {"type": "command", "command": ...} or {"type": "webhook", "url": ...}'
        return {}, None
    kind = raw.get("type")
    if kind == "command":
        for key in raw:
            if key not in ("type", "command"):
                errors[f"deployer.{key}"] = "unknown field for a command deployer"
        command = raw.get("command")
        if not isinstance(command, str) or not command.strip() or len(command) > 64 * 1024:
            errors["deployer.command"] = "is required: a non-empty shell command template"
        return {"type": "command", "command": command}, None
    if kind == "webhook":
        for key in raw:
            if key not in ("type", "url", "secret"):
                errors[f"deployer.{key}"] = "unknown field for a webhook deployer"
        _check_url(raw.get("url"), "deployer.url", errors, policy)
        _check_secret(raw.get("secret"), "deployer.secret", errors)
        return {"type": "webhook", "url": raw.get("url")}, raw.get("secret")
    errors["deployer.type"] = "must be command or webhook"
    return {}, None


def _parse(kind: Kind, body: dict[str, Any], policy: OutboundPolicy) -> tuple[dict[str, Any], str | None]:
    """Validated (doc, secret) of a whole body."""
    errors: dict[str, str] = {}
    doc: dict[str, Any] = {"name": body.get("name"), "description": body.get("description")}
    secret: str | None = None
    if kind == "environment":
        _common(body, {"name", "description", "deployer"}, errors)
        doc["deployer"], secret = _deployer(body.get("deployer"), errors, policy)
    elif kind == "component":
        _common(body, {"name", "description", "defaultEnvironmentId"}, errors)
        default = body.get("defaultEnvironmentId")
        if default is not None and (not isinstance(default, str) or not default.strip()):
            errors["defaultEnvironmentId"] = "must be the id of an environment, or null"
        doc["defaultEnvironmentId"] = default
    else:
        _common(body, {"name", "description", "type", "url", "secret"}, errors)
        if body.get("type") not in ("slack", "webhook"):
            errors["type"] = "must be slack or webhook"
        _check_url(body.get("url"), "url", errors, policy)
        _check_secret(body.get("secret"), "secret", errors)
        doc["type"], doc["url"], secret = body.get("type"), body.get("url"), body.get("secret")
    if errors:
        raise Invalid(errors)
    return doc, secret


def _url_of(doc: dict[str, Any]) -> tuple[str, str] | None:
    """The field path and value of an item's outbound URL, if it has one."""
    deployer = doc.get("deployer")
    if isinstance(deployer, dict) and deployer.get("type") == "webhook":
        return "deployer.url", str(deployer.get("url"))
    return ("url", str(doc["url"])) if isinstance(doc.get("url"), str) else None


async def _parse_checked(
    request: Request[Principal, Any, State], kind: Kind, body: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """`_parse`, and the addresses the URL's name resolves to now (checked again at connect time)."""
    policy = OutboundPolicy(deps_of(request).settings.outbound_allow)
    doc, secret = _parse(kind, body, policy)
    default = doc.get("defaultEnvironmentId")
    if default is not None:
        org = request.user.org
        if not await registry_of(request).existing("environment", org, [default]):
            raise Invalid({"defaultEnvironmentId": f"unknown environment {default!r}"})
    found = _url_of(doc)
    if found is not None:
        path, url = found
        try:
            await check_saved(policy, url)
        except OutboundRefused as exc:
            raise Invalid({path: str(exc)}) from None
    return doc, secret


def _shown(url: Any, kind: str | None, principal: Principal) -> Any:
    """A URL that is a credential itself (a Slack webhook's) is shown whole to admins only."""
    if isinstance(url, str) and not principal.has("admin") and is_credential_url(url, kind):
        return shown_url(url)
    return url


def _view(item: Item, principal: Principal) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": item.id,
        "organizationId": item.org,
        "name": item.name,
        "description": item.doc.get("description"),
    }
    if item.kind == "environment":
        d = item.doc.get("deployer") or {}
        out["deployer"] = {
            "type": d.get("type"),
            "command": d.get("command"),
            "url": _shown(d.get("url"), None, principal),
            "secretConfigured": item.secret is not None,
        }
    elif item.kind == "component":
        out["defaultEnvironmentId"] = item.doc.get("defaultEnvironmentId")
    elif item.kind == "channel":
        kind = item.doc.get("type")
        out.update(
            type=kind, url=_shown(item.doc.get("url"), kind, principal), secretConfigured=item.secret is not None
        )
    out.update(createdBy=item.created_by, createdAt=iso(item.created_at), updatedAt=iso(item.updated_at))
    return out


def _current_body(item: Item) -> dict[str, Any]:
    """The item as a client would send it again (for PATCH merges); the secret stays."""
    body: dict[str, Any] = {"name": item.name, "description": item.doc.get("description")}
    if item.kind == "environment":
        d = dict(item.doc.get("deployer") or {})
        if d.get("type") == "webhook" and item.secret is not None:
            d["secret"] = item.secret
        body["deployer"] = {k: v for k, v in d.items() if v is not None}
    elif item.kind == "component":
        body["defaultEnvironmentId"] = item.doc.get("defaultEnvironmentId")
    elif item.kind == "channel":
        body.update(type=item.doc.get("type"), url=item.doc.get("url"))
        if item.secret is not None:
            body["secret"] = item.secret
    return body


class _Registry(Controller):
    kind: Kind = "environment"
    guards = [viewer]
    tags = ["delivery"]

    async def _create(self, request: Request[Principal, Any, State]) -> Response[bytes]:
        deps = deps_of(request)
        doc, secret = await _parse_checked(request, self.kind, await _body(request))
        try:
            item = await registry_of(request).create(
                self.kind, request.user.org, doc["name"], doc, secret, request.user.sub, deps.commands.now()
            )
        except NameInUse as exc:
            return error_response(409, str(exc))
        return json_response(201, _view(item, request.user))

    async def _get(self, request: Request[Principal, Any, State], item_id: str) -> Item:
        item = await registry_of(request).get(self.kind, request.user.org, item_id)
        if item is None:
            raise NotFoundException(f"{self.kind} not found")
        return item

    async def _update(self, request: Request[Principal, Any, State], item_id: str, whole: bool) -> Response[bytes]:
        deps = deps_of(request)
        current = await self._get(request, item_id)
        body = await _body(request)
        if not whole:
            body = {**_current_body(current), **body}
        doc, secret = await _parse_checked(request, self.kind, body)
        try:
            item = await registry_of(request).update(
                self.kind, request.user.org, current.id, doc["name"], doc, secret, deps.commands.now()
            )
        except NameInUse as exc:
            return error_response(409, str(exc))
        if item is None:
            raise NotFoundException(f"{self.kind} not found")
        return json_response(200, _view(item, request.user))

    async def _delete(self, request: Request[Principal, Any, State], item_id: str) -> None:
        registry = registry_of(request)
        if self.kind in ("environment", "component"):
            item = await self._get(request, item_id)
            users = await registry.used_by(self.kind, request.user.org, item.id)
            if users:
                names = ", ".join(f"{name} ({pid})" for pid, name in users)
                raise HTTPException(status_code=409, detail=f"{self.kind} {item.id} is used by pipelines: {names}")
        if not await registry.delete(self.kind, request.user.org, item_id):
            raise NotFoundException(f"{self.kind} not found")

    @get("/", summary="List")
    async def list_items(self, request: Request[Principal, Any, State]) -> Response[bytes]:
        items = await registry_of(request).list_all(self.kind, request.user.org)
        return json_response(200, [_view(i, request.user) for i in items])

    @post("/", guards=[admin], summary="Create (admin)", status_code=201)
    async def create_item(self, request: Request[Principal, Any, State]) -> Response[bytes]:
        deps = deps_of(request)
        # The body may carry a webhook secret: keep only a keyed hash of it with the key.
        digest = deps.secrets.request_digest(await request.body()) if deps.secrets is not None else None
        return await idempotent(request, request.user, lambda: self._create(request), digest=digest)

    @get("/{item_id:str}", summary="Get one")
    async def get_item(self, request: Request[Principal, Any, State], item_id: FromPath[str]) -> Response[bytes]:
        return json_response(200, _view(await self._get(request, item_id), request.user))

    @put("/{item_id:str}", guards=[admin], summary="Replace (admin)")
    async def put_item(self, request: Request[Principal, Any, State], item_id: FromPath[str]) -> Response[bytes]:
        return await self._update(request, item_id, whole=True)

    @patch("/{item_id:str}", guards=[admin], summary="Update some fields (admin)")
    async def patch_item(self, request: Request[Principal, Any, State], item_id: FromPath[str]) -> Response[bytes]:
        return await self._update(request, item_id, whole=False)

    @delete("/{item_id:str}", guards=[admin], summary="Delete (admin)")
    async def delete_item(self, request: Request[Principal, Any, State], item_id: FromPath[str]) -> None:
        await self._delete(request, item_id)


class EnvironmentController(_Registry):
    path = f"{API}/environments"
    kind: Kind = "environment"


class ComponentController(_Registry):
    path = f"{API}/components"
    kind: Kind = "component"


class ChannelController(_Registry):
    path = f"{API}/channels"
    kind: Kind = "channel"


class DeploymentPage(msgspec.Struct, kw_only=True):
    data: list[DeploymentView]
    total: int
    page: int
    limit: int


class DeploymentController(Controller):
    path = f"{API}/deployments"
    guards = [viewer]
    tags = ["delivery"]

    @get("/", summary="Deployment history, newest first")
    async def list_deployments(
        self,
        request: Request[Principal, Any, State],
        page: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 1,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        environmentId: FromQuery[str | None] = None,
        componentId: FromQuery[str | None] = None,
        status: FromQuery[str | None] = None,
    ) -> DeploymentPage:
        if status is not None and status not in STATUSES:
            raise Invalid({"status": f"must be one of {', '.join(STATUSES)}"})
        where = ["org IS NOT DISTINCT FROM %s"]
        args: list[Any] = [request.user.org]
        for column, value in (("environment_id", environmentId), ("component_id", componentId), ("status", status)):
            if value is not None:
                where.append(f"{column} = %s")
                args.append(value)
        clause = " AND ".join(where)
        async with registry_of(request).pool.connection() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM rm_deployments WHERE {clause}", args)
            row = await cur.fetchone()
            cur = await conn.execute(
                f"SELECT doc::text FROM rm_deployments WHERE {clause} ORDER BY queued_at DESC, id DESC "
                "LIMIT %s OFFSET %s",
                [*args, limit, (page - 1) * limit],
            )
            rows = await cur.fetchall()
        return DeploymentPage(
            data=[_deployment.decode(r[0]) for r in rows], total=int(row[0]) if row else 0, page=page, limit=limit
        )

    @get("/current", summary="What is deployed where: the last successful deployment per environment and component")
    async def current(
        self,
        request: Request[Principal, Any, State],
        environmentId: FromQuery[str | None] = None,
        componentId: FromQuery[str | None] = None,
    ) -> list[DeploymentView]:
        where = ["org IS NOT DISTINCT FROM %s", "status = 'succeeded'"]
        args: list[Any] = [request.user.org]
        for column, value in (("environment_id", environmentId), ("component_id", componentId)):
            if value is not None:
                where.append(f"{column} = %s")
                args.append(value)
        async with registry_of(request).pool.connection() as conn:
            cur = await conn.execute(
                "SELECT DISTINCT ON (environment_id, component_id) doc::text FROM rm_deployments "
                f"WHERE {' AND '.join(where)} ORDER BY environment_id, component_id, finished_at DESC, id DESC",
                args,
            )
            rows = await cur.fetchall()
        return [_deployment.decode(r[0]) for r in rows]

    @get("/{deployment_id:str}", summary="One deployment")
    async def get_deployment(self, request: Request[Principal, Any, State], deployment_id: FromPath[str]) -> Any:
        async with registry_of(request).pool.connection() as conn:
            cur = await conn.execute(
                "SELECT doc::text FROM rm_deployments WHERE id = %s AND org IS NOT DISTINCT FROM %s",
                (deployment_id, request.user.org),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFoundException("deployment not found")
        return _deployment.decode(row[0])


async def check_stage_refs(request: Request[Principal, Any, State], stages: Any, path: str = "stages") -> None:
    """A deploy stage must name a component and an environment of the caller's organization."""
    if not isinstance(stages, list):
        return
    wanted: list[tuple[str, str, Kind]] = []

    def want(config: dict[str, Any], where: str) -> None:
        for key, kind in (("componentId", "component"), ("environmentId", "environment")):
            value = config.get(key)
            # A value with ${{ }} is known only when the run starts (the deploy then fails clearly).
            if isinstance(value, str) and value.strip() and "${{" not in value:
                wanted.append((f"{where}.{key}", value, kind))  # type: ignore[arg-type]

    defaults: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(stages):
        if not isinstance(item, dict):
            continue
        config = item.get("config")
        if item.get("type") == "deploy" and isinstance(config, dict):
            want(config, f"{path}[{i}].config")
            if config.get("environmentId") is None and isinstance(config.get("componentId"), str):
                defaults.append((f"{path}[{i}].config", config))
        # deploy steps of the jobs of a stage of jobs
        for j, job in enumerate(item.get("jobs") or []):
            for k, step in enumerate(job.get("steps") or [] if isinstance(job, dict) else []):
                if isinstance(step, dict) and isinstance(step.get("deploy"), dict):
                    want(step["deploy"], f"{path}[{i}].jobs[{j}].steps[{k}].deploy")
    if not wanted:
        return
    registry = registry_of(request)
    # Deploy stages naming only a component deploy it to the component's default environment.
    for where, config in defaults:
        component = await registry.get("component", request.user.org, config["componentId"])
        default = component.doc.get("defaultEnvironmentId") if component is not None else None
        if component is not None and not default:
            raise Invalid({f"{where}.environmentId": "is required: the component has no defaultEnvironmentId"})
        if default:
            config["environmentId"] = default
            wanted.append((f"{where}.environmentId", default, "environment"))
    known: dict[str, set[str]] = {}
    for kind in ("component", "environment"):
        ids = [v for _, v, k in wanted if k == kind]
        known[kind] = await registry.existing(kind, request.user.org, ids)
    errors = {p: f"unknown {k} {v!r}" for p, v, k in wanted if v not in known[k]}
    if errors:
        raise Invalid(errors)
