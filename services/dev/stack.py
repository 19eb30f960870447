"""The supervisor behind `pipelines up` and the end-to-end tests: one process per service (`python -m
services.<name>`), its output prefixed with its name, restarted with a growing backoff when it dies."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TextIO

from infra.config import Settings, stack_file, without_userinfo
from services.dev.backing import BackingServers, describe_exit
from services.dev.endpoints import SERVICES, display_host, mask_url, service_module
from services.dev.errors import ServerError, StackError
from services.dev.files import FileLock, private_dir, write_private
from services.dev.local_agent import LOCAL_AGENT, prepare_local_agent
from services.dev.nats import RunningNats
from services.dev.output import PrefixedOutput, isatty
from services.dev.ports import free_port, port_is_free
from services.dev.postgres import RunningPostgres
from services.dev.process import ManagedProcess, stop_stale_process

__all__ = ["SERVICES", "Stack", "StackError"]


@dataclass(eq=False)
class _Service:
    name: str
    argv: list[str]
    process: ManagedProcess | None = None
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None


class Stack:
    """Embedded servers (when needed) plus one supervised process per service.

    env: the base environment (default `os.environ`); children get all of it plus
        PIPELINES_DATABASE_URL, PIPELINES_NATS_URL, PIPELINES_API_PORT, PIPELINES_GATEWAY_PORT and
        PIPELINES_DATA_DIR set to the resolved values, and PIPELINES_<SERVICE>_METRICS_PORT for the
        executor, relay and projector (a free port each, unless `env` sets one).
    database_url / nats_url: used when given, else PIPELINES_DATABASE_URL / PIPELINES_NATS_URL from
        `env`, else the embedded server is started under `data_dir` (unless `embedded=False`).
    nats_creds: each service's broker credential file for a given NATS (the embedded one makes its
        own); a child gets its file as PIPELINES_NATS_CREDS. None: the children's env decides.
    data_dir: default PIPELINES_DATA_DIR from `env`, else `.data` (relative to `cwd`).
    api_port / gateway_port: default from `env` (PIPELINES_API_PORT / PIPELINES_GATEWAY_PORT).
    services / package: run `python -m <package>.<name>` for each name.
    output: where the prefixed output of the services and the supervisor goes (default stdout).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        services: Sequence[str] = SERVICES,
        package: str = "services",
        python: str = sys.executable,
        database_url: str | None = None,
        nats_url: str | None = None,
        nats_creds: Mapping[str, Path] | None = None,
        embedded: bool = True,
        data_dir: Path | str | None = None,
        api_port: int | None = None,
        gateway_port: int | None = None,
        cwd: Path | str | None = None,
        output: TextIO | None = None,
        restart: bool = True,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        stable_after: float = 30.0,
        stop_timeout: float = 10.0,
        check_ports: bool = True,
        nats_nodes: int = 1,
    ) -> None:
        self.base_env: dict[str, str] = dict(os.environ if env is None else env)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the JWT secret warning is the caller's business
            self.settings = Settings.from_env(self.base_env)
        self.cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
        raw_dir = Path(data_dir) if data_dir is not None else self.settings.data_dir
        self.data_dir = raw_dir if raw_dir.is_absolute() else self.cwd / raw_dir
        self.package = package
        self.python = python
        self.embedded = embedded
        self.api_port = api_port if api_port is not None else self.settings.api_port
        self.gateway_port = gateway_port if gateway_port is not None else self.settings.gateway_port
        self.output: TextIO = output if output is not None else sys.stdout
        self.restart_enabled = restart
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.check_ports = check_ports

        self.child_env: dict[str, str] = {}
        # Where the executor, relay and projector serve their metrics (set when the stack starts).
        self.metrics_ports: dict[str, int] = {}
        # The ports of the second API and gateway processes (`api-2`, `gateway-2`: make up-cluster).
        self.instance_ports: dict[str, int] = {}
        self._services = {
            name: _Service(name, [self.python, "-m", f"{package}.{service_module(name)}"])
            for name in dict.fromkeys(services)
        }
        color = isatty(self.output) and "NO_COLOR" not in self.base_env
        self._out = PrefixedOutput(self.output, list(self._services), color=color)
        self._servers = BackingServers(
            self.data_dir,
            database_url=database_url or self.base_env.get("PIPELINES_DATABASE_URL") or None,
            nats_url=nats_url or self.base_env.get("PIPELINES_NATS_URL") or None,
            embedded=embedded,
            say=self.say,
            nats_creds=nats_creds,
            stream=self.settings.events_stream,
            nats_nodes=nats_nodes,
        )
        self._state_lock = threading.RLock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock: FileLock | None = None
        self._started = False
        self._stopped = False

    # -- public API ------------------------------------------------------------------------------

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self._services)

    @property
    def postgres(self) -> RunningPostgres | None:
        """The embedded PostgreSQL, when the stack started one."""
        return self._servers.postgres

    @property
    def nats(self) -> RunningNats | None:
        """The embedded NATS, when the stack started one."""
        return self._servers.nats

    @property
    def nats_nodes(self) -> list[RunningNats]:
        """Every node of the embedded NATS (one, or a cluster's)."""
        return list(self._servers.nats_nodes)

    @property
    def database_url(self) -> str:
        return self._servers.database_url

    @property
    def nats_url(self) -> str:
        return self._servers.nats_url

    @property
    def api_url(self) -> str:
        return f"http://{display_host(self.settings.api_host)}:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        """The WebSocket endpoint."""
        return f"ws://{display_host(self.settings.gateway_host)}:{self.gateway_port}/api/v1/ws"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "stack.pids"

    def start(self) -> Self:
        """Start the embedded servers that are needed, then every service. Raises StackError
        (having stopped whatever it started) when something cannot start."""
        if self._started:
            raise StackError("this stack was already started")
        self._started = True
        try:
            private_dir(self.data_dir)
            self._lock = FileLock(self.data_dir / "stack.lock").acquire("pipelines stack")
            self._reap_stale_children()
            if self.check_ports:
                self._check_ports()
            self._servers.start()
            self._prepare_local_agent()
            self._write_stack_file()
            self.child_env = self._make_child_env()
            with self._state_lock:
                for service in self._services.values():
                    self._spawn(service)
            self._monitor = threading.Thread(target=self._monitor_loop, name="stack-monitor", daemon=True)
            self._monitor.start()
            atexit.register(self.stop)
        except ServerError as exc:
            self.stop()
            raise StackError(str(exc)) from exc
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM every service, wait up to `stop_timeout`, SIGKILL stragglers (and whatever they
        left in their process groups), then stop the embedded servers. Idempotent."""
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()
        with self._state_lock:
            processes = [s.process for s in self._services.values() if s.process is not None]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for process in processes:
            process.wait(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.alive():
                self._say("stack", f"{process.name} did not stop within {self.stop_timeout:.0f}s: killing it")
                process.kill()
            process.signal_group(signal.SIGKILL)
            process.join_output(1.0)
            self._say("stack", f"{process.name} stopped ({describe_exit(process.returncode)})")
        with contextlib.suppress(OSError):
            stack_file(self.data_dir).unlink()
        self._servers.stop()
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        if self._lock is not None:
            self._lock.release()
        atexit.unregister(self.stop)

    def force_kill(self) -> None:
        """SIGKILL every service group now (a second Ctrl-C); `stop()` still has to run."""
        with self._state_lock:
            processes = [s.process for s in self._services.values() if s.process is not None]
        for process in processes:
            process.signal_group(signal.SIGKILL)

    def pid(self, name: str) -> int | None:
        """The pid of the running process of service `name`, if it is running."""
        with self._state_lock:
            process = self._services[name].process
            return process.pid if process is not None and process.alive() else None

    def pids(self) -> dict[str, int | None]:
        return {name: self.pid(name) for name in self._services}

    def restarts(self, name: str) -> int:
        with self._state_lock:
            return self._services[name].restarts

    def send_signal(self, name: str, sig: int) -> None:
        """Send `sig` to the running process of service `name` (tests use it to kill one)."""
        with self._state_lock:
            process = self._services[name].process
        if process is not None:
            process.send_signal(sig)

    def wait_running(self, timeout: float = 10.0) -> bool:
        """Wait until every service has a live process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.pid(n) is not None for n in self._services):
                return True
            time.sleep(0.05)
        return False

    def wait_listening(self, timeout: float = 30.0) -> bool:
        """Wait until the api and the gateway processes (those that run) accept TCP connections."""
        ports = [p for n, p in (("api", self.api_port), ("gateway", self.gateway_port)) if n in self._services]
        hosts = {self.api_port: self.settings.api_host, self.gateway_port: self.settings.gateway_host}
        for name, port in self.instance_ports.items():
            ports.append(port)
            hosts[port] = self.settings.api_host if service_module(name) == "api" else self.settings.gateway_host
        deadline = time.monotonic() + timeout
        while ports and time.monotonic() < deadline:
            port = ports[0]
            try:
                with socket.create_connection((display_host(hosts[port]), port), timeout=1):
                    ports.pop(0)
                    continue
            except OSError:
                time.sleep(0.05)
        return not ports

    def banner(self, token_command: str = "pipelines token --sub alice --role admin") -> list[str]:
        lines = []
        if self.postgres is not None:
            masked = self.postgres.url.replace(self.postgres.password, "***")
            lines.append(f"PostgreSQL  {masked}  (embedded; password in {self.postgres.password_file})")
        else:
            lines.append(f"PostgreSQL  {mask_url(self.database_url)}")
        if len(self._servers.nats_nodes) > 1:
            for i, node in enumerate(self._servers.nats_nodes):
                label = "NATS" if i == 0 else ""
                lines.append(f"{label:<12}{node.url}  (embedded cluster node {node.options.get('server_name')})")
        else:
            lines.append(f"NATS        {mask_url(self.nats_url)}{'  (embedded)' if self.nats is not None else ''}")
        lines.append(f"Dashboard   {self.api_url}/  (sign in with a token: see Token below)")
        lines.append(f"API         {self.api_url}/api/v1/pipelines")
        lines.append(f"OpenAPI     {self.api_url}/schema")
        lines.append(f"AsyncAPI    {self.api_url}/api/v1/asyncapi.json")
        lines.append(f"WebSocket   {self.gateway_url}")
        gateway_http = f"http://{display_host(self.settings.gateway_host)}:{self.gateway_port}"
        lines.append(f"Socket.IO   {gateway_http}/events  (namespace /events, path /socket.io/)")
        for name, port in self.instance_ports.items():
            if service_module(name) == "api":
                lines.append(
                    f"{'API (' + name + ')':<12}http://{display_host(self.settings.api_host)}:{port}/api/v1/pipelines"
                )
            else:
                host = display_host(self.settings.gateway_host)
                lines.append(
                    f"{'WS (' + name + ')':<12}ws://{host}:{port}/api/v1/ws  (Socket.IO http://{host}:{port}/events)"
                )
        for i, (name, url) in enumerate(self.metrics_urls()):
            lines.append(f"{'Metrics' if i == 0 else '':<12}{url} ({name})")
        lines.append(f"Token       {token_command}")
        lines.append(f"Data        {self.data_dir}")
        return lines

    def metrics_urls(self) -> list[tuple[str, str]]:
        """Each service's GET /metrics, of the services this stack runs."""
        host = display_host(self.settings.metrics_host)
        urls = {
            "api": f"{self.api_url}/metrics",
            "gateway": f"http://{display_host(self.settings.gateway_host)}:{self.gateway_port}/metrics",
            **{name: f"http://{host}:{port}/metrics" for name, port in self.metrics_ports.items()},
        }
        for name, port in self.instance_ports.items():
            kind = service_module(name)
            where = display_host(self.settings.api_host if kind == "api" else self.settings.gateway_host)
            urls[name] = f"http://{where}:{port}/metrics"
        return [(name, urls[name]) for name in self._services if name in urls]

    def say(self, line: str) -> None:
        """Print a supervisor line."""
        self._say("stack", line)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------

    def _say(self, name: str, line: str) -> None:
        self._out.say(name, line)

    def _check_ports(self) -> None:
        wanted = {
            "api": ("PIPELINES_API_PORT", self.api_port),
            "gateway": ("PIPELINES_GATEWAY_PORT", self.gateway_port),
        }
        for name, (variable, port) in wanted.items():
            if name in self._services and not port_is_free(port):
                raise StackError(f"port {port} for the {name} is in use on 127.0.0.1: set {variable} to another port")

    def _make_child_env(self) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(
            PIPELINES_DATABASE_URL=self.database_url,
            PIPELINES_NATS_URL=self.nats_url,
            PIPELINES_API_PORT=str(self.api_port),
            PIPELINES_GATEWAY_PORT=str(self.gateway_port),
            PIPELINES_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
        )
        configured = {
            "executor": self.settings.executor_metrics_port,
            "relay": self.settings.relay_metrics_port,
            "projector": self.settings.projector_metrics_port,
        }
        # Kept across restarts of a service: the same address to scrape. A second process of a service
        # (`relay-2`) gets a free port of its own (in `_env_for`).
        self.metrics_ports = {
            name: (configured[service_module(name)] if name in configured else 0)
            or free_port(self.settings.metrics_host)
            for name in self._services
            if service_module(name) in configured
        }
        for name, port in self.metrics_ports.items():
            if name in configured:
                env[f"PIPELINES_{name.upper()}_METRICS_PORT"] = str(port)
        hosts = {"api": self.settings.api_host, "gateway": self.settings.gateway_host}
        self.instance_ports = {
            name: free_port(display_host(hosts[service_module(name)]))
            for name in self._services
            if service_module(name) in hosts and name not in hosts
        }
        return env

    def _prepare_local_agent(self) -> None:
        """The local agent needs the embedded NATS (whose users we write); beside another, none runs."""
        agents = [name for name in self._services if service_module(name) == "agent"]
        if not agents:
            return
        if self._servers.nats is None:
            for name in agents:
                del self._services[name]
            self.say("no local agent: NATS is not the embedded one (issue one with `pipelines agents create`)")
            return
        servers = without_userinfo(self.nats_url).split(",")
        for name in agents:
            number = name.rpartition("-")[2] if "-" in name else "1"
            self._servers.local_agents[name] = prepare_local_agent(
                self.data_dir,
                servers,
                self.base_env,
                agent_id=LOCAL_AGENT if name == "agent" else f"{LOCAL_AGENT}_{number}",
                name="local" if name == "agent" else f"local-{number}",
                # Several: each has a label of its own too (`agent-1`, `agent-2`), for `runsOn`.
                extra_labels=(f"agent-{number}",) if len(agents) > 1 else (),
            )

    def _env_for(self, name: str) -> dict[str, str]:
        """The child environment with the service's own broker credential file (a path, never the secret)."""
        module = service_module(name)
        if module == "agent":
            # An agent holds no database credentials, no service's broker credentials (its own only),
            # no key that signs tokens or seals secrets.
            secret = ("PIPELINES_DATABASE_URL", "PIPELINES_NATS_URL", "PIPELINES_JWT_SECRET", "PIPELINES_SECRETS_KEY")
            env = {
                k: v
                for k, v in self.child_env.items()
                if k not in secret and not k.startswith("PIPELINES_NATS_CREDS") and not k.endswith("_METRICS_PORT")
            }
            env["PIPELINES_AGENT_CREDS"] = str(self._servers.local_agents[name])
            return env
        env = dict(self.child_env)
        if name != module:  # a second process of the service: its own ports
            if name in self.instance_ports:
                env[f"PIPELINES_{module.upper()}_PORT"] = str(self.instance_ports[name])
            if name in self.metrics_ports:
                env[f"PIPELINES_{module.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
        creds = self._servers.nats_creds
        if module not in creds:
            return env
        env = {k: v for k, v in env.items() if not k.startswith("PIPELINES_NATS_CREDS")}
        env["PIPELINES_NATS_CREDS"] = str(creds[module])
        return env

    def _spawn(self, service: _Service) -> None:
        name = service.name
        service.process = ManagedProcess(
            service.argv,
            name=name,
            env=self._env_for(name),
            cwd=self.cwd,
            output=lambda line: self._say(name, line),
        )
        service.restart_at = None
        self._write_pid_file()

    def _write_stack_file(self) -> None:
        """The servers' URLs for commands run beside the stack (infra.config reads it when
        PIPELINES_DATABASE_URL / PIPELINES_NATS_URL are unset); 0600: the URLs hold passwords."""
        data = {
            "supervisor": os.getpid(),
            "databaseUrl": self.database_url,
            "natsUrl": self.nats_url,
            "apiUrl": self.api_url,
            "gatewayUrl": self.gateway_url,
        }
        write_private(stack_file(self.data_dir), json.dumps(data))

    def _write_pid_file(self) -> None:
        children = {s.name: s.process.pid for s in self._services.values() if s.process is not None}
        data = {"supervisor": os.getpid(), "package": self.package, "children": children}
        with contextlib.suppress(OSError):
            write_private(self.pid_file, json.dumps(data))

    def _reap_stale_children(self) -> None:
        """Stop services left running by a supervisor that was killed (we hold the lock now)."""
        try:
            data = json.loads(self.pid_file.read_text())
            package = str(data.get("package", self.package))
            children = {str(k): int(v) for k, v in dict(data.get("children", {})).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return
        for name, pid in children.items():
            stop_stale_process(pid, marker=f"-m {package}.{service_module(name)}", timeout=self.stop_timeout)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def _monitor_loop(self) -> None:
        while not self._stopping.wait(0.1):
            try:
                self._servers.check()
                with self._state_lock:
                    if self._stopping.is_set():
                        return
                    for service in self._services.values():
                        self._check_service(service)
            except Exception as exc:  # the monitor must survive anything
                self._say("stack", f"supervisor error: {exc!r}")

    def _check_service(self, service: _Service) -> None:
        now = time.monotonic()
        process = service.process
        if process is not None and process.poll() is not None:
            ran = now - process.started_at
            process.signal_group(signal.SIGKILL)  # whatever it left in its group
            service.process = None
            if not self.restart_enabled:
                self._say("stack", f"{service.name} exited with {describe_exit(process.returncode)}")
                return
            if service.backoff == 0.0 or ran >= self.stable_after:
                service.backoff = self.backoff
            else:
                service.backoff = min(service.backoff * 2, self.max_backoff)
            service.restart_at = now + service.backoff
            self._say(
                "stack",
                f"{service.name} (pid {process.pid}) exited with {describe_exit(process.returncode)} "
                f"after {ran:.1f}s; restarting in {service.backoff:.1f}s",
            )
        if service.process is None and service.restart_at is not None and now >= service.restart_at:
            service.restarts += 1
            self._spawn(service)
            assert service.process is not None
            self._say("stack", f"restarted {service.name} (pid {service.process.pid}, restart #{service.restarts})")
