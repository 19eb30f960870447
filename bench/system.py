"""Workloads against the running system (every service its own process, as `make up` runs them):
end to end, log delivery, WebSocket fan-out, executor memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from bench import cpu, harness, wsraw
from bench.stats import summary_ms
from domain import run as rn
from infra.auth import issue_token
from infra.broker.bus import APPENDED_SUBJECT
from infra.broker.bus import connect as nats_connect
from infra.config import Settings
from infra.store.migrate import open_pool
from infra.store.postgres import PostgresEventStore
from infra.store.records import NewEvent
from services.dev.stack import Stack

TERMINAL = ("succeeded", "failed", "cancelled")
_decode = msgspec.json.Decoder()


def script_stages(*commands: str) -> list[dict[str, Any]]:
    return [
        {"id": f"s{i + 1}", "name": f"s{i + 1}", "type": "script", "config": {"command": c}}
        for i, c in enumerate(commands)
    ]


class System:
    """A client of the running stack: HTTP for commands, WebSocket for what happened."""

    def __init__(self, stack: Stack, env: dict[str, str]) -> None:
        self.stack = stack
        self.settings = Settings.from_env(env | {"PIPELINES_API_PORT": str(stack.api_port)})
        self.api = stack.api_url + "/api/v1"
        self.ws_url = stack.gateway_url
        self.member = issue_token(self.settings, sub="bench", roles=["member"])
        self.admin = issue_token(self.settings, sub="bench-admin", roles=["admin"])
        self.http = httpx.AsyncClient(
            timeout=120, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        )

    async def close(self) -> None:
        await self.http.aclose()

    def _h(self, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin if admin else self.member}"}

    async def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = await self.http.get(self.stack.api_url + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("the stack never became ready")

    async def create_pipeline(self, stages: list[dict[str, Any]], name: str | None = None) -> str:
        body = {"name": name or f"bench-{uuid.uuid4().hex[:10]}", "stages": stages}
        r = await self.http.post(f"{self.api}/pipelines", json=body, headers=self._h())
        r.raise_for_status()
        return str(r.json()["id"])

    async def trigger(self, pipeline_id: str) -> str:
        r = await self.http.post(f"{self.api}/pipelines/{pipeline_id}/trigger", json={}, headers=self._h())
        if r.status_code != 201:
            raise RuntimeError(f"trigger answered {r.status_code}: {r.text[:200]}")
        return str(r.json()["id"])

    async def delete_pipeline(self, pipeline_id: str) -> None:
        r = await self.http.delete(f"{self.api}/pipelines/{pipeline_id}", headers=self._h(admin=True))
        if r.status_code not in (204, 404):
            raise RuntimeError(f"delete answered {r.status_code}: {r.text[:200]}")

    async def status(self, pipeline_id: str, run_id: str) -> str:
        r = await self.http.get(f"{self.api}/pipelines/{pipeline_id}/runs/{run_id}", headers=self._h())
        r.raise_for_status()
        return str(r.json()["status"])

    async def ws(self) -> ClientConnection:
        return await ws_connect(f"{self.ws_url}?token={self.member}", max_size=None, compression=None)


class RunWatcher:
    """One WebSocket subscription to a pipeline's runs: when each run reached a final status."""

    def __init__(self, system: System, pipeline_id: str) -> None:
        self.system = system
        self.pipeline_id = pipeline_id
        self.finished: dict[str, tuple[str, float]] = {}
        self._waiters: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._ws = await self.system.ws()
        await self._ws.send(
            json.dumps({"action": "subscribe", "channel": "runs", "params": {"pipelineId": self.pipeline_id}})
        )
        while True:
            frame = _decode.decode(await asyncio.wait_for(self._ws.recv(), 30))
            if frame.get("event") == "subscribed":
                break
            if frame.get("event") == "error":
                raise RuntimeError(f"subscribe failed: {frame}")
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(Exception):
            async for message in self._ws:
                now = time.perf_counter()
                frame = _decode.decode(message)
                if frame.get("event") != "pipeline.run.updated":
                    continue
                data = frame["data"]
                status = data.get("status")
                if status in TERMINAL:
                    run_id = data["id"]
                    if run_id not in self.finished:
                        self.finished[run_id] = (status, now)
                        waiter = self._waiters.pop(run_id, None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result((status, now))

    async def wait(self, run_id: str, timeout: float = 60.0) -> tuple[str, float]:
        if run_id in self.finished:
            return self.finished[run_id]
        fut = self._waiters.setdefault(run_id, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(fut, timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._ws is not None:
            await self._ws.close()


# ---- 1. end to end ------------------------------------------------------------------------------


async def end_to_end(
    system: System,
    *,
    latency_runs: int,
    warmup: int,
    concurrency: int,
    duration: float,
    ramp: float,
    processes: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """Three `script` stages running `true`: trigger over HTTP, `succeeded` seen on the WebSocket.
    With `processes` (name: pid), also the CPU each of them spent per run over the whole workload
    (latency and throughput runs together; see bench.cpu)."""
    pipeline_id = await system.create_pipeline(script_stages("true", "true", "true"))
    watcher = RunWatcher(system, pipeline_id)
    await watcher.start()
    failures: list[str] = []
    finished = 0

    async def unit() -> None:
        nonlocal finished
        run_id = await system.trigger(pipeline_id)
        status, _ = await watcher.wait(run_id)
        finished += 1
        if status != "succeeded":
            failures.append(status)
            raise RuntimeError(f"run {run_id} ended {status}")

    before = cpu.snapshot(processes or {})
    reads_before = await feed_reads(system)
    try:
        lat = await harness.latency(unit, latency_runs, warmup=warmup)
        thr = await harness.throughput(unit, concurrency, duration, ramp=ramp)
    finally:
        await watcher.close()
    out: dict[str, Any] = {"latency": lat, "throughput": thr, "failed_runs": len(failures)}
    if processes:
        # Let the projector and the gateway finish the last runs' events before the second reading.
        await asyncio.sleep(1.0)
        out["cpu_ms_per_run"] = cpu.per_run_ms(before, cpu.snapshot(processes), finished)
        out["runs"] = finished
    if finished:
        reads_after = await feed_reads(system)
        out["feed_reads_per_run"] = {
            k: round((reads_after[k] - reads_before.get(k, 0.0)) / finished, 2) for k in reads_after
        }
    return out


async def feed_reads(system: System) -> dict[str, float]:
    """How often the relay and the projector have read the store's feed so far, as
    `<consumer>.<result>` (`events` or `empty`), from their metrics (none when not served)."""
    out: dict[str, float] = {}
    for name, url in system.stack.metrics_urls():
        if name not in ("relay", "projector"):
            continue
        with contextlib.suppress(httpx.HTTPError):
            r = await system.http.get(url)
            for family in text_string_to_metric_families(r.text):
                for sample in family.samples:
                    if sample.name == "pipelines_feed_reads_total":
                        out[f"{sample.labels['consumer']}.{sample.labels['result']}"] = sample.value
    return out


# ---- issue 3: log lines reach a subscriber --------------------------------------------------------


async def log_delivery(system: System, *, lines: int, interval: float, delay: float = 1.0) -> dict[str, Any]:
    """A script echoes timestamped lines; one subscriber of the run's `logs` channel."""
    command = f"sleep {delay}; i=0; while [ $i -lt {lines} ]; do date +%s.%N; sleep {interval}; i=$((i+1)); done"
    pipeline_id = await system.create_pipeline(script_stages(command))
    run_id = await system.trigger(pipeline_id)
    ws = await system.ws()
    latencies: list[float] = []
    try:
        await ws.send(json.dumps({"action": "subscribe", "channel": "logs", "params": {"runId": run_id}}))
        deadline = time.monotonic() + 30 + lines * (interval + 0.05)
        while len(latencies) < lines and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            now = time.time()
            frame = _decode.decode(message)
            if frame.get("event") == "error":
                raise RuntimeError(f"logs subscription failed: {frame}")
            if frame.get("event") != "pipeline.log":
                continue
            text = str(frame["data"].get("message", ""))
            with contextlib.suppress(ValueError):
                latencies.append(now - float(text))
    finally:
        await ws.close()
    out = summary_ms(latencies)
    out["expected"] = lines
    return out


# ---- 6. WebSocket fan-out ------------------------------------------------------------------------


async def _park_run(system: System) -> tuple[str, str]:
    """A run waiting at an approval gate: nothing else writes to it meanwhile."""
    pipeline_id = await system.create_pipeline(
        [{"id": "gate", "name": "gate", "type": "approval", "config": {"message": "bench"}}]
    )
    run_id = await system.trigger(pipeline_id)
    deadline = time.monotonic() + 30
    while await system.status(pipeline_id, run_id) != "waiting_approval":
        if time.monotonic() > deadline:
            raise RuntimeError("the run never reached its approval gate")
        await asyncio.sleep(0.05)
    return pipeline_id, run_id


async def fan_out(system: System, database_url: str, *, subscribers: int, events: int, rate: float) -> dict[str, Any]:
    """`subscribers` WebSocket clients on one run's `logs` channel; this process appends log events
    to the run through the store (as the executor does, waking the relay the same way) and times
    each from just before its append until every subscriber has it."""
    pipeline_id, run_id = await _park_run(system)
    sent_at: dict[int, float] = {}
    received: dict[int, list[float]] = {}
    marker = b'"message":"fanout '

    def on_text(payload: bytes, now: float) -> None:
        i = payload.find(marker)
        if i < 0:
            return
        j = payload.find(b'"', i + len(marker))
        with contextlib.suppress(ValueError):
            received.setdefault(int(payload[i + len(marker) : j]), []).append(now)

    clients: list[wsraw.RawWs] = []
    subscribed = 0

    def on_control(payload: bytes, now: float) -> None:
        nonlocal subscribed
        if b'"event":"subscribed"' in payload:
            subscribed += 1
        else:
            on_text(payload, now)

    url = f"{system.ws_url}?token={system.member}"
    sub_frame = json.dumps({"action": "subscribe", "channel": "logs", "params": {"runId": run_id}})
    began = time.monotonic()
    for start in range(0, subscribers, 50):
        batch = await asyncio.gather(
            *(wsraw.connect(url, on_control) for _ in range(start, min(start + 50, subscribers)))
        )
        for c in batch:
            c.send_text(sub_frame)
        clients.extend(batch)
    deadline = time.monotonic() + 60
    while subscribed < subscribers and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    connect_s = time.monotonic() - began
    if subscribed < subscribers:
        raise RuntimeError(f"only {subscribed} of {subscribers} subscriptions went live")

    pool = await open_pool(database_url, max_size=2)
    store = PostgresEventStore(pool)
    nc = await nats_connect(system.stack.nats_url, "bench-fanout")
    try:
        loop = asyncio.get_running_loop()
        t_start = loop.time()
        for seq in range(events):
            await asyncio.sleep(max(0.0, t_start + seq / rate - loop.time()))
            event = rn.LogAppended(
                stage_id="gate", lines=(rn.LogLine("stdout", f"fanout {seq}"),), at=datetime.now(UTC)
            )
            sent_at[seq] = time.perf_counter()
            await store.append(
                f"runlog-{run_id}",
                [NewEvent(str(uuid.uuid4()), event, org=None, pipeline_id=pipeline_id, run_id=run_id)],
                None,
            )
            await nc.publish(APPENDED_SUBJECT, b"")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            len(received.get(s, ())) < subscribers for s in sent_at
        ):
            await asyncio.sleep(0.05)
    finally:
        for c in clients:
            c.close()
        await nc.close()
        await pool.close()
    every: list[float] = []
    each: list[float] = []
    missing = 0
    for seq, t0 in sent_at.items():
        times = received.get(seq, [])
        missing += max(0, subscribers - len(times))
        each.extend(t - t0 for t in times)
        if len(times) >= subscribers:
            every.append(max(times) - t0)
    with contextlib.suppress(Exception):
        await system.delete_pipeline(pipeline_id)
    out: dict[str, Any] = {
        "subscribers": subscribers,
        "events": events,
        "rate_per_s": rate,
        "to_every_subscriber": summary_ms(every),
        "per_delivery": summary_ms(each),
        "missing_deliveries": missing,
        "connect_s": round(connect_s, 2),
    }
    return out


# ---- 7. executor memory --------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux: VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def now_mb(self) -> float:
        return rss_bytes(self.pid) / 2**20

    async def __aenter__(self) -> RssSampler:
        async def loop() -> None:
            while True:
                with contextlib.suppress(OSError):
                    self.samples.append(rss_bytes(self.pid))
                await asyncio.sleep(self.interval)

        self._task = asyncio.create_task(loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def peak_mb(self) -> float | None:
        return round(max(self.samples) / 2**20, 1) if self.samples else None


async def _bounded(n: int, concurrency: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            return await make(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def memory_waiting(system: System, database_url: str, *, runs: int) -> dict[str, Any]:
    """Executor RSS with `runs` runs waiting for approval."""
    pid = system.stack.pid("executor")
    assert pid is not None
    sampler = RssSampler(pid)
    before = sampler.now_mb()
    pipeline_id = await system.create_pipeline(
        [
            {"id": "gate", "name": "gate", "type": "approval", "config": {"message": "bench"}},
            {"id": "after", "name": "after", "type": "script", "config": {"command": "true"}},
        ]
    )
    began = time.monotonic()
    async with sampler:
        await _bounded(runs, 16, lambda _: system.trigger(pipeline_id))
        pool = await open_pool(database_url, max_size=1)
        try:
            deadline = time.monotonic() + 60 + runs * 0.1
            waiting = 0
            while time.monotonic() < deadline:
                async with pool.connection() as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FROM rm_runs WHERE pipeline_id = %s AND status = 'waiting_approval'",
                        (pipeline_id,),
                    )
                    row = await cur.fetchone()
                    waiting = int(row[0]) if row else 0
                if waiting >= runs:
                    break
                await asyncio.sleep(0.2)
        finally:
            await pool.close()
        parked_s = time.monotonic() - began
        await asyncio.sleep(1.0)  # settle, then read it again
        after = sampler.now_mb()
    await system.delete_pipeline(pipeline_id)  # cancels the waiting runs
    return {
        "runs": runs,
        "waiting": waiting,
        "seconds_to_park": round(parked_s, 2),
        "rss_before_mb": round(before, 1),
        "rss_mb": round(after, 1),
        "rss_peak_mb": sampler.peak_mb,
    }


async def memory_output(system: System, database_url: str, *, megabytes: float) -> dict[str, Any]:
    """Executor RSS while one script prints `megabytes` MB (lines of 100 bytes)."""
    pid = system.stack.pid("executor")
    assert pid is not None
    line = "x" * 99
    total = int(megabytes * 1_000_000)
    pipeline_id = await system.create_pipeline(script_stages(f"yes {line} | head -c {total}"))
    sampler = RssSampler(pid)
    before = sampler.now_mb()
    began = time.monotonic()
    status = "?"
    async with sampler:
        run_id = await system.trigger(pipeline_id)
        pool = await open_pool(database_url, max_size=1)
        try:
            deadline = time.monotonic() + 60 + megabytes * 2
            while time.monotonic() < deadline:
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT status FROM rm_runs WHERE id = %s", (run_id,))
                    row = await cur.fetchone()
                    status = str(row[0]) if row else "?"
                if status in TERMINAL:
                    break
                await asyncio.sleep(0.2)
        finally:
            await pool.close()
    seconds = time.monotonic() - began
    await system.delete_pipeline(pipeline_id)
    return {
        "megabytes": megabytes,
        "status": status,
        "seconds": round(seconds, 2),
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": sampler.peak_mb,
    }
