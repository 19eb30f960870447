"""Agents run the steps the executor hands them, on real PostgreSQL and the embedded NATS: each agent
is a separate process (`python -m services.agent`) with only the broker's address and its own
credentials (POST /api/v1/agents), whose broker user the supervisor's reconciler
(services/dev/broker_users.py) adds and removes as `make up` does."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from infra.agent import protocol as p
from infra.metrics import REGISTRY
from services.dev.broker_users import IssuedUsers
from services.dev.nats import RunningNats
from tests import servers
from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def embedded(nats_url: str) -> RunningNats:
    server = servers.embedded_nats(nats_url)
    if server is None:
        pytest.skip("needs the embedded NATS, whose users we configure; PIPELINES_TEST_NATS_URL names another server")
    return server


@pytest.fixture(scope="module")
def reconciler(embedded: RunningNats, system: System) -> Iterator[None]:
    """What `make up`'s supervisor runs: the embedded server's users follow the issued agents."""
    stop = threading.Event()
    issued = IssuedUsers(system.settings.database_url)

    def loop() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(Exception):
                issued.sync(embedded)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)
    issued.close()
    embedded.set_issued_users(())


@pytest.fixture(scope="module")
def hosts() -> Iterator[Path]:
    """The agents' directories: outside pytest's private temporary directories, so that scripts
    running as the unprivileged script user (the tests run as root) can reach their working dirs."""
    root = Path(tempfile.mkdtemp(prefix="pipelines-test-agents-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class AgentProcess:
    def __init__(self, creds: dict[str, Any], home: Path) -> None:
        self.creds = creds
        self.home = home
        self.log = home / "agent.log"
        path = home / "agent.json"
        path.write_text(json.dumps(creds))
        path.chmod(0o600)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PIPELINES_AGENT_CREDS": str(path),
            "PIPELINES_AGENT_WORK_DIR": str(home / "work"),
            "PIPELINES_DATA_DIR": str(home / "data"),
            "PIPELINES_LEASE_TTL": "1",
            "PIPELINES_KILL_GRACE": "0.5",
        }
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.agent"], env=self.env, cwd=ROOT, stdout=out, stderr=out
            )

    @property
    def id(self) -> str:
        return str(self.creds["id"])

    def environ(self) -> dict[str, str]:
        raw = Path(f"/proc/{self.proc.pid}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Agents:
    """Issues agents through the API and runs them; revokes and stops them all at the end."""

    def __init__(self, system: System, hosts: Path) -> None:
        self.system = system
        self.hosts = hosts
        self.running: list[AgentProcess] = []

    async def issue(self, labels: list[str], capacity: int = 1, org: str | bool | None = True) -> dict[str, Any]:
        r = await self.system.client.post(
            "/api/v1/agents", json={"labels": labels, "capacity": capacity}, headers=self.system.headers(org=org)
        )
        assert r.status_code == 201, r.text
        creds: dict[str, Any] = r.json()
        return creds

    async def start(self, labels: list[str], capacity: int = 1, org: str | bool | None = True) -> AgentProcess:
        creds = await self.issue(labels, capacity, org)
        home = self.hosts / f"{creds['id']}"
        home.mkdir(mode=0o755)
        agent = AgentProcess(creds, home)
        self.running.append(agent)
        # Known to the executor once its user exists and it said it is there.
        view = self.system.executor.agents

        async def present() -> bool:
            assert view is not None
            await view.refresh()
            known = view.agents.get(agent.id)
            return known is not None and known.seen > 0 and agent.proc.poll() is None

        await eventually(present, timeout=30, what=f"agent {agent.id} to be there: {agent.output()}")
        return agent

    async def close(self) -> None:
        for agent in self.running:
            agent.stop()
            await self.system.client.delete(f"/api/v1/agents/{agent.id}", headers=self.system.headers())


@pytest.fixture
async def agents(system: System, reconciler: None, hosts: Path) -> AsyncIterator[Agents]:
    out = Agents(system, hosts)
    try:
        yield out
    finally:
        await out.close()


async def save(system: System, spec: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    headers = headers or system.headers("member")
    r = await system.client.post(
        "/api/v1/pipelines", json={"name": f"agents-{uuid.uuid4().hex[:8]}", "stages": []}, headers=headers
    )
    assert r.status_code == 201, r.text
    pid: str = r.json()["id"]
    r = await system.client.post(f"/api/v1/pipelines/{pid}/spec/save", json={"spec": spec}, headers=headers)
    assert r.status_code == 200, r.text
    return pid


def one_step(run: str, runs_on: list[str], **job: Any) -> dict[str, Any]:
    return {"jobs": [{"name": "build", "runsOn": runs_on, "steps": [{"name": "go", "run": run}], **job}]}


def step_of(run: dict[str, Any]) -> dict[str, Any]:
    step: dict[str, Any] = run["stageResults"][0]["jobs"][0]["steps"][0]
    return step


async def test_an_agent_runs_the_steps_of_a_run_without_any_database_credentials(
    system: System, agents: Agents
) -> None:
    agent = await agents.start(["linux"])
    env = agent.environ()
    assert not [k for k in env if "DATABASE" in k], env
    assert not [v for v in env.values() if "postgres" in v.lower()], env
    spec = one_step('echo "hello from $PWD"; echo "token $TOKEN"; echo "var $GREETING"; echo "uid $(id -u)"', ["linux"])
    spec["variables"] = {"GREETING": "hi"}
    pid = await save(system, spec)
    run = await system.trigger(pid, secrets={"TOKEN": "s3cr3t-agent-value"})
    done = await system.wait_status(pid, run["id"], "succeeded", "failed", timeout=60)
    assert done["status"] == "succeeded", (done["logs"], agent.output())
    output = step_of(done)["output"]
    assert f"hello from {agent.home / 'work'}" in output
    assert "var hi" in output
    if os.geteuid() == 0:  # as root, the agent gives each run a uid of its own, as an executor does
        uid = int(output.split("uid ", 1)[1].split()[0])
        assert 200_000 <= uid <= 299_999, output
    # The secret reached the agent's script; the stored log has it masked.
    assert "token ***" in output and "s3cr3t-agent-value" not in done["logs"]


async def test_a_job_goes_only_to_an_agent_with_all_its_labels(system: System, agents: Agents) -> None:
    plain = await agents.start(["linux"])
    arm = await agents.start(["arm64", "linux"])
    pid = await save(system, one_step('echo "on $PWD"', ["linux", "arm64"]))
    for _ in range(3):
        run = await system.trigger(pid)
        done = await system.wait_status(pid, run["id"], "succeeded", "failed", timeout=60)
        assert done["status"] == "succeeded", done["logs"]
        assert str(arm.home) in step_of(done)["output"]
        assert str(plain.home) not in step_of(done)["output"]


async def test_the_steps_of_a_job_run_on_one_agent_in_one_working_directory(system: System, agents: Agents) -> None:
    await agents.start(["pair"])
    await agents.start(["pair"])
    spec = {
        "jobs": [
            {
                "name": "build",
                "runsOn": ["pair"],
                "steps": [
                    {"name": "make", "run": 'echo "$PWD" > built-here'},
                    {"name": "check", "run": 'test "$(cat built-here)" = "$PWD" && echo same place'},
                ],
            },
            {"name": "other", "runsOn": ["pair"], "steps": [{"name": "x", "run": "sleep 0.2"}]},
        ]
    }
    pid = await save(system, spec)
    for _ in range(3):
        run = await system.trigger(pid)
        done = await system.wait_status(pid, run["id"], "succeeded", "failed", timeout=60)
        assert done["status"] == "succeeded", done["logs"]
        assert "same place" in done["stageResults"][0]["jobs"][0]["steps"][1]["output"]


async def test_a_unit_no_agent_can_take_waits_queued_with_the_reason(system: System, agents: Agents) -> None:
    await agents.start(["linux"])
    pid = await save(system, one_step("echo never", ["linux", "gpu"]))
    run = await system.trigger(pid)
    waiting = await system.wait_run(
        pid, run["id"], lambda r: "waiting for an agent with gpu, linux" in r["logs"], timeout=30
    )
    waiting = await system.wait_run(pid, run["id"], lambda r: step_of(r)["status"] == "queued", timeout=30)
    assert waiting["status"] == "running"
    assert step_of(waiting)["waitingFor"] == "waiting for an agent with gpu, linux"
    r = await system.client.post(
        f"/api/v1/pipelines/{pid}/runs/{run['id']}/stop", json={"reason": "no gpu"}, headers=system.headers()
    )
    assert r.status_code in (200, 202), r.text
    stopped = await system.wait_status(pid, run["id"], "cancelled", "failed", timeout=30)
    assert stopped["status"] == "cancelled", stopped


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("pipelines_agent_reports_refused_total", {"reason": reason}) or 0.0


async def test_an_agent_cannot_report_on_a_unit_it_was_not_given_nor_on_a_stale_attempt(
    system: System, agents: Agents
) -> None:
    runner = await agents.start(["forge"])
    other = await agents.start(["forge-other"])
    assigned: list[p.Assign] = []

    async def seen(msg: Msg) -> None:
        work = p.decode_work(msg.data)
        if isinstance(work, p.Assign):
            assigned.append(work)

    sub = await system.nc.subscribe(p.work_subject(runner.id), cb=seen)
    marker = runner.home / "release"
    pid = await save(system, one_step(f"while [ ! -f {marker} ]; do sleep 0.05; done; echo real outcome", ["forge"]))
    run = await system.trigger(pid)
    try:
        await eventually(lambda: _true(bool(assigned)), timeout=30, what="the unit to be handed to the agent")
        unit = assigned[0]
        executor = unit.executor
        before_other, before_stale = refused("not its unit"), refused("stale attempt")
        # The other agent, with its own credentials, reports the unit as failed: refused.
        forger = await nats.connect(other.creds["servers"], user=other.creds["user"], password=other.creds["password"])
        forged = p.Finished(unit=unit.unit, attempt=unit.attempt, exit_code=1, error="forged")
        await forger.publish(p.report_subject(other.id, executor), p.encode(forged))
        await forger.flush()
        # It cannot speak as the runner: the broker does not let it publish there.
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        spoofer = await nats.connect(
            other.creds["servers"], user=other.creds["user"], password=other.creds["password"], error_cb=on_error
        )
        await spoofer.publish(p.report_subject(runner.id, executor), p.encode(forged))
        await spoofer.flush()
        await eventually(lambda: _true(any("permissions violation" in e.lower() for e in errors)), timeout=10)
        # The runner's own credentials, on another attempt: refused too.
        as_runner = await nats.connect(
            runner.creds["servers"], user=runner.creds["user"], password=runner.creds["password"]
        )
        stale = p.Finished(unit=unit.unit, attempt=unit.attempt + 1, exit_code=1, error="stale")
        await as_runner.publish(p.report_subject(runner.id, executor), p.encode(stale))
        await as_runner.flush()
        await eventually(lambda: _true(refused("not its unit") > before_other), what="the forged report refused")
        await eventually(lambda: _true(refused("stale attempt") > before_stale), what="the stale report refused")
        for c in (forger, spoofer, as_runner):
            await c.close()
        still = await system.get_run(pid, run["id"])
        assert step_of(still)["status"] == "running", still
        marker.touch()
        done = await system.wait_status(pid, run["id"], "succeeded", "failed", timeout=60)
        assert done["status"] == "succeeded", done["logs"]
        assert "real outcome" in step_of(done)["output"]
    finally:
        await sub.unsubscribe()


async def _true(value: bool) -> bool:
    return value


async def test_a_killed_agents_unit_is_retried_by_its_policy_on_another_agent(system: System, agents: Agents) -> None:
    first = await agents.start(["retry"])
    # On the first agent the step outlives the agent; anywhere else it succeeds at once.
    script = f'case "$PWD" in {first.home}*) echo first; sleep 8;; *) echo elsewhere;; esac'
    pid = await save(system, one_step(script, ["retry"], retry={"maxAttempts": 2, "backoff": 0}))
    run = await system.trigger(pid)
    await system.wait_run(pid, run["id"], lambda r: "first" in step_of(r)["output"], timeout=30)
    first.stop(signal.SIGKILL)
    await agents.start(["retry"])
    done = await system.wait_status(pid, run["id"], "succeeded", "failed", timeout=60)
    assert done["status"] == "succeeded", done["logs"]
    step = step_of(done)
    assert step["attempt"] == 2
    assert step["attempts"][0]["status"] == "failed"
    assert "agent lost" in step["attempts"][0]["error"]
    assert "elsewhere" in step["output"]


async def test_an_organizations_agent_runs_none_of_another_organizations_units(system: System, agents: Agents) -> None:
    mine = await agents.start(["private"])
    other = f"org-{uuid.uuid4().hex[:8]}"
    theirs = system.headers("admin", org=other)
    r = await system.client.get("/api/v1/agents", headers=theirs)
    assert mine.id not in [a["id"] for a in r.json()]
    r = await system.client.delete(f"/api/v1/agents/{mine.id}", headers=theirs)
    assert r.status_code == 404
    pid = await save(system, one_step("echo ran", ["private"]), headers=system.headers("member", org=other))
    r = await system.client.post(f"/api/v1/pipelines/{pid}/trigger", headers=theirs)
    run = r.json()["id"]

    async def waiting() -> bool:
        got = await system.client.get(f"/api/v1/pipelines/{pid}/runs/{run}", headers=theirs)
        return step_of(got.json())["waitingFor"] == "waiting for an agent with private"

    await eventually(waiting, timeout=30, what="the other organization's unit to wait")
    r = await system.client.post(f"/api/v1/pipelines/{pid}/runs/{run}/cancel", json={}, headers=theirs)
    assert r.status_code == 200, r.text


async def test_an_agent_kills_a_unit_whose_executor_stops_renewing_it(system: System, agents: Agents) -> None:
    """A unit handed over by an executor that then goes silent (it died: its lease is recovered and the
    attempt retried elsewhere) is an orphan: the agent kills it after a lease's time."""
    agent = await agents.start(["orphan"])
    ghost = f"ghost{uuid.uuid4().hex[:8]}"  # an executor nobody runs: no renewal is ever answered
    reports: list[p.Report] = []

    async def heard(msg: Msg) -> None:
        reports.append(p.decode_report(msg.data))

    sub = await system.nc.subscribe(p.report_subject(agent.id, ghost), cb=heard)
    marker = agent.home / "survived"
    assign = p.Assign(
        unit="u-orphan",
        executor=ghost,
        run_id=str(uuid.uuid4()),
        org=system.org,
        key="s",
        attempt=1,
        command=f"echo started; sleep 20; touch {marker}",
        env={},
        timeout=60,
        kill_grace=0.5,
    )
    try:
        await system.nc.publish(p.work_subject(agent.id), p.encode(assign))

        async def killed() -> bool:
            return any(isinstance(r, p.Finished) for r in reports)

        await eventually(killed, timeout=15, what=f"the orphan to be killed: {agent.output()}")
        (finished,) = [r for r in reports if isinstance(r, p.Finished)]
        assert finished.killed and finished.exit_code != 0, finished
        assert any(isinstance(r, p.Accepted) for r in reports)
        assert any(isinstance(r, p.Renew) and r.units == ["u-orphan"] for r in reports)
        assert "lease lost" in agent.output()
        assert not marker.exists()
    finally:
        await sub.unsubscribe()


async def test_a_stopped_agents_unit_fails_and_is_retried_not_cancelled(system: System, agents: Agents) -> None:
    first = await agents.start(["drain"])
    script = f'case "$PWD" in {first.home}*) echo first; sleep 20;; *) echo elsewhere;; esac'
    pid = await save(system, one_step(script, ["drain"], retry={"maxAttempts": 2, "backoff": 0}))
    run = await system.trigger(pid)
    await system.wait_run(pid, run["id"], lambda r: "first" in step_of(r)["output"], timeout=30)
    first.stop(signal.SIGTERM)
    assert first.proc.returncode == 0, first.output()
    await agents.start(["drain"])
    done = await system.wait_status(pid, run["id"], "succeeded", "failed", timeout=60)
    assert done["status"] == "succeeded", done["logs"]
    step = step_of(done)
    assert step["attempts"][0]["status"] == "failed"
    # The agent's own report says it stopped; on a loaded machine the executor may first find it
    # silent past its lease (the same outcome: failed, then retried by the policy).
    error = step["attempts"][0]["error"]
    assert "the agent stopped while this was running" in error or "stopped answering" in error, error


async def test_an_agent_whose_credentials_are_revoked_is_disconnected(system: System, agents: Agents) -> None:
    agent = await agents.start(["revoked"])
    r = await system.client.get("/api/v1/agents", headers=system.headers())
    assert agent.id in [a["id"] for a in r.json()]
    r = await system.client.delete(f"/api/v1/agents/{agent.id}", headers=system.headers())
    assert r.status_code == 204, r.text
    await eventually(lambda: _true(agent.proc.poll() is not None), timeout=30, what="the agent to be disconnected")
    assert "refused this agent's credentials" in agent.output()
    r = await system.client.get("/api/v1/agents", headers=system.headers())
    assert agent.id not in [a["id"] for a in r.json()]


async def test_bad_agent_requests_and_runs_on_values_get_a_clear_400(system: System) -> None:
    r = await system.client.post(
        "/api/v1/agents", json={"labels": ["no spaces"], "capacity": 0, "x": 1}, headers=system.headers()
    )
    assert r.status_code == 400, r.text
    assert all(word in r.text for word in ("labels[0]", "capacity", "x"))
    r = await system.client.post("/api/v1/agents", json={"labels": ["linux"]}, headers=system.headers("member"))
    assert r.status_code == 403
    r = await system.client.post(
        "/api/v1/pipelines/x/spec/validate",
        json={"spec": {"jobs": [{"name": "b", "runsOn": "", "steps": [{"run": "true"}]}]}},
        headers=system.headers(),
    )
    assert r.status_code in (200, 400, 404), r.text
    r = await system.client.post(
        "/api/v1/pipelines",
        json={
            "name": f"bad-{uuid.uuid4().hex[:6]}",
            "stages": [{"type": "script", "config": {"command": "x"}, "runsOn": [1]}],
        },
        headers=system.headers("member"),
    )
    assert r.status_code == 400, r.text
    assert "runsOn[0]" in r.text


async def test_one_organizations_burst_does_not_starve_anothers_run(system: System, agents: Agents) -> None:
    view = system.executor.agents
    assert view is not None
    # One shared agent (issued with no organization) with one slot: every unit waits its turn.
    await agents.start(["fair"], capacity=1, org=False)
    other = f"org-{uuid.uuid4().hex[:8]}"
    spec = one_step("sleep 0.05", ["fair"])
    burst_pipeline = await save(system, spec)
    other_pipeline = await save(system, spec, headers=system.headers("member", org=other))
    burst = [await system.trigger(burst_pipeline) for _ in range(50)]

    async def queued() -> bool:
        return view.waiting() >= 40

    await eventually(queued, timeout=60, what="the burst to be waiting for the agent")
    r = await system.client.post(
        f"/api/v1/pipelines/{other_pipeline}/trigger", headers=system.headers("member", org=other)
    )
    assert r.status_code == 201, r.text
    lone = r.json()["id"]

    async def lone_handed() -> bool:
        return any(h.run_id == lone for h in view.handed)

    await eventually(lone_handed, timeout=60, what="the other organization's run to be handed out")
    handed = list(view.handed)
    (mine,) = [h for h in handed if h.run_id == lone]
    # Round robin: while it waited, at most one unit of the burst went first (the one whose turn it
    # was), although dozens of the burst's were queued before it.
    assert mine.ahead <= 1, mine
    assert sum(1 for h in handed if h.org == system.org and h.run_id in {r["id"] for r in burst}) < 50
    for run in burst:
        await system.wait_status(burst_pipeline, run["id"], "succeeded", timeout=120)
