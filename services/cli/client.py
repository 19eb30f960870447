"""The HTTP client of the API: one request helper that turns every failure into an exit code."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import httpx

from services.cli.errors import AUTH, FAILED, UNREACHABLE, CliError
from services.cli.profiles import Profile

API_PATH = "/api/v1"
PAGE = 100


def base_url(api: str) -> str:
    """`http://host:port`, whether the profile says that or `http://host:port/api/v1`."""
    url = api.rstrip("/")
    return url[: -len(API_PATH)] if url.endswith(API_PATH) else url


class ApiError(CliError):
    """The API answered with an error; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, details: list[str]) -> None:
        super().__init__(message, AUTH if status in (401, 403) else FAILED, details)
        self.status = status


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("detail") or response.reason_phrase)
        errors = body.get("errors") or []
        details = [f"{e.get('path')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
    else:
        message, details = response.text.strip() or response.reason_phrase, []
    return ApiError(response.status_code, f"{response.status_code} {message}", details)


class Api:
    """A session with one installation's API, as one profile names it."""

    def __init__(self, profile: Profile, timeout: float = 30.0) -> None:
        self.profile = profile
        self.base = base_url(profile.api)
        headers = {"Authorization": f"Bearer {profile.token}"} if profile.token else {}
        self.http = httpx.Client(base_url=self.base + API_PATH, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self.http.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the API at {self.base}: {exc or type(exc).__name__}", UNREACHABLE) from exc
        if response.status_code >= 400:
            raise _error(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None} or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # -- lookups shared by the commands ----------------------------------------------------

    def pipelines(self) -> list[dict[str, Any]]:
        """Every pipeline the caller sees (all pages)."""
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.get("/pipelines", page=page, limit=PAGE)
            found.extend(body["data"])
            if len(found) >= body["total"] or not body["data"]:
                return found
            page += 1

    def find_pipeline(self, ref: str) -> dict[str, Any] | None:
        """The pipeline with this id or name, or None."""
        if _is_uuid(ref):
            try:
                pipeline: dict[str, Any] = self.get(f"/pipelines/{ref}")
                return pipeline
            except ApiError as exc:
                if exc.status != 404:
                    raise
        return next((p for p in self.pipelines() if p["name"] == ref), None)

    def pipeline(self, ref: str) -> dict[str, Any]:
        found = self.find_pipeline(ref)
        if found is None:
            raise CliError(f"no pipeline named or with id {ref!r}", FAILED)
        return found

    def run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.get(f"/pipelines/runs/{quote(run_id, safe='')}")
        return run

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.get("/info")
        return info


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
