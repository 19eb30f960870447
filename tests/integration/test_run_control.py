"""Run control and failure against real PostgreSQL and NATS: pause, resume, stop, timeouts,
retries, approval timeouts, a killed executor, and redelivery."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def script(sid: str, command: str, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "type": "script", "config": {"command": command}, **extra}


async def test_pause_lets_the_running_stage_finish_and_resume_continues(system: System) -> None:
    p = await system.create_pipeline([script("one", "sleep 0.6; echo one"), script("two", "echo two")])
    run = await system.trigger(p["id"])
    await system.wait_run(p["id"], run["id"], lambda r: r["stageResults"][0]["status"] == "running")
    url = f"/api/v1/pipelines/{p['id']}/runs/{run['id']}"
    r = await system.client.post(f"{url}/pause", json={"reason": "hold on"}, headers=system.headers("member"))
    assert r.status_code == 403
    r = await system.client.post(f"{url}/pause", json={"reason": "hold on"}, headers=system.headers("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "paused" and r.json()["statusReason"] == "hold on" and r.json()["statusBy"] == "alice"
    # the running stage finishes; its completion, decided while paused, starts nothing
    paused = await system.wait_run(p["id"], run["id"], lambda x: x["stageResults"][0]["status"] == "succeeded")
    assert paused["status"] == "paused" and paused["stageResults"][1]["status"] == "pending"
    r = await system.client.post(f"{url}/pause", headers=system.headers("admin"))
    assert r.status_code == 400 and "paused" in r.json()["message"]
    r = await system.client.post(f"{url}/resume", json={"reason": "go"}, headers=system.headers("admin"))
    assert r.status_code == 200 and r.json()["status"] == "running"
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded" and done["stageResults"][1]["output"] == "two\n"
    r = await system.client.post(f"{url}/resume", headers=system.headers("admin"))
    assert r.status_code == 400 and "succeeded" in r.json()["message"]
    events = (await system.client.get(f"{url}/events", headers=system.headers())).json()
    # nothing started while paused: the second stage started only after the resume
    order = [(e["type"], e["data"].get("stage_id")) for e in events]
    assert order.index(("stage_started", "two")) > order.index(("run_resumed", None))
    paused_event = next(e for e in events if e["type"] == "run_paused")
    assert paused_event["data"]["paused_by"] == "alice" and paused_event["data"]["reason"] == "hold on"


async def test_stop_kills_the_whole_process_group_within_two_seconds(system: System, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)  # scripts run as an unprivileged user (PIPELINES_SCRIPT_USER)
    pidfile = tmp_path / "child.pid"
    # The child is found by its command line: its pid is one of the script's PID namespace.
    marker = f"60.{time.time_ns() % 10**9}"
    command = f"(sleep {marker} & echo $! > {pidfile}; wait) ; echo never"
    p = await system.create_pipeline([script("long", command), script("after", "echo after")])
    run = await system.trigger(p["id"])
    await system.wait_run(p["id"], run["id"], lambda r: r["stageResults"][0]["status"] == "running")
    await eventually(lambda: _exists(pidfile), what="the script's child pid")
    assert _running(f"sleep\0{marker}\0")
    started = time.monotonic()
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/stop",
        json={"reason": "runaway"},
        headers=system.headers("admin"),
    )
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    done = await system.wait_run(
        p["id"], run["id"], lambda x: x["stageResults"][0]["status"] not in ("running", "pending"), timeout=5
    )
    assert time.monotonic() - started < 2.0
    assert not _running(f"sleep\0{marker}\0"), "the script's child survived the stop"
    assert done["status"] == "cancelled" and done["statusReason"] == "runaway"
    assert done["stageResults"][0]["status"] == "cancelled" and "never" not in done["logs"]
    assert done["stageResults"][1]["status"] == "skipped"


async def _exists(path: Path) -> bool:
    return path.exists() and path.read_text().strip() != ""


def _running(cmdline: str) -> bool:
    """Whether a live process (not a zombie) of the host has this command line."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes() == cmdline.encode() and _alive(int(proc.name)):
                return True
        except OSError:
            pass
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie not yet reaped by init counts as dead
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


async def test_a_stage_timeout_kills_the_group_and_says_so(system: System) -> None:
    p = await system.create_pipeline([script("slow", "sleep 30", timeout=0.5)])
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=10)
    stage = done["stageResults"][0]
    assert done["status"] == "failed" and stage["status"] == "timeout"
    assert "timed out after 0.5 s" in stage["error"]


async def test_retries_rerun_a_failed_script_with_growing_backoff(system: System) -> None:
    command = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; echo attempt $n; [ $n -ge 3 ]"
    p = await system.create_pipeline([script("flaky", command, retry={"maxAttempts": 3, "backoff": 0.3})])
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=15)
    assert done["status"] == "succeeded", done
    stage = done["stageResults"][0]
    assert stage["attempt"] == 3
    assert [a["status"] for a in stage["attempts"]] == ["failed", "failed", "succeeded"]
    assert "attempt 1\n" in done["logs"] and "attempt 3\n" in done["logs"] and "(attempt 2)" in done["logs"]
    gaps = [
        _seconds(stage["attempts"][i + 1]["startedAt"]) - _seconds(stage["attempts"][i]["finishedAt"]) for i in range(2)
    ]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.55  # 0.3 s, then 0.6 s


async def test_a_stage_that_keeps_failing_fails_the_run_after_max_attempts(system: System) -> None:
    p = await system.create_pipeline([script("bad", "exit 7", retry={"maxAttempts": 2, "backoff": 0})])
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=10)
    assert done["status"] == "failed"
    assert [a["exitCode"] for a in done["stageResults"][0]["attempts"]] == [7, 7]


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_an_approval_nobody_answers_times_out_and_fails_the_run(system: System) -> None:
    gate = {"id": "gate", "type": "approval", "timeout": 0.5, "config": {"message": "anyone?"}}
    p = await system.create_pipeline([gate, script("after", "echo after")])
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=10)
    assert done["status"] == "failed"
    assert done["stageResults"][0]["status"] == "timeout"
    assert "approval timed out after 0.5 s" in done["stageResults"][0]["error"]
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/approve", headers=system.headers())
    assert r.status_code == 400 and "failed" in r.json()["message"]


async def test_a_finished_stage_is_never_run_again_on_redelivery(system: System, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)  # scripts run as an unprivileged user (PIPELINES_SCRIPT_USER)
    counter = tmp_path / "ran"
    p = await system.create_pipeline([script("once", f"echo x >> {counter}")])
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "succeeded")
    before = await system.store.read_stream(f"run-{run['id']}")
    # what a redelivered message does: drive the run again, several times, concurrently
    await asyncio.gather(*(system.executor.drive_once(run["id"]) for _ in range(5)))
    after = await system.store.read_stream(f"run-{run['id']}")
    assert len(after) == len(before)
    assert counter.read_text() == "x\n"


async def test_the_api_wakes_an_executor_directly_when_it_appends_to_a_run(system: System) -> None:
    from infra.broker import bus

    nc = await bus.connect(system.settings.nats_url, "test-wakes")
    seen: list[str] = []

    async def on_wake(msg: Any) -> None:
        seen.append(msg.subject)

    sub = await nc.subscribe(f"{bus.RUN_WAKE_SUBJECT}.{system.settings.events_stream}.*", cb=on_wake)
    await nc.flush()
    try:
        p = await system.create_pipeline([script("one", "true")])
        run = await system.trigger(p["id"])
        await system.wait_status(p["id"], run["id"], "succeeded")
        assert f"{bus.RUN_WAKE_SUBJECT}.{system.settings.events_stream}.{run['id']}" in seen
    finally:
        await sub.unsubscribe()
        await nc.close()
