"""The cluster profile (`make up-cluster`, services/dev/cluster.py): a 3-node nats-server cluster on
loopback with the events stream replicated 3 ways, two APIs, two gateways, a relay and a projector each
with a standby, two executors and two agents with labels of their own.

- every process comes up, each NATS node is printed without credentials, and a job routed by an agent's
  own label runs on it;
- runs of I/O-bound steps go on while one NATS node (the events stream's leader), the relay leader, the
  projector leader and one agent are killed with SIGKILL (each started again by the supervisor);
  afterwards every run is terminal, no step ran twice at once nor finished twice (their histories),
  the store equals the JetStream stream one-to-one in order, and the read models equal a rebuild.

`make test` runs 12 runs; `make soak` 100 (marked soak). The takeover times are printed (docs/scaling.md
quotes them). The services' output is in `<tmp_path>/stack.log` (echoed with PIPELINES_FAULT_ECHO=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from infra.broker import bus
from infra.broker.permissions import ADMIN
from infra.broker.relay import RELAY_LOCK
from infra.config import Settings
from infra.projector.consumer import PROJECTOR_LOCK, Projector
from infra.store.migrate import open_pool
from infra.store.postgres import PostgresEventStore
from services.dev.cluster import CLUSTER_NATS_NODES, cluster_stack
from services.dev.endpoints import CLUSTER_SERVICES
from services.dev.ports import free_port
from tests import servers
from tests.fault.conftest import FAULT_ENV, JWT_SECRET, FaultStack, _Log, tmp_path_for_scripts
from tests.fault.history import TERMINAL, describe, fold_history
from tests.fault.test_fault import Client, _diff_rows, _read_model_rows, check_jetstream, projector_caught_up

pytestmark = pytest.mark.e2e

RETRY = {"maxAttempts": 3, "backoff": 0.1}


@pytest.fixture
def cluster(database_url: str, tmp_path: Path) -> Iterator[FaultStack]:
    log = _Log(tmp_path / "stack.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")} | {
        "PIPELINES_JWT_SECRET": JWT_SECRET,
        "PIPELINES_EVENTS_STREAM": f"CLUSTER_{uuid.uuid4().hex[:10]}",
        "PIPELINES_LOCAL_AGENT_CAPACITY": "3",
        **FAULT_ENV,
    }
    effects_dir = Path(tmp_path_for_scripts())
    with servers.fresh_database(database_url, prefix="pipelines_cluster") as db_url:
        # The session's PostgreSQL (one primary, as in production); the NATS cluster is the profile's own.
        stack = cluster_stack(
            env,
            database_url=db_url,
            data_dir=tmp_path / "data",
            api_port=free_port(),
            gateway_port=free_port(),
            output=log,
            backoff=0.1,
            max_backoff=1.0,
            stable_after=3.0,
        )
        try:
            stack.start()
            assert stack.nats is not None
            fs = FaultStack(
                stack=stack,
                nats=stack.nats,
                nats_dir=stack.nats.data_dir,
                database_url=db_url,
                settings=Settings.from_env(stack.child_env | {"PIPELINES_DATABASE_URL": db_url}),
                api=stack.api_url,
                log=log,
                effects_dir=effects_dir,
            )
            assert stack.wait_listening(90), log.tail()
            fs.ready(90)
            yield fs
        finally:
            stack.stop()
            log.close()
            with contextlib.suppress(OSError):
                effects_dir.rmdir()
            print(f"\ncluster: services' output in {log.path}")


# ---- helpers --------------------------------------------------------------------------------


async def _wait(check: Any, timeout: float, what: str, log: _Log) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s:\n{log.tail()}")
        await asyncio.sleep(0.1)


def _lock_holder(database_url: str, key: int) -> int | None:
    """The client port of the connection that holds advisory lock `key` in this database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
            (key,),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds (from /proc: Linux)."""
    out = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    out.add(target[8:-1])
    return out


def _holds_local_port(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP socket whose local port is `port` (/proc/net/tcp, tcp6)."""
    inodes = _socket_inodes(pid)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    return True
    return False


def _has_children(pid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                return True
    return False


def _leader(fs: FaultStack, service: str, key: int) -> tuple[str, int] | None:
    """Which process of `service` (`relay` or `relay-2`, ...) holds its leadership lock, and the lock's
    connection port: the process with a TCP connection from that port to PostgreSQL."""
    port = _lock_holder(fs.database_url, key)
    if port is None:
        return None
    for name in (service, f"{service}-2"):
        pid = fs.stack.pid(name)
        if pid is not None and _holds_local_port(pid, port):
            return name, port
    return None


async def _takeover(fs: FaultStack, service: str, key: int) -> tuple[str, float]:
    """kill -9 the leader of `service`; the seconds until the other process holds the lock."""
    leader = await _wait(lambda: asyncio.to_thread(_leader, fs, service, key), 30, f"no {service} leader", fs.log)
    name, port = leader
    began = time.monotonic()
    fs.stack.send_signal(name, signal.SIGKILL)

    async def moved() -> Any:
        now = await asyncio.to_thread(_leader, fs, service, key)
        return now if now is not None and now[1] != port else None

    await _wait(moved, 30, f"no {service} took over from {name}", fs.log)
    return name, time.monotonic() - began


async def _stream_leader(fs: FaultStack) -> str:
    nc = await bus.connect(fs.stack.nats_url, "cluster-check", fs.stack.nats_nodes[0].credentials[ADMIN])
    try:
        info = await nc.jetstream().stream_info(fs.settings.events_stream)
        assert info.cluster is not None and info.cluster.leader, info
        return str(info.cluster.leader)
    finally:
        await nc.close()


async def _kill_nats_node(fs: FaultStack) -> tuple[str, float, float]:
    """kill -9 the node that leads the events stream; the seconds until the supervisor has the node back,
    and until the stream answers with a leader again (another node, or the restarted one)."""
    leader = await _stream_leader(fs)
    node = next(n for n in fs.stack.nats_nodes if n.options.get("server_name") == leader)
    old_pid = node.pid
    began = time.monotonic()
    node.process.send_signal(signal.SIGKILL)
    back: float | None = None
    elected: float | None = None
    deadline = began + 60
    while back is None or elected is None:
        assert time.monotonic() < deadline, f"{leader}: back after {back}s, stream leader after {elected}s"
        if back is None and any(
            n.options.get("server_name") == leader and n.pid != old_pid and n.alive() for n in fs.stack.nats_nodes
        ):
            back = time.monotonic() - began
        if elected is None:
            now = None
            with contextlib.suppress(Exception):
                now = await asyncio.wait_for(_stream_leader(fs), 2)
            if now is not None and (now != leader or back is not None):
                elected = time.monotonic() - began
        await asyncio.sleep(0.05)
    return leader, elected, back


def _busy_agent(fs: FaultStack) -> str | None:
    """An agent process with scripts running under it (its units), if any."""
    for name in ("agent", "agent-2"):
        pid = fs.stack.pid(name)
        if pid is not None and _has_children(pid):
            return name
    return None


def _spec(runs_on: list[str] | None = None) -> dict[str, Any]:
    """Two jobs of I/O-bound steps (`sleep 0.2`) in parallel, retried when their agent is lost."""
    steps = [{"name": f"s{i}", "run": f"sleep 0.2; echo step {i}"} for i in range(1, 4)]
    job_b: dict[str, Any] = {"name": "b", "retry": RETRY, "steps": steps}
    if runs_on:
        job_b["runsOn"] = runs_on
    return {"stages": [{"id": "work", "jobs": [{"name": "a", "retry": RETRY, "steps": steps}, job_b]}]}


async def _pipeline(client: Client, spec: dict[str, Any]) -> str:
    r = await client.request("POST", "/api/v1/pipelines", json_body={"name": f"c-{uuid.uuid4().hex[:6]}", "stages": []})
    assert r.status_code == 201, r.text
    pid = str(r.json()["id"])
    r = await client.request("POST", f"/api/v1/pipelines/{pid}/spec/save", json_body={"spec": spec, "format": "json"})
    assert r.status_code == 200, r.text
    return pid


async def _trigger(client: Client, pid: str, index: int) -> str:
    r = await client.request("POST", f"/api/v1/pipelines/{pid}/trigger", json_body={}, key=f"cluster-{index}")
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# ---- the tests ------------------------------------------------------------------------------


async def test_cluster_profile_starts_every_process_and_runs_a_job_on_the_agent_its_labels_name(
    cluster: FaultStack,
) -> None:
    stack = cluster.stack
    assert stack.wait_running(30), cluster.log.tail()
    assert set(stack.pids()) == set(CLUSTER_SERVICES)
    assert len(stack.nats_nodes) == CLUSTER_NATS_NODES and all(n.alive() for n in stack.nats_nodes)
    banner = "\n".join(stack.banner())
    for node in stack.nats_nodes:
        assert f"nats://127.0.0.1:{node.port}" in banner
    assert "@" not in banner.split("NATS", 1)[1].split("Dashboard", 1)[0]  # no credentials printed
    second_api = f"http://127.0.0.1:{stack.instance_ports['api-2']}"
    assert second_api in banner and f"ws://127.0.0.1:{stack.instance_ports['gateway-2']}" in banner

    async with httpx.AsyncClient(base_url=cluster.api, timeout=30) as http:
        client = Client(http, cluster.headers("admin"))

        async def both_agents() -> Any:
            agents = await client.get("/api/v1/agents")
            return agents if len(agents) == 2 else None

        agents = await _wait(both_agents, 60, "the two agents were not listed", cluster.log)
        labels = {a["id"]: set(a["labels"]) for a in agents}
        assert labels["ag_local"] - labels["ag_local_2"] == {"agent-1"}, labels
        assert labels["ag_local_2"] - labels["ag_local"] == {"agent-2"}, labels

        job = {"name": "where", "runsOn": ["agent-2"], "steps": [{"name": "pwd", "run": "echo on $PWD"}]}
        pid = await _pipeline(client, {"stages": [{"id": "s", "jobs": [job]}]})
        run_id = await _trigger(client, pid, 0)
        # Read through the second API: the same store behind both.
        async with httpx.AsyncClient(base_url=second_api, timeout=30) as http2:
            other = Client(http2, cluster.headers("admin"))

            async def ended() -> Any:
                run = await other.get(f"/api/v1/pipelines/{pid}/runs/{run_id}")
                return run if run["status"] in TERMINAL else None

            run = await _wait(ended, 90, "the run did not end", cluster.log)
        assert run["status"] == "succeeded", run["logs"][-2000:]
        assert f"on {stack.data_dir / 'agents' / 'ag_local_2'}" in run["logs"], run["logs"][-2000:]

    nc = await bus.connect(stack.nats_url, "cluster-check", stack.nats_nodes[0].credentials[ADMIN])
    try:
        info = await nc.jetstream().stream_info(cluster.settings.events_stream)
    finally:
        await nc.close()
    assert info.config.num_replicas == CLUSTER_NATS_NODES
    assert info.cluster is not None and len(info.cluster.replicas or []) == CLUSTER_NATS_NODES - 1


async def scenario(cluster: FaultStack, runs: int, settle: float) -> list[str]:
    problems: list[str] = []
    timings: dict[str, float] = {}
    began = time.monotonic()
    async with httpx.AsyncClient(base_url=cluster.api, timeout=40) as http:
        client = Client(http, cluster.headers("admin"))
        pid = await _pipeline(client, _spec(runs_on=["local"]))
        run_ids: list[str] = []
        # A third of the runs before the faults, the rest between them: runs are in flight at every kill.
        batches = [runs // 3, runs // 3, runs - 2 * (runs // 3)]

        async def submit(n: int) -> None:
            for _ in range(n):
                run_ids.append(await _trigger(client, pid, len(run_ids)))

        await submit(batches[0])
        await asyncio.sleep(1.0)
        node, elected, node_back = await _kill_nats_node(cluster)
        timings[f"NATS node {node} kill -9 -> restarted by the supervisor"] = node_back
        timings[f"NATS node {node} kill -9 -> the events stream has a leader again"] = elected
        await submit(batches[1])
        name, seconds = await _takeover(cluster, "relay", RELAY_LOCK)
        timings[f"relay leader ({name}) kill -9 -> standby holds the lock"] = seconds
        name, seconds = await _takeover(cluster, "projector", PROJECTOR_LOCK)
        timings[f"projector leader ({name}) kill -9 -> standby holds the lock"] = seconds
        await submit(batches[2])
        # The agent killed is one running units (their leases expire; each job's retry decides).
        busy = await _wait(lambda: asyncio.to_thread(_busy_agent, cluster), 30, "no agent ran a unit", cluster.log)
        cluster.stack.send_signal(busy, signal.SIGKILL)
        timings[f"{busy} killed at"] = time.monotonic() - began
        timings["chaos"] = time.monotonic() - began

        settle_began = time.monotonic()
        pending: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + settle
        while True:
            pending = {}
            for run_id in run_ids:
                run = await client.get(f"/api/v1/pipelines/{pid}/runs/{run_id}")
                if run["status"] not in TERMINAL:
                    pending[run_id] = run
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        timings["settle"] = time.monotonic() - settle_began
        for run_id, stuck in pending.items():
            problems.append(f"run {run_id} still {stuck['status']} after {settle:.0f}s: {stuck['logs'][-500:]}")

        statuses: Counter[str] = Counter()
        lost = 0
        for run_id in run_ids:
            run = await client.get(f"/api/v1/pipelines/{pid}/runs/{run_id}")
            history = fold_history(run_id, await client.get(f"/api/v1/pipelines/{pid}/runs/{run_id}/events"))
            statuses[run["status"]] += 1
            problems += [f"run {run_id}: {p}" for p in history.problems]
            if history.view() != run:
                problems.append(f"run {run_id}: the API's run differs from its folded history: {describe(history)}")
            lost += sum(
                1
                for s in run["stageResults"]
                for j in s.get("jobs") or []
                for st in j["steps"]
                for a in st["attempts"]
                if a["status"] != "succeeded"
            )

    pool = await open_pool(cluster.database_url, max_size=4)
    store = PostgresEventStore(pool)
    try:
        problems += await check_jetstream(cluster, store, timeout=30)
        if not await projector_caught_up(store, cluster, timeout=30):
            problems.append("the projector did not catch up with the store within 30s")
        live = await _read_model_rows(store)
        await asyncio.to_thread(cluster.stack.stop)  # nothing may write while the rebuild runs
        await Projector(store, cluster.database_url).rebuild()
        problems += _diff_rows(live, await _read_model_rows(store))
    finally:
        await pool.close()
    print(
        f"\ncluster, {runs} runs: {dict(statuses)}; step attempts that failed and were retried: {lost}\n  "
        + "\n  ".join(f"{k}: {v:.2f}s" for k, v in timings.items())
    )
    return problems


def _report(problems: list[str], cluster: FaultStack) -> str:
    more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
    return "\n".join(problems[:40]) + more + f"\n\nservices' output: {cluster.log.path}\n{cluster.log.tail(3000)}"


@pytest.mark.timeout(300)
async def test_runs_survive_losing_a_nats_node_the_relay_and_projector_leaders_and_an_agent(
    cluster: FaultStack,
) -> None:
    problems = await scenario(cluster, runs=12, settle=90)
    assert not problems, _report(problems, cluster)


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_a_hundred_runs_survive_losing_a_nats_node_the_leaders_and_an_agent(cluster: FaultStack) -> None:
    problems = await scenario(cluster, runs=100, settle=300)
    assert not problems, _report(problems, cluster)
