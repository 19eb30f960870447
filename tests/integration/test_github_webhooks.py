"""GitHub webhooks as GitHub sends them: form-encoded `payload=` (its default content type),
`ping`, branch and tag deletions, and the pusher recorded in the run's trigger."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration

SECRET = "a-github-webhook-secret-value"
STAGES = [{"id": "s", "type": "script", "config": {"command": "true"}}]
ZEROS = "0" * 40


async def _hooked(system: System) -> str:
    p = await system.create_pipeline([])
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save",
        json={"spec": {"stages": STAGES, "triggers": [{"type": "event", "events": ["push"]}]}},
        headers=system.headers("member"),
    )
    assert r.status_code == 200, r.text
    r = await system.client.put(
        f"/api/v1/pipelines/{p['id']}/webhook", json={"secret": SECRET}, headers=system.headers()
    )
    assert r.status_code == 200, r.text
    pid: str = p["id"]
    return pid


async def _github(system: System, pid: str, event: str, payload: dict[str, Any], *, form: bool) -> Any:
    """What GitHub sends: the HMAC is over the raw body, whatever its content type."""
    text = json.dumps(payload)
    if form:
        body, content_type = urlencode({"payload": text}).encode(), "application/x-www-form-urlencoded"
    else:
        body, content_type = text.encode(), "application/json"
    headers = {
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "Content-Type": content_type,
        "User-Agent": "GitHub-Hookshot/abc123",
    }
    return await system.client.post(f"/api/v1/hooks/{pid}", content=body, headers=headers)


def _push(**extra: Any) -> dict[str, Any]:
    return {
        "ref": "refs/heads/main",
        "before": "1" * 40,
        "after": "2" * 40,
        "deleted": False,
        "pusher": {"name": "octocat", "email": "octocat@example.com"},
        "sender": {"login": "octocat-login"},
        **extra,
    }


async def _only_the_next_push_runs(system: System, pid: str) -> None:
    """A real push afterwards: once its run is listed, it is the only run (nothing before started one)."""
    r = await _github(system, pid, "push", _push(), form=True)
    assert r.status_code == 201, r.text
    run_id = r.json()["run"]["id"]

    async def listed() -> list[str]:
        r = await system.client.get(f"/api/v1/pipelines/{pid}/runs", headers=system.headers())
        return [run["id"] for run in r.json()]

    await eventually(lambda: _has(listed(), run_id), what="the push's run in the list")
    assert await listed() == [run_id]


async def _has(ids: Any, run_id: str) -> bool:
    return run_id in await ids


async def test_a_form_encoded_push_starts_a_run_recording_the_pusher(system: System) -> None:
    pid = await _hooked(system)
    r = await _github(system, pid, "push", _push(), form=True)
    assert r.status_code == 201, r.text
    trigger = r.json()["run"]["trigger"]
    assert trigger["branch"] == "main" and trigger["commit"] == "2" * 40 and trigger["pusher"] == "octocat"


async def test_the_pusher_falls_back_to_the_sender(system: System) -> None:
    pid = await _hooked(system)
    payload = _push()
    del payload["pusher"]
    r = await _github(system, pid, "push", payload, form=False)
    assert r.status_code == 201, r.text
    assert r.json()["run"]["trigger"]["pusher"] == "octocat-login"


async def test_ping_is_answered_200_and_starts_nothing(system: System) -> None:
    pid = await _hooked(system)
    for form in (True, False):
        r = await _github(system, pid, "ping", {"zen": "Keep it logically awesome.", "hook_id": 1}, form=form)
        assert r.status_code == 200, r.text
        assert r.json()["triggered"] is False and "ping" in r.json()["reason"]
    await _only_the_next_push_runs(system, pid)


async def test_branch_and_tag_deletions_start_nothing(system: System) -> None:
    pid = await _hooked(system)
    deletions = [
        _push(deleted=True, after=ZEROS),
        _push(ref="refs/tags/v1.0", deleted=True, after=ZEROS),
        _push(after=ZEROS),  # no `deleted` field, all-zero `after`
    ]
    for payload in deletions:
        r = await _github(system, pid, "push", payload, form=True)
        assert r.status_code == 200, r.text
        assert r.json()["triggered"] is False and "deleted" in r.json()["reason"], r.text
    await _only_the_next_push_runs(system, pid)


async def test_a_form_body_without_payload_or_with_bad_json_is_a_400(system: System) -> None:
    pid = await _hooked(system)
    for body in (b"other=1", b"payload=%7Bnot-json"):
        headers = {
            "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
            "X-GitHub-Event": "push",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        r = await system.client.post(f"/api/v1/hooks/{pid}", content=body, headers=headers)
        assert r.status_code == 400 and r.json()["errors"][0]["path"] == "payload", r.text


async def test_nul_in_a_form_encoded_payload_is_a_400_naming_the_field(system: System) -> None:
    pid = await _hooked(system)
    r = await _github(system, pid, "push", _push(ref="refs/heads/ma\0in"), form=True)
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "payload.ref", r.text


async def test_a_form_encoded_payload_nested_ten_thousand_deep_is_a_400(system: System) -> None:
    pid = await _hooked(system)
    body = urlencode({"payload": "[" * 10_000 + "]" * 10_000}).encode()
    headers = {
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Event": "push",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    r = await system.client.post(f"/api/v1/hooks/{pid}", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "payload", r.text
