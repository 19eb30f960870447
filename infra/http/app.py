"""The HTTP API (litestar): the app factory with its lifespan, error handling, health and OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from infra.http.access import access_log, log_response
from infra.http.agents import AgentsController
from infra.http.asyncapi import ASYNCAPI_URL, asyncapi
from infra.http.broker_credentials import BrokerCredentialsController
from infra.http.consistency import ReadYourWrites
from infra.http.dashboard import PUBLIC_PATHS as DASHBOARD_PATHS
from infra.http.dashboard import dashboard_routes
from infra.http.delivery import ChannelController, ComponentController, DeploymentController, EnvironmentController
from infra.http.deps import API, Deps, deps_of
from infra.http.errors import handle
from infra.http.guards import JWTAuth
from infra.http.hooks import WebhookSettingsController, receive_hook
from infra.http.info import info
from infra.http.inputs import InputChecks
from infra.http.openapi import ContractJson, complete
from infra.http.pipelines import PipelineController
from infra.http.run_lists import RunListController
from infra.http.runs import RunController, run_actions
from infra.http.secrets import SecretController
from infra.http.specs import SPEC_SCHEMA_URL, SpecController, spec_schema, validate_new_spec
from infra.metrics import CONTENT_TYPE, exposition, http_responses
from infra.setaside import report

__all__ = ["Deps", "create_app", "openapi_document"]


def openapi_document(app: Litestar) -> dict[str, Any]:
    """The document /schema/openapi.json serves."""
    return complete(app.openapi_schema.to_schema())


@get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", include_in_schema=False)
async def readyz(request: Request[Any, Any, State]) -> Response[Any]:
    deps = deps_of(request)
    try:
        checks = await asyncio.wait_for(deps.ready(), timeout=3)
    except Exception:
        checks = {"checks": False}
    ok = all(checks.values())
    body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
    if ok:
        # Serving, yet some event was set aside by a consumer: say so, and why (infra/setaside.py).
        with contextlib.suppress(Exception):
            if set_aside := await deps.read_models.set_aside():
                body.update(report(set_aside))
    return Response(content=body, status_code=200 if ok else 503)


@get("/metrics", include_in_schema=False)
async def metrics() -> Response[bytes]:
    return Response(content=exposition(), media_type=CONTENT_TYPE)


async def _count(message: Any, scope: Any) -> None:
    if message["type"] == "http.response.start":
        http_responses.labels(scope.get("method", ""), str(int(message["status"]))).inc()


def create_app(
    build: Callable[[], Awaitable[Deps]],
    *,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = 10 * 1024 * 1024,
    max_json_depth: int = 64,
) -> Litestar:
    """`build` opens the resources (pool, NATS) inside the server's event loop, at startup.
    `cors_origins`: the browser origins allowed to call the API (PIPELINES_CORS_ORIGINS; none by
    default); `max_body_bytes`: larger bodies are a 413 (PIPELINES_MAX_BODY_BYTES); `max_json_depth`:
    deeper JSON bodies are a 400 (PIPELINES_MAX_JSON_DEPTH)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        deps = await build()
        app.state.deps = deps
        try:
            yield
        finally:
            await deps.close()

    app = Litestar(
        route_handlers=[
            PipelineController,
            RunController,
            RunListController,
            *run_actions,
            SpecController,
            WebhookSettingsController,
            SecretController,
            EnvironmentController,
            ComponentController,
            ChannelController,
            DeploymentController,
            BrokerCredentialsController,
            AgentsController,
            receive_hook,
            spec_schema,
            validate_new_spec,
            info,
            asyncapi,
            healthz,
            readyz,
            metrics,
            *dashboard_routes(),
        ],
        middleware=[
            access_log,
            DefineMiddleware(
                JWTAuth,
                exclude=[
                    "^/healthz",
                    "^/readyz",
                    "^/metrics",
                    "^/schema",
                    f"^{API}/hooks",
                    f"^{SPEC_SCHEMA_URL}",
                    f"^{ASYNCAPI_URL}",
                    *DASHBOARD_PATHS,
                ],
            ),
            DefineMiddleware(InputChecks, max_body_bytes=max_body_bytes, max_json_depth=max_json_depth),
            ReadYourWrites,
        ],
        exception_handlers={Exception: handle},
        after_response=None,
        before_send=[_count, log_response],
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="Pipelines API",
            version="1.0.0",
            path="/schema",
            render_plugins=[ContractJson()],
            components=Components(
                security_schemes={
                    "BearerToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
                    # Browser sessions; writes also need a same-site Origin or X-Requested-With (CSRF).
                    "AccessTokenCookie": SecurityScheme(
                        type="apiKey", name="access_token", security_scheme_in="cookie"
                    ),
                }
            ),
            security=[{"BearerToken": []}, {"AccessTokenCookie": []}],
        ),
        state=State({}),
        debug=False,
        logging_config=None,  # the service's own (services.bootstrap.setup_logging), not litestar's
        cors_config=CORSConfig(
            allow_origins=list(cors_origins),
            allow_credentials=True,
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Pipelines-Min-Position",
                "X-Organization-Id",
                "X-Requested-With",
            ],
            # Read-your-writes from another origin: the position a write answered with, sent back
            # by the next read (a header CORS would otherwise hide from the page's script).
            expose_headers=["Location", "Pipelines-Position"],
        )
        if cors_origins
        else None,
        request_max_body_size=max_body_bytes,
    )
    return app
