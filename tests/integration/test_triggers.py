"""Webhook and cron triggers against real PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from infra.executor.scheduler import CRON_PIPELINES, Scheduler
from infra.store.migrate import migrate
from tests.integration.system import System

pytestmark = pytest.mark.integration

SECRET = "a-webhook-secret-of-some-length"
STAGES = [{"id": "s", "type": "script", "config": {"command": "true"}}]


async def _pipeline_with(system: System, triggers: list[dict[str, Any]]) -> str:
    p = await system.create_pipeline([])
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save",
        json={"spec": {"stages": STAGES, "triggers": triggers}},
        headers=system.headers("member"),
    )
    assert r.status_code == 200, r.text
    pid: str = p["id"]
    return pid


def _signed(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def _deliver(
    system: System,
    pid: str,
    payload: dict[str, Any],
    *,
    event: str = "push",
    secret: str = SECRET,
    delivery: str | None = None,
) -> Any:
    body = json.dumps(payload).encode()
    headers = {
        "X-Hub-Signature-256": _signed(body, secret),
        "X-GitHub-Event": event,
        "Content-Type": "application/json",
    }
    if delivery:
        headers["X-GitHub-Delivery"] = delivery
    return await system.client.post(f"/api/v1/hooks/{pid}", content=body, headers=headers)


async def test_an_admin_sets_the_webhook_secret_and_the_api_never_returns_it(system: System) -> None:
    pid = await _pipeline_with(system, [{"type": "event", "events": ["push"], "branches": ["main"]}])
    url = f"/api/v1/pipelines/{pid}/webhook"
    r = await system.client.put(url, json={"secret": SECRET}, headers=system.headers("member"))
    assert r.status_code == 403
    r = await system.client.put(url, json={"secret": "short"}, headers=system.headers("admin"))
    assert r.status_code == 400
    r = await system.client.put(url, json={"secret": SECRET}, headers=system.headers("admin"))
    assert r.status_code == 200 and r.json()["configured"] is True
    r = await system.client.get(url, headers=system.headers("viewer"))
    assert r.json() == {"url": f"/api/v1/hooks/{pid}", "configured": True, "updatedAt": r.json()["updatedAt"]}
    assert SECRET not in r.text


async def test_a_signed_push_to_a_matching_branch_starts_a_run_recording_its_trigger(system: System) -> None:
    pid = await _pipeline_with(system, [{"type": "event", "events": ["push"], "branches": ["main", "release/*"]}])
    await system.client.put(f"/api/v1/pipelines/{pid}/webhook", json={"secret": SECRET}, headers=system.headers())
    delivery = str(uuid.uuid4())
    payload = {"ref": "refs/heads/release/1.2", "after": "abc123"}
    r = await _deliver(system, pid, payload, delivery=delivery)
    assert r.status_code == 201, r.text
    run = r.json()["run"]
    assert run["trigger"] == {
        "type": "event",
        "event": "push",
        "ref": "refs/heads/release/1.2",
        "branch": "release/1.2",
        "commit": "abc123",
        "delivery": delivery,
        "pusher": None,
    }
    assert run["triggeredBy"] == "webhook"
    done = await system.wait_status(pid, run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded"
    # the same delivery again starts nothing new
    r = await _deliver(system, pid, payload, delivery=delivery)
    assert r.status_code == 200 and r.json()["duplicate"] is True and r.json()["run"]["id"] == run["id"]


async def test_filters_on_event_type_and_branch_glob(system: System) -> None:
    pid = await _pipeline_with(system, [{"type": "event", "events": ["push"], "branches": ["release/*"]}])
    await system.client.put(f"/api/v1/pipelines/{pid}/webhook", json={"secret": SECRET}, headers=system.headers())
    r = await _deliver(system, pid, {"ref": "refs/heads/main"})
    assert r.status_code == 200 and r.json()["triggered"] is False and "matches none" in r.json()["reason"]
    r = await _deliver(system, pid, {"ref": "refs/heads/release/a/b"})
    assert r.json()["triggered"] is False  # `*` stays within one path segment
    r = await _deliver(system, pid, {"ref": "refs/heads/release/2"}, event="pull_request")
    assert r.json()["triggered"] is False and "pull_request" in r.json()["reason"]


async def test_bad_or_missing_signatures_are_401_and_start_nothing(system: System) -> None:
    pid = await _pipeline_with(system, [{"type": "event"}])
    await system.client.put(f"/api/v1/pipelines/{pid}/webhook", json={"secret": SECRET}, headers=system.headers())
    r = await _deliver(system, pid, {"ref": "refs/heads/main"}, secret="the-wrong-secret-entirely")
    assert r.status_code == 401
    r = await system.client.post(f"/api/v1/hooks/{pid}", content=b"{}")
    assert r.status_code == 401
    r = await _deliver(system, str(uuid.uuid4()), {"ref": "refs/heads/main"})
    assert r.status_code == 401
    r = await _deliver(system, "not-an-id", {"ref": "refs/heads/main"})
    assert r.status_code == 401
    runs = await system.client.get(f"/api/v1/pipelines/{pid}/runs", headers=system.headers())
    assert runs.json() == []


async def test_each_cron_tick_fires_exactly_once_with_two_schedulers(system: System) -> None:
    pid = await _pipeline_with(system, [{"type": "cron", "schedule": "*/5 * * * *", "timezone": "Europe/Berlin"}])
    await _until_listed(system, pid)
    clock = [datetime.now(UTC) + timedelta(minutes=5)]
    pool = system.store.pool
    one = Scheduler(system.commands, pool, now=lambda: clock[0])
    two = Scheduler(system.commands, pool, now=lambda: clock[0])
    fired = await asyncio.gather(one.tick_once(), two.tick_once(), one.tick_once())
    mine = [r for batch in fired for r in batch if await _run_of(system, r) == pid]
    assert len(mine) == 1
    run, _ = await system.commands.load_run(mine[0])
    assert run.trigger["type"] == "cron" and run.trigger["schedule"] == "*/5 * * * *"
    assert run.triggered_by == "scheduler"


async def test_after_downtime_only_one_missed_tick_is_caught_up(system: System) -> None:
    pid = await _pipeline_with(system, [{"type": "cron", "schedule": "* * * * *"}])
    await _until_listed(system, pid)
    clock = [datetime.now(UTC) + timedelta(minutes=2)]
    scheduler = Scheduler(system.commands, system.store.pool, now=lambda: clock[0])
    first = [r for r in await scheduler.tick_once() if await _run_of(system, r) == pid]
    assert len(first) == 1
    # down for ten minutes: ten ticks missed, one run on return
    clock[0] += timedelta(minutes=10)
    restarted = Scheduler(system.commands, system.store.pool, now=lambda: clock[0])
    caught_up = [r for r in await restarted.tick_once() if await _run_of(system, r) == pid]
    assert len(caught_up) == 1
    again = [r for r in await restarted.tick_once() if await _run_of(system, r) == pid]
    assert again == []


async def _run_of(system: System, run_id: str) -> str:
    state, _ = await system.commands.load_run(run_id)
    return state.pipeline_id


async def _until_listed(system: System, pid: str) -> None:
    for _ in range(200):
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT state::jsonb -> 'triggers' FROM rm_pipelines WHERE id = %s", (pid,))
            row = await cur.fetchone()
        if row and row[0]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the projector never listed the pipeline's triggers")


async def test_a_long_running_scheduler_remembers_no_more_ticks_than_it_has_triggers(system: System) -> None:
    pid = await _pipeline_with(system, [{"type": "cron", "schedule": "* * * * *"}])
    await _until_listed(system, pid)
    clock = [datetime.now(UTC) + timedelta(minutes=1)]
    scheduler = Scheduler(system.commands, system.store.pool, now=lambda: clock[0])
    fired = []
    for _ in range(12):
        clock[0] += timedelta(minutes=1)
        fired += [r for r in await scheduler.tick_once() if await _run_of(system, r) == pid]
    assert len(fired) == 12  # one run per tick, each tick fired once
    async with system.store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM rm_pipelines, json_array_elements(state -> 'triggers') t WHERE t ->> 'type' = 'cron'"
        )
        row = await cur.fetchone()
    assert row is not None and 1 <= scheduler.remembered <= row[0]


def _nodes(plan: dict[str, Any]) -> list[str]:
    return [plan["Node Type"]] + [n for child in plan.get("Plans", []) for n in _nodes(child)]


async def test_a_scheduler_tick_reads_only_the_pipelines_with_a_cron_trigger(database_url: str) -> None:
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # A session-private copy of the table, with its indexes, shadows the shared one.
        await conn.execute("CREATE TEMP TABLE rm_pipelines (LIKE public.rm_pipelines INCLUDING ALL)")
        await conn.execute(
            "INSERT INTO rm_pipelines (id, name, created_at, doc, state) "
            "SELECT 'p' || g, 'p' || g, now(), '{}', json_build_object('triggers', "
            "  CASE WHEN g % 5000 = 0 THEN json_build_array(json_build_object('type', 'cron')) "
            "  ELSE json_build_array(json_build_object('type', 'event')) END) "
            "FROM generate_series(1, 20000) g"
        )
        await conn.execute("ANALYZE rm_pipelines")
        cur = await conn.execute(f"EXPLAIN (FORMAT JSON) {CRON_PIPELINES}")
        explained = await cur.fetchone()
        assert explained is not None
        plan = explained[0] if isinstance(explained[0], list) else json.loads(explained[0])
        nodes = _nodes(plan[0]["Plan"])
        assert "Seq Scan" not in nodes, nodes
        assert any("Index" in n for n in nodes), nodes
        cur = await conn.execute(CRON_PIPELINES)
        assert len(await cur.fetchall()) == 4
