"""The dashboard: the same HTML shell at every page address (`/`, `/pipelines/<id>`, `/runs`,
`/runs/<id>`, `/deployments`, `/signin`) and its static files under `/ui/`, shipped in this
package. The pages are ES modules (no build step) that read the API with the signed-in token and
follow the gateway's WebSocket; the shell needs no token, so a shared address opens the sign-in."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.datastructures import CacheControlHeader
from litestar.handlers import HTTPRouteHandler
from litestar.router import Router
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"
ASSETS = "/ui"
# The page addresses and the assets: no token needed (the JWT middleware skips them).
PUBLIC_PATHS = (r"^/$", r"^/(pipelines|runs|deployments|signin)(/[^/]*)?$", rf"^{ASSETS}/")

# Scripts and styles from this origin only; the gateway is another port (and ws:), so
# `connect-src` lets the pages reach any origin's HTTP and WebSocket.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss: http: https:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _shell() -> Response[bytes]:
    return Response(
        content=(STATIC / "index.html").read_bytes(),
        media_type="text/html",  # litestar adds "; charset=utf-8"
        headers={**_HEADERS, "Cache-Control": "no-cache"},
    )


@get(["/", "/signin", "/runs", "/deployments"], include_in_schema=False, sync_to_thread=False)
def dashboard_page() -> Response[bytes]:
    return _shell()


@get(["/pipelines/{pipeline_id:str}", "/runs/{run_id:str}"], include_in_schema=False, sync_to_thread=False)
def dashboard_item_page() -> Response[bytes]:
    return _shell()


def dashboard_routes() -> list[HTTPRouteHandler | Router]:
    """The page routes and the assets' router, for the API app."""
    assets = create_static_files_router(
        path=ASSETS,
        directories=[STATIC],
        # Revalidated on every load (ETag / Last-Modified): a new version of the service is seen at once.
        cache_control=CacheControlHeader(no_cache=True),
        include_in_schema=False,
        name="dashboard-assets",
    )
    return [dashboard_page, dashboard_item_page, assets]
