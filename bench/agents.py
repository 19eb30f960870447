"""Issue 16: throughput grows with agents. I/O-bound runs (one `script` stage, `sleep 0.5`) handed to
agents (the stack's executors run with PIPELINES_RUN_ON_AGENTS=all), `in_flight` runs kept in flight
(closed loop, as the end-to-end workload), with 1, then 2, then 4 agents of `capacity` each.

Each agent is issued through the API (`POST /api/v1/agents`, an admin token of no organization: a
shared agent), made a user of the embedded NATS by the reconciler `make up`'s supervisor runs
(services/dev/broker_users.py), and run as its own process (`python -m services.agent`) with only
its credential file, as on another host. Agents are added between measurements (1, +1, +2), then
stopped and revoked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from bench import env, harness
from bench.stats import summary_ms
from bench.system import RunWatcher, System, script_stages
from infra.agent import protocol as p
from infra.broker.bus import connect as nats_connect
from services.dev.broker_users import IssuedUsers
from services.dev.nats import RunningNats

# The executors of this workload's stack hand every script unit to an agent (docs/scaling.md).
STACK_ENV = {"PIPELINES_RUN_ON_AGENTS": "all"}
STACK_SERVICES = ("api", "relay", "executor", "projector", "gateway")


@contextlib.contextmanager
def reconciler(nats: RunningNats, database_url: str) -> Iterator[None]:
    """What `make up`'s supervisor runs: the embedded server's users follow the issued agents."""
    stop = threading.Event()
    issued = IssuedUsers(database_url, every=1.0)

    def loop() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(Exception):
                issued.sync(nats)

    thread = threading.Thread(target=loop, name="bench-agent-users", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(15)
        issued.close()
        with contextlib.suppress(Exception):
            nats.set_issued_users(())


class AgentProcess:
    """One agent (`python -m services.agent`) with its credential file and nothing else of ours."""

    def __init__(self, creds: dict[str, Any], home: Path, servers: str) -> None:
        self.id = str(creds["id"])
        self.log = home / "agent.log"
        path = home / "agent.json"
        path.write_text(json.dumps(creds))
        path.chmod(0o600)
        agent_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(env.ROOT),
            "PIPELINES_AGENT_CREDS": str(path),
            "PIPELINES_AGENT_SERVERS": servers,
            "PIPELINES_AGENT_WORK_DIR": str(home / "work"),
            "PIPELINES_DATA_DIR": str(home / "data"),
        }
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.agent"], env=agent_env, cwd=env.ROOT, stdout=out, stderr=out
            )

    def output(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def _issue(system: System, capacity: int, name: str) -> dict[str, Any]:
    r = await system.http.post(
        f"{system.api}/agents",
        json={"labels": ["bench"], "capacity": capacity, "name": name},
        headers=system._h(admin=True),
    )
    if r.status_code != 201:
        raise RuntimeError(f"POST /agents answered {r.status_code}: {r.text[:200]}")
    return dict(r.json())


async def _revoke(system: System, agent_id: str) -> None:
    with contextlib.suppress(Exception):
        await system.http.delete(f"{system.api}/agents/{agent_id}", headers=system._h(admin=True))


async def _wait_present(nats_url: str, agents: list[AgentProcess], timeout: float = 60.0) -> None:
    """Until every agent said it is there (its presence, each second, as the executor hears it)."""
    nc = await nats_connect(nats_url, "bench-agents")
    heard: set[str] = set()
    try:
        sub = await nc.subscribe(f"{p.AGENTS}.*.presence")
        deadline = time.monotonic() + timeout
        wanted = {a.id for a in agents}
        while not wanted <= heard:
            for a in agents:
                if a.proc.poll() is not None:
                    raise RuntimeError(f"agent {a.id} exited {a.proc.returncode}: {a.output()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"agents {sorted(wanted - heard)} never said they were there")
            with contextlib.suppress(TimeoutError):
                msg = await sub.next_msg(timeout=min(1.0, left))
                heard.add(msg.subject.split(".")[3])
    finally:
        await nc.close()


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (and, for PostgreSQL, its backends) so far."""
    import psutil  # type: ignore[import-untyped]

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for each in (proc, *proc.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    t = each.cpu_times()
                    total += t.user + t.system
    return total


class CpuMeter:
    """Cores each part of the system used over a measurement: where the time goes when runs/s stops
    growing (None without psutil, which the `bench` extra brings)."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        self.parts = parts
        self.began = 0.0
        self.start: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self.began = time.monotonic()
        with contextlib.suppress(ImportError):
            self.start = {name: _cpu_seconds(pids) for name, pids in self.parts.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def cores(self) -> dict[str, float] | None:
        if not self.start:
            return None
        wall = max(time.monotonic() - self.began, 1e-6)
        return {name: round((_cpu_seconds(pids) - self.start[name]) / wall, 2) for name, pids in self.parts.items()}


class Tap:
    """Listens to the agents' protocol (the benchmark's admin connection sees every subject) to say
    where a slot's time goes: `handout` from a unit's `finished` to the next `assign` to that agent
    (the control plane's turnaround: units are always waiting), `accept` from `assign` to `accepted`,
    and `overhead`, a unit's `assign` to `finished` beyond its `sleep`."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep
        self.assigned: dict[str, float] = {}
        self.freed: dict[str, list[float]] = {}
        self.handout: list[float] = []
        self.accept: list[float] = []
        self.overhead: list[float] = []

    async def on_work(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            work = p.decode_work(msg.data)
            if isinstance(work, p.Assign):
                now = time.perf_counter()
                self.assigned[work.unit] = now
                freed = self.freed.get(msg.subject.split(".")[3])
                if freed:
                    self.handout.append(now - freed.pop(0))

    async def on_report(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            report = p.decode_report(msg.data)
            now = time.perf_counter()
            began = self.assigned.get(getattr(report, "unit", ""))
            if began is None:
                return
            if isinstance(report, p.Accepted):
                self.accept.append(now - began)
            elif isinstance(report, p.Finished):
                self.overhead.append(now - began - self.sleep)
                self.freed.setdefault(msg.subject.split(".")[3], []).append(now)

    def summary(self) -> dict[str, Any]:
        return {
            "handout": summary_ms(self.handout),
            "accept": summary_ms(self.accept),
            "unit_overhead": summary_ms(self.overhead),
        }


async def scaling(
    system: System,
    nats_url: str,
    *,
    others: dict[str, int] | None = None,
    counts: tuple[int, ...],
    capacity: int,
    in_flight: int,
    duration: float,
    ramp: float,
    sleep: float = 0.5,
) -> dict[str, Any]:
    """Runs per second with each number of agents in `counts` (ascending; agents are added), and
    the cores each process used meanwhile (`others`: more processes to watch, say the servers)."""
    pipeline_id = await system.create_pipeline(script_stages(f"sleep {sleep}"))
    watcher = RunWatcher(system, pipeline_id)
    await watcher.start()
    # Outside the bench's private (0700) directories: the agents run as root and hand each run's
    # scripts to an unprivileged uid (the sandbox), which must reach its working directory.
    hosts = Path(tempfile.mkdtemp(prefix="pipelines-bench-agents-"))
    hosts.chmod(0o755)
    servers = nats_url.split("@")[-1]
    servers = servers if servers.startswith("nats://") else f"nats://{servers}"
    running: list[AgentProcess] = []
    failures: list[str] = []
    out: dict[str, Any] = {"capacity": capacity, "in_flight": in_flight, "sleep_s": sleep, "by_agents": {}}

    async def unit() -> None:
        run_id = await system.trigger(pipeline_id)
        status, _ = await watcher.wait(run_id, timeout=120)
        if status != "succeeded":
            failures.append(status)
            raise RuntimeError(f"run {run_id} ended {status}")

    nc = None
    try:
        nc = await nats_connect(nats_url, "bench-agents-tap")
        for n in counts:
            while len(running) < n:
                creds = await _issue(system, capacity, f"bench-{len(running) + 1}")
                home = hosts / str(creds["id"])
                home.mkdir(mode=0o755)
                running.append(AgentProcess(creds, home, servers))
            await _wait_present(nats_url, running)
            # The executor reads the agents' records every 2 s (infra/agent/dispatch.py REFRESH) and
            # hands nothing to an agent it has not read yet; one run through makes sure it has.
            await asyncio.sleep(2.5)
            await asyncio.wait_for(unit(), 60)
            parts = {name: [pid] for name in STACK_SERVICES if (pid := system.stack.pid(name)) is not None}
            parts |= {name: [pid] for name, pid in (others or {}).items()}
            parts["agents"] = [a.proc.pid for a in running]
            tap = Tap(sleep)
            subs = [
                await nc.subscribe(f"{p.AGENTS}.*.work", cb=tap.on_work),
                await nc.subscribe(f"{p.AGENTS}.*.report.*", cb=tap.on_report),
            ]
            with CpuMeter(parts) as meter:
                thr = await harness.throughput(unit, in_flight, duration, ramp=ramp, timeout=120)
                thr["cores_used"] = meter.cores()
            for sub in subs:
                await sub.unsubscribe()
            thr["slot_ms"] = tap.summary()
            thr["load_avg"] = [round(x, 2) for x in os.getloadavg()]
            # The ceiling the agents allow: every slot busy with `sleep` all the time.
            thr["agent_ceiling_per_s"] = round(n * capacity / sleep, 2)
            out["by_agents"][str(n)] = thr
    finally:
        for agent in running:
            agent.stop()
        for agent in running:
            await _revoke(system, agent.id)
        await watcher.close()
        if nc is not None:
            await nc.close()
        with contextlib.suppress(Exception):
            await system.delete_pipeline(pipeline_id)
        shutil.rmtree(hosts, ignore_errors=True)
    out["failed_runs"] = len(failures)
    return out
