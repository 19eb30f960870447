"""The OpenAPI document is the truth: schemathesis (examples, coverage and fuzzing phases) sends
every operation valid and invalid requests, with an admin token and real ids, to the API running
against real PostgreSQL and NATS; no answer is a 5xx, off the documented status codes or off
the documented schema."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from nats.js.errors import NotFoundError
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from infra.auth import issue_token
from infra.config import Settings
from infra.http.app import create_app, openapi_document
from services.bootstrap import build_api
from tests.integration.system import make_settings

pytestmark = [pytest.mark.integration]

CONFIG = """
seed = 13
[generation]
max-examples = 15
no-shrink = true
deterministic = true
[phases.examples]
enabled = true
[phases.coverage]
enabled = true
unexpected-methods = []
[phases.fuzzing]
enabled = true
[phases.stateful]
enabled = false
"""
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]


# The document is built without servers, so operations are known when pytest collects; the app
# opens its pool and NATS connection (with the settings the `api` fixture puts here) when
# schemathesis's ASGI client first calls it.
_SETTINGS: dict[str, Settings] = {}
APP = create_app(lambda: build_api(_SETTINGS["api"]))
schema = schemathesis.openapi.from_dict(openapi_document(APP), config=SchemathesisConfig.from_str(CONFIG))
schema.app = APP


@pytest.fixture(scope="module")
def api(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """An admin token and real ids of its organization, made through the API itself."""
    settings = make_settings(database_url, nats_url, Path(tmp_path_factory.mktemp("st-data")))
    _SETTINGS["api"] = settings
    token = issue_token(settings, sub="fuzzer", roles=["admin"], org=f"org-{uuid.uuid4().hex[:8]}")
    auth = {"Authorization": f"Bearer {token}"}
    with asgi.get_client(APP) as client:
        yield Fuzzed(auth=auth, ids=_real_ids(client, auth), client=client)
    asgi.shutdown_lifespans()
    # Issuing broker credentials makes the API create this module's events stream (no relay runs
    # here): it must not outlive the module, or the next module's stream overlaps its subjects.
    asyncio.run(_drop_stream(nats_url, settings.events_stream))


async def _drop_stream(nats_url: str, stream: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


@dataclass
class Fuzzed:
    auth: dict[str, str]
    ids: dict[str, str]
    client: Any


def _real_ids(client: Any, auth: dict[str, str]) -> dict[str, str]:
    """A pipeline with a run, an environment, a component and a channel of the fuzzer's organization."""
    stage = {"id": "s", "name": "S", "type": "script", "config": {"command": "true"}}
    p = client.post("/api/v1/pipelines", json={"name": "fuzzed", "stages": [stage]}, headers=auth)
    assert p.status_code == 201, p.text
    pipeline_id = p.json()["id"]
    r = client.post(f"/api/v1/pipelines/{pipeline_id}/trigger", headers=auth)
    assert r.status_code == 201, r.text
    env = client.post(
        "/api/v1/environments",
        json={"name": "staging", "deployer": {"type": "command", "command": "true"}},
        headers=auth,
    )
    assert env.status_code == 201, env.text
    comp = client.post("/api/v1/components", json={"name": "web"}, headers=auth)
    assert comp.status_code == 201, comp.text
    return {
        "pipeline_id": pipeline_id,
        "run_id": r.json()["id"],
        "item_id": env.json()["id"],
        "deployment_id": str(uuid.uuid4()),
    }


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case: Any, api: Fuzzed) -> None:
    for name, value in list((case.path_parameters or {}).items()):
        # Half the cases get a real id (so handlers go past the 404), half keep what was generated.
        if name in api.ids and zlib.crc32(repr(value).encode()) % 2 == 0:
            case.path_parameters[name] = api.ids[name]
    case.call_and_validate(headers=api.auth, checks=CHECKS)
