"""Attacks on outbound requests, through the real API and executor (PostgreSQL, NATS): a URL
that points inside is refused again at connect time after DNS (at save time: test_outbound_save),
replies reach logs only as a short masked excerpt, and credential URLs stay hidden from viewers
and out of logs."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

import pytest

from infra.delivery.webhooks import DeliveryOptions
from tests.integration.system import System
from tests.integration.test_deploy_notify import component, deploy_stage, environment, receiver

pytestmark = pytest.mark.integration


class FakeDNS:
    """A resolver (the policy's port) with fixed answers, counting lookups: the attacker's DNS."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.answers:
            raise OSError(-2, "Name or service not known")
        return self.answers[host]


@dataclasses.dataclass
class Swap:
    system: System

    def __call__(self, **policy: Any) -> None:
        """The executor's delivery options as PIPELINES_OUTBOUND_ALLOW (or a resolver) now say."""
        assert self.system.executor.deliveries is not None
        base = DeliveryOptions.from_settings(self.system.settings)
        outbound = dataclasses.replace(base.outbound, **policy)
        self.system.executor.deliveries.options = dataclasses.replace(
            base, notify_attempts=2, notify_backoff=0.05, http_timeout=5, outbound=outbound
        )


@pytest.fixture
def swap(system: System) -> Any:
    s = Swap(system)
    s()
    yield s
    s()


async def test_a_name_that_resolves_to_loopback_is_refused_at_connect_time(system: System, swap: Swap) -> None:
    async with receiver() as hook:
        # Saved while PIPELINES_OUTBOUND_ALLOW let loopback through ...
        env = await environment(system, {"type": "webhook", "url": f"http://localhost:{hook.port}/hook"})
        comp = await component(system)
        p = await system.create_pipeline([deploy_stage(comp, env)])
        # ... which the operator has since narrowed to nothing.
        swap(allow=())
        run = await system.trigger(p["id"])
        failed = await system.wait_status(p["id"], run["id"], "failed", "succeeded")
        assert failed["status"] == "failed", failed
        error = failed["stageResults"][0]["error"] or ""
        assert f"POST http://localhost:{hook.port}/… refused: localhost is a loopback name" in error, error
        assert f"POST http://localhost:{hook.port}/… refused: localhost is a loopback name" in failed["logs"]
        assert hook.requests == []


async def test_the_checked_dns_answer_is_the_address_connected_to(system: System, swap: Swap) -> None:
    dns = FakeDNS({"deploy.rebind.test": ["127.0.0.1"]})
    async with receiver() as hook:
        # Does not resolve when saved (nothing to check yet); resolves to loopback when deploying.
        url = f"http://deploy.rebind.test:{hook.port}/hook"
        env = await environment(system, {"type": "webhook", "url": url})
        comp = await component(system)
        p = await system.create_pipeline([deploy_stage(comp, env)])
        swap(resolver=dns)  # loopback allowed (the tests' PIPELINES_OUTBOUND_ALLOW)
        run = await system.trigger(p["id"])
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done
        # The request went to the address that was checked, under the name's Host header: the
        # system's resolver, which knows no such name, was never asked.
        assert [h["host"] for _, h, _ in hook.requests] == [f"deploy.rebind.test:{hook.port}"]
        assert dns.lookups == ["deploy.rebind.test"]
        swap(allow=(), resolver=dns)
        run2 = await system.trigger(p["id"])
        failed = await system.wait_status(p["id"], run2["id"], "failed", "succeeded")
        assert "deploy.rebind.test resolves to 127.0.0.1, a loopback" in (failed["stageResults"][0]["error"] or "")
        assert len(hook.requests) == 1


async def test_a_reply_reaches_the_logs_only_as_its_status_and_a_short_masked_excerpt(
    system: System, swap: Swap
) -> None:
    async with receiver(500) as hook:
        hook.reply = b"boom: topsecret-webhook-key " + b"A" * 2000 + b" TAIL-OF-THE-BODY"
        env = await environment(system, {"type": "webhook", "url": hook.url, "secret": "topsecret-webhook-key"})
        comp = await component(system)
        p = await system.create_pipeline([deploy_stage(comp, env)])
        run = await system.trigger(p["id"])
        failed = await system.wait_status(p["id"], run["id"], "failed", "succeeded")
        assert failed["status"] == "failed"
        logs = failed["logs"]
        assert f"POST http://127.0.0.1:{hook.port}/…: HTTP 500: boom: *** AAA" in logs, logs
        assert "topsecret-webhook-key" not in logs and "TAIL-OF-THE-BODY" not in logs
        line = next(line for line in logs.splitlines() if "HTTP 500:" in line)
        assert len(line.split("HTTP 500: ", 1)[1]) <= 201, line


async def test_a_slack_url_is_redacted_for_viewers_and_kept_out_of_logs(
    system: System, swap: Swap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = f"SLACKTOKEN{uuid.uuid4().hex}"
    dns = FakeDNS({"hooks.slack.com": ["127.0.0.1"]})
    async with receiver(500) as hook:
        url = f"http://hooks.slack.com:{hook.port}/services/T000/B000/{token}"
        name = f"#ops-{uuid.uuid4().hex[:6]}"
        r = await system.client.post(
            "/api/v1/channels", json={"name": name, "type": "slack", "url": url}, headers=system.headers("admin")
        )
        assert r.status_code == 201, r.text
        channel = r.json()
        assert channel["url"] == url  # the admin who set it
        for role in ("viewer", "member"):
            shown = f"http://hooks.slack.com:{hook.port}/…"
            r = await system.client.get(f"/api/v1/channels/{channel['id']}", headers=system.headers(role))
            assert r.status_code == 200 and r.json()["url"] == shown, r.text
            r = await system.client.get("/api/v1/channels", headers=system.headers(role))
            assert token not in r.text and shown in r.text
        swap(resolver=dns)
        stage = {"id": "n", "name": "Notify", "type": "notify", "config": {"channel": name, "message": "hi"}}
        p = await system.create_pipeline([stage])
        run = await system.trigger(p["id"])
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done
        assert [path for path, _, _ in hook.requests] == [f"/services/T000/B000/{token}"] * 2
        swap(allow=(), resolver=dns)
        run2 = await system.trigger(p["id"])
        failed = await system.wait_status(p["id"], run2["id"], "failed", "succeeded")
        assert "refused" in (failed["stageResults"][0]["error"] or "")
    for seen in (done["logs"], failed["logs"], str(failed["stageResults"])):
        assert token not in seen
    assert [r.getMessage() for r in caplog.records if token in r.getMessage()] == []
