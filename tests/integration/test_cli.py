"""The `pipelines` command line as a user runs it: a subprocess against a live API and gateway on
loopback ports (the relay, projector and executor run in this test's event loop)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from infra.broker import bus
from infra.gateway.server import Gateway
from tests.integration.served import relay_backlog, served_api
from tests.integration.system import System, make_settings, running_system

pytestmark = pytest.mark.integration

WAIT = 60.0
RUN = re.compile(r"\brun ([0-9a-f]{8}-[0-9a-f-]{27})\b")


@dataclass
class Live:
    system: System
    api_url: str
    home: Path

    def env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")}
        env.update(XDG_CONFIG_HOME=str(self.home / "config"), HOME=str(self.home), COLUMNS="200")
        env["PIPELINES_API_URL"] = self.api_url
        if token is not None:
            env["PIPELINES_TOKEN"] = token
        env.update(extra)
        return env


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def live(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    settings = make_settings(database_url, nats_url, tmp_path_factory.mktemp("data"), gateway_port=0)
    async with running_system(settings) as system:
        nc = await bus.connect(nats_url, "test-cli-gateway")
        stop = asyncio.Event()
        gateway = Gateway(settings, system.store, system.commands, nc)
        tasks: list[asyncio.Task[None]] = []
        try:
            # The gateway starts after what the relay publishes of other tests' events.
            await relay_backlog(system, WAIT)
            tasks.append(asyncio.create_task(gateway.serve(stop)))
            async with asyncio.timeout(WAIT):
                await gateway.ready.wait()
            # The API tells the CLI where the gateway is (PIPELINES_GATEWAY_PUBLIC_URL).
            async with served_api(settings, gateway.port, WAIT) as url:
                yield Live(system, url, tmp_path_factory.mktemp("home"))
        finally:
            stop.set()
            if tasks:
                await asyncio.wait(tasks, timeout=WAIT)
            await nc.drain()


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli:
    """A `pipelines` process; its stderr lines are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.err_lines: list[str] = []

    @classmethod
    async def start(cls, env: dict[str, str], *args: str) -> Cli:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    async def wait_err(self, match: Callable[[str], bool]) -> str:
        """The first stderr line `match` accepts (a positive signal, with a deadline)."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(WAIT):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                if not line:
                    raise AssertionError(f"the command ended without that line; stderr: {''.join(self.err_lines)}")
                self.err_lines.append(line)
                if match(line):
                    return line

    async def result(self) -> Result:
        async with asyncio.timeout(WAIT):
            out, err = await self.proc.communicate()
        return Result(self.proc.returncode or 0, out.decode(), "".join(self.err_lines) + err.decode())


async def cli(env: dict[str, str], *args: str) -> Result:
    return await (await Cli.start(env, *args)).result()


def _run_id(text: str) -> str:
    """The id of the first run a status line names (`run <id>: queued`)."""
    found = RUN.search(text)
    assert found, text
    return found.group(1)


def _write(live: Live, text: str) -> Path:
    path = live.home / f"pipeline-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text)
    return path


async def _apply(live: Live, name: str, jobs: str) -> None:
    head = f"name: {name}\ndescription: from the CLI test\nvariables: {{WHO: world}}\n"
    text = f"{head}stages:\n  - id: build\n    jobs:\n{jobs}"
    r = await cli(live.env(live.system.token("member")), "apply", "-f", str(_write(live, text)))
    assert r.code == 0, r
    assert f"pipeline {name}" in r.out and "version" in r.out


async def _admin_profile(live: Live) -> None:
    """`pipelines --profile admin login`: stored in the config directory, mode 0600."""
    env = live.env()
    del env["PIPELINES_API_URL"]
    r = await cli(env, "--profile", "admin", "login", "--api", live.api_url, "--token", live.system.token("admin"))
    assert r.code == 0, r
    path = live.home / "config" / "pipelines" / "config.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _profile_env(live: Live) -> dict[str, str]:
    env = live.env()
    del env["PIPELINES_API_URL"]  # the profile names the API
    return env


async def test_apply_and_trigger_follow_streams_the_logs_and_exits_0(live: Live) -> None:
    name = f"cli-ok-{uuid.uuid4().hex[:8]}"
    await _apply(
        live,
        name,
        "      - name: compile\n        steps:\n"
        '          - {name: hello, run: "echo hello from $JOB_NAME"}\n'
        '          - {name: bye, run: "echo bye ${{ variables.WHO }}"}\n'
        '          - {name: secret, run: "test \\"$TOKEN\\" = s3cr3t-value && echo secret ok"}\n',
    )
    member = live.env(live.system.token("member"))
    secret = live.home / "token.txt"
    secret.write_text("s3cr3t-value\n")
    r = await cli(member, "trigger", name, "--var", "WHO=cli", "--secret", f"TOKEN=@{secret}", "--follow")
    assert r.code == 0, r
    assert "secret ok" in r.out.splitlines()
    assert "hello from compile" in r.out.splitlines()
    assert "bye cli" in r.out.splitlines()
    assert "step build/compile/hello: succeeded" in r.err
    assert "job build/compile: succeeded" in r.err
    assert "step build/compile/hello: succeeded" not in r.out  # statuses go to stderr, logs to stdout
    assert "hello from compile" not in r.err
    run_id = _run_id(r.err)

    runs = await cli(member, "runs", name, "--output", "json")
    assert runs.code == 0, runs
    assert json.loads(runs.out)[0]["id"] == run_id
    one = await cli(member, "run", run_id, "-o", "json")
    assert json.loads(one.out)["status"] == "succeeded"
    listed = await cli(member, "list", "-o", "json")
    assert name in {p["name"] for p in json.loads(listed.out)}
    tree = await cli(member, "run", run_id)
    assert "step hello" in tree.out and "succeeded" in tree.out
    logs = await cli(member, "logs", run_id)
    assert "bye cli" in logs.out.splitlines()
    events = await cli(member, "events", run_id, "-o", "json")
    assert json.loads(events.out)[0]["type"] == "run_triggered"

    # Applying again saves the next definition version of the same pipeline.
    await _apply(live, name, "      - name: compile\n        steps:\n          - {name: hello, run: 'echo again'}\n")
    shown = await cli(member, "show", name, "-o", "json")
    assert json.loads(shown.out)["definitionVersion"] >= 2


async def test_a_failing_run_exits_1(live: Live) -> None:
    name = f"cli-fail-{uuid.uuid4().hex[:8]}"
    await _apply(
        live, name, '      - name: test\n        steps:\n          - {name: boom, run: "echo about to fail; exit 3"}\n'
    )
    r = await cli(live.env(live.system.token("member")), "trigger", name, "--follow")
    assert r.code == 1, r
    assert "about to fail" in r.out
    assert "step build/test/boom: failed" in r.err
    assert f"run {_run_id(r.err)}: failed" in r.err


APPROVAL_JOBS = (
    "      - name: ship\n        steps:\n"
    "          - {name: gate, approval: {message: 'Ship it?'}}\n"
    '          - {name: deploy, run: "echo shipped"}\n'
)


async def test_a_run_approved_from_another_process_while_followed_exits_0(live: Live) -> None:
    name = f"cli-gate-{uuid.uuid4().hex[:8]}"
    await _apply(live, name, APPROVAL_JOBS)
    await _admin_profile(live)
    follower = await Cli.start(live.env(live.system.token("member")), "trigger", name, "--follow")
    line = await follower.wait_err(lambda text: "waits for approval" in text)
    run_id = _run_id(line)
    assert "admin" in line

    viewer = await cli(live.env(live.system.token("viewer")), "approve", run_id)
    assert viewer.code == 4, viewer
    assert "admin role" in viewer.err

    approved = await cli(_profile_env(live), "--profile", "admin", "approve", run_id, "--comment", "looks good")
    assert approved.code == 0, approved
    assert f"run {run_id}: running" in approved.out

    r = await follower.result()
    assert r.code == 0, r
    assert "shipped" in r.out.splitlines()
    assert f"run {run_id}: succeeded" in r.err

    # Approving it again is refused: exit 1, naming the status the run is in.
    again = await cli(_profile_env(live), "--profile", "admin", "approve", run_id)
    assert again.code == 1, again
    assert f"run {run_id} is succeeded" in again.err


async def test_ctrl_c_stops_following_not_the_run_and_a_run_cancelled_while_followed_exits_3(live: Live) -> None:
    name = f"cli-cancel-{uuid.uuid4().hex[:8]}"
    await _apply(live, name, APPROVAL_JOBS)
    await _admin_profile(live)
    member = live.env(live.system.token("member"))
    first = await Cli.start(member, "trigger", name, "--follow")
    line = await first.wait_err(lambda text: "waits for approval" in text)
    run_id = _run_id(line)
    # Ctrl-C stops following, not the run.
    first.proc.send_signal(signal.SIGINT)
    interrupted = await first.result()
    assert interrupted.code == 130, interrupted
    assert f"run {run_id} goes on" in interrupted.err
    still = await cli(member, "run", run_id, "-o", "json")
    assert json.loads(still.out)["status"] == "waiting_approval"

    stopped = await cli(_profile_env(live), "--profile", "admin", "stop", run_id)
    assert (stopped.code, stopped.out.strip()) == (0, f"run {run_id}: cancelled"), stopped

    follower = await Cli.start(member, "trigger", name, "--follow")
    line = await follower.wait_err(lambda text: "waits for approval" in text)
    run_id = _run_id(line)
    cancelled = await cli(_profile_env(live), "--profile", "admin", "cancel", run_id, "--reason", "not today")
    assert cancelled.code == 0, cancelled
    r = await follower.result()
    assert r.code == 3, r
    assert f"run {run_id}: cancelled" in r.err


async def test_validate_lists_every_error_with_its_path_and_exits_1(live: Live) -> None:
    bad = _write(
        live,
        "name: broken\njobs:\n  - name: a\n    needs: [nope]\n    steps: [{run: 'true'}]\n"
        "  - name: b\n    steps: [{frobnicate: 1}]\n",
    )
    member = live.env(live.system.token("member"))
    r = await cli(member, "validate", "-f", str(bad))
    assert r.code == 1, r
    assert 'jobs[0].needs: unknown job "nope"' in r.err
    assert "jobs[1].steps[0]" in r.err
    ok = _write(live, "name: fine\njobs:\n  - name: a\n    steps: [{run: 'true'}]\n")
    assert (await cli(member, "validate", "-f", str(ok))).code == 0
    applied = await cli(member, "apply", "-f", str(bad))
    assert applied.code == 1
    assert (await cli(member, "show", "broken")).code == 1  # nothing was created
    assert (await cli(member, "validate", "-f", str(live.home / "missing.yaml"))).code == 2
    # The README's example file is valid.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("A pipeline file (JSON or YAML)", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert (await cli(member, "validate", "-f", str(_write(live, example)))).code == 0


async def test_applying_a_new_pipeline_whose_deploy_names_an_unknown_component_creates_nothing(live: Live) -> None:
    # Valid as a file, but the save refuses it: the stage names no component of the organization.
    name = f"cli-refused-{uuid.uuid4().hex[:8]}"
    path = _write(
        live,
        f"name: {name}\nstages:\n  - id: ship\n    type: deploy\n"
        "    config: {componentId: no-such-component, environmentId: no-such-environment}\n",
    )
    member = live.env(live.system.token("member"))
    validated = await cli(member, "validate", "-f", str(path))
    assert validated.code == 1, validated
    assert "stages[0].config.componentId: unknown component 'no-such-component'" in validated.err
    applied = await cli(member, "apply", "-f", str(path))
    assert applied.code == 1, applied
    assert "stages[0].config.componentId: unknown component 'no-such-component'" in applied.err
    listed = await cli(member, "list", "-o", "json")
    assert name not in {p["name"] for p in json.loads(listed.out)}  # no empty pipeline left behind


async def test_who_am_i_and_the_exit_codes_of_auth_and_an_unreachable_server(live: Live) -> None:
    r = await cli(live.env(live.system.token("viewer", sub="vera")), "whoami", "-o", "json")
    assert r.code == 0, r
    me = json.loads(r.out)
    assert (me["subject"], me["organization"], me["roles"]) == ("vera", live.system.org, ["viewer"])
    assert me["expiresAt"]
    assert (await cli(live.env("not-a-token"), "list")).code == 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    gone = await cli(live.env(live.system.token("viewer"), PIPELINES_API_URL=f"http://127.0.0.1:{closed}"), "list")
    assert gone.code == 5, gone
    assert "cannot reach the API" in gone.err
    assert (await cli(live.env(), "trigger")).code == 2
