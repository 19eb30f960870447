"""Attacks on the script sandbox, each from an attacker's script in a real run through the real
executor (real PostgreSQL and NATS): another run's processes, secrets and /tmp are out of sight,
resource limits hold, no descriptor or service variable leaks, and no network when asked. Root only
(CI is root): the sandbox needs namespaces and a uid per run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import pytest_asyncio

from infra.executor.sandbox import RunSandboxes, unavailable
from tests.integration.system import System, eventually, make_settings, running_system
from tests.integration.test_deploy_notify import component, deploy_stage, environment

_why = unavailable()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_why is not None, reason=f"the script sandbox cannot run here: {_why}"),
]

MAX_PROCS = 64
MAX_FILE_SIZE = 1024 * 1024
MAX_MEMORY = 512 * 1024 * 1024


@contextlib.asynccontextmanager
async def sandboxed_system(database_url: str, nats_url: str, data_dir: Path, **overrides: Any) -> AsyncIterator[System]:
    # The work directory is not under /tmp: a private /tmp mounted over it would hide it (such a
    # host keeps its /tmp for scripts; see infra.executor.sandbox.hides_itself).
    work = Path("/var/tmp") / f"pipelines-sandbox-test-{uuid.uuid4().hex[:12]}"
    settings = make_settings(
        database_url,
        nats_url,
        data_dir,
        work_dir=work,
        script_max_procs=MAX_PROCS,
        script_max_file_size=MAX_FILE_SIZE,
        script_max_memory=MAX_MEMORY,
        **overrides,
    )
    try:
        async with running_system(settings) as system:
            yield system
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with sandboxed_system(database_url, nats_url, tmp_path_factory.mktemp("data")) as s:
        yield s


async def pipeline(system: System, spec: dict[str, Any], org: str | None = None) -> dict[str, Any]:
    headers = system.headers("member", org=org or system.org)
    r = await system.client.post("/api/v1/pipelines", json={"name": f"p-{uuid.uuid4().hex[:8]}"}, headers=headers)
    assert r.status_code == 201, r.text
    p: dict[str, Any] = r.json()
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save", json={"spec": spec, "format": "yaml"}, headers=headers
    )
    assert r.status_code == 200, r.text
    return p


async def run_to_end(system: System, spec: dict[str, Any], org: str | None = None, **trigger: Any) -> dict[str, Any]:
    headers = system.headers("member", org=org or system.org)
    p = await pipeline(system, spec, org)
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", json=trigger or None, headers=headers)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while True:
        r = await system.client.get(f"/api/v1/pipelines/{p['id']}/runs/{run_id}", headers=headers)
        assert r.status_code == 200, r.text
        run: dict[str, Any] = r.json()
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, f"the run did not end: {run}"
        await asyncio.sleep(0.05)


def script(command: str) -> dict[str, Any]:
    return {"stages": [{"id": "s", "type": "script", "config": {"command": command}}]}


def output(run: dict[str, Any]) -> str:
    text: str = run["stageResults"][0]["output"]
    return text


def host_processes() -> dict[int, tuple[bytes, bytes]]:
    """Every process of the host as the executor sees it: pid -> (cmdline, environ)."""
    found: dict[int, tuple[bytes, bytes]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(proc.name)] = ((proc / "cmdline").read_bytes(), (proc / "environ").read_bytes())
    return found


async def test_another_runs_script_sees_none_of_a_running_scripts_processes_nor_its_secret(system: System) -> None:
    secret = f"tok-{uuid.uuid4().hex}"
    victim_spec = {"jobs": [{"name": "hold", "steps": [{"name": "s", "run": "sleep 30 # ${{ secrets.TOKEN }}"}]}]}
    victim = await pipeline(system, victim_spec)
    r = await system.client.post(
        f"/api/v1/pipelines/{victim['id']}/trigger", json={"secrets": {"TOKEN": secret}}, headers=system.headers()
    )
    assert r.status_code == 201, r.text
    held = r.json()["id"]

    async def victim_sleeps() -> bool:
        return any(
            cmd == b"sleep\x0030\x00" and f"RUN_ID={held}".encode() in env for cmd, env in host_processes().values()
        )

    await eventually(victim_sleeps, what="run A's script to be sleeping")
    # Not on any command line of the host (the script runs from a file), only in A's environment.
    assert not any(secret.encode() in cmd for cmd, _ in host_processes().values())

    spy = (
        "ps -eo pid,args; echo ---; "
        "for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do cat $f 2>/dev/null; echo; done | tr '\\0' ' '; "
        "echo ---; ls -d /proc/[0-9]* | wc -l"
    )
    done = await run_to_end(system, script(spy), org=f"other-{uuid.uuid4().hex[:6]}")
    out = output(done)
    assert done["status"] == "succeeded", out
    processes, _, count = out.split("---")
    assert "sleep 30" not in out and held not in out
    assert secret not in str(done)
    # Only its own run's: PID 1 of the run's sandbox, the run's runner and its subshell waiting
    # for this step, the step's shell, ps (below a header line); then the shell's subshells and ls.
    assert processes.strip().count("\n") <= 5 and int(count.strip()) <= 8, out
    stopped = await system.client.post(
        f"/api/v1/pipelines/{victim['id']}/runs/{held}/stop", json={"reason": "done"}, headers=system.headers("admin")
    )
    assert stopped.status_code == 200, stopped.text


async def test_a_fork_bomb_hits_the_process_limit_and_another_run_still_completes(system: System) -> None:
    bomb = "for i in $(seq 1 5000); do sleep 5 & done; echo spawned all"
    done = await run_to_end(system, script(bomb))
    out = output(done)
    assert done["status"] == "failed" and "spawned all" not in out, out
    assert "fork" in out.lower(), out
    after = await run_to_end(system, script("echo still here"))
    assert after["status"] == "succeeded" and "still here" in output(after)


async def test_a_file_larger_than_the_limit_cannot_be_written(system: System) -> None:
    write = f"head -c {MAX_FILE_SIZE * 2} /dev/zero > big; echo rc=$?; wc -c < big"
    done = await run_to_end(system, script(write))
    out = output(done)
    assert "rc=153" in out, out  # 128 + SIGXFSZ
    assert f"\n{MAX_FILE_SIZE}\n" in f"\n{out}\n", out


async def test_a_script_allocating_beyond_the_memory_limit_fails(system: System) -> None:
    done = await run_to_end(system, script(f"python3 -c 'b = bytearray({MAX_MEMORY * 2}); print(len(b))'"))
    out = output(done)
    assert done["status"] == "failed" and "MemoryError" in out, out


async def test_tmp_is_private_to_each_run_and_shared_by_its_stages(system: System) -> None:
    name = f"/tmp/sandbox-{uuid.uuid4().hex}"
    spec = {
        "stages": [
            {"id": "write", "type": "script", "config": {"command": f"echo mine > {name}"}},
            {"id": "read", "type": "script", "config": {"command": f"cat {name}"}},
        ]
    }
    writer = await run_to_end(system, spec)
    assert writer["status"] == "succeeded" and writer["stageResults"][1]["output"].strip() == "mine", writer
    assert not Path(name).exists()  # not the host's /tmp either
    reader = await run_to_end(system, script(f"cat {name} 2>/dev/null || echo absent; ls -A /tmp | wc -l"))
    assert output(reader).split() == ["absent", "0"], output(reader)


async def test_a_script_inherits_no_descriptor_and_no_service_variable(system: System) -> None:
    done = await run_to_end(system, script("ls /proc/self/fd | tr '\\n' ' '; echo; env | cut -d= -f1 | sort"))
    fds, *names = output(done).strip().split("\n")
    assert fds.split() == ["0", "1", "2", "3"], fds  # 3: the directory ls reads
    assert not [n for n in names if n.startswith("PIPELINES_")], names
    allowed = {"PATH", "HOME", "LANG", "LC_ALL", "CI", "PIPELINE_ID", "RUN_ID", "STAGE_ID", "USER", "LOGNAME", "PWD"}
    assert set(names) <= allowed, set(names) - allowed


async def test_deploy_commands_run_in_the_sandbox_too(system: System) -> None:
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "ps -eo args | wc -l; ulimit -p; id -u"})
    done = await run_to_end(system, {"stages": [deploy_stage(comp, env)]})
    lines = [ln for ln in output(done).split("\n") if ln.strip().isdigit()]
    assert done["status"] == "succeeded", output(done)
    # ps's header, PID 1, the runner and its subshell, the command's shell, ps and wc.
    assert int(lines[0]) <= 7 and lines[1] == str(MAX_PROCS) and int(lines[2]) >= 200_000, output(done)


def _connect(port: int) -> str:
    return (
        "python3 -c 'import socket, sys\n"
        "try:\n"
        f'    socket.create_connection(("127.0.0.1", {port}), 2).close(); print("connected")\n'
        "except OSError as e:\n"
        '    print("refused", e)\''
    )


async def test_without_network_a_script_cannot_reach_the_hosts_services(system: System) -> None:
    port = urlparse(system.settings.nats_url).port
    assert port is not None
    online = await run_to_end(system, script(_connect(port)))
    assert "connected" in output(online), output(online)  # by default scripts keep the network
    # PIPELINES_SCRIPT_NETWORK=none on this executor (one stack at a time: they share the broker).
    units = system.executor.units
    default = units.sandbox
    units.sandbox = RunSandboxes(dataclasses.replace(default.sandbox, network=False))
    try:
        cut = await run_to_end(system, script(_connect(port) + "; tail -n +3 /proc/net/dev | cut -d: -f1"))
    finally:
        units.sandbox = default
    out = output(cut)
    assert "refused" in out and "connected" not in out, out
    assert out.split()[-1] == "lo", out  # its only interface
