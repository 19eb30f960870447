"""Configuration from `PIPELINES_*` environment variables.

Read once by each service's bootstrap; nothing here connects to anything.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from domain.stages import Limits

DEV_JWT_SECRET = "dev-insecure-secret-change-me-before-production"
# Written by `make up` (services/dev/stack.py) in its data directory, mode 0600, while it runs: the
# URLs of its PostgreSQL and NATS, so that a command run beside it (`python -m services.projector
# --rebuild`) reaches the same servers without their passwords on a command line.
STACK_FILE = "stack.json"


def stack_file(data_dir: Path) -> Path:
    return Path(data_dir) / STACK_FILE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_stack_urls(data_dir: Path) -> dict[str, str]:
    """`{"database": url, "nats": url}` of the `make up` running for `data_dir`; empty when none
    runs (no file, a damaged one, or one left by a supervisor that is gone)."""
    try:
        data = json.loads(stack_file(data_dir).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    pid = data.get("supervisor")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not _alive(pid):
        return {}
    urls = {"database": data.get("databaseUrl"), "nats": data.get("natsUrl")}
    return {k: v for k, v in urls.items() if isinstance(v, str) and v}


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None


def _port(env: dict[str, str], name: str) -> int:
    """A TCP port to listen on; 0 (the default) for none."""
    port = _int(env, name, 0)
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be a TCP port (0 for none), not {port}")
    return port


def default_script_uids() -> tuple[int, int] | None:
    """When the executor is root, each run's scripts get a uid of their own from this range, so
    that concurrent runs cannot read each other's files, environment (secrets) or processes."""
    return (200_000, 299_999) if os.geteuid() == 0 else None


def parse_uid_range(raw: str) -> tuple[int, int] | None:
    """`200000-299999`, or `off` (None): PIPELINES_SCRIPT_UIDS."""
    if raw.strip().lower() in ("off", "none", "no", "false", "0"):
        return None
    first, sep, last = raw.partition("-")
    try:
        lo, hi = int(first), int(last)
    except ValueError:
        raise ValueError(
            f"PIPELINES_SCRIPT_UIDS must be FIRST-LAST (for example 200000-299999) or off, not {raw!r}"
        ) from None
    if not sep or not 1000 <= lo <= hi < 2**31 - 1:
        raise ValueError(f"PIPELINES_SCRIPT_UIDS must be FIRST-LAST with 1000 <= FIRST <= LAST, not {raw!r}")
    return lo, hi


def parse_cidrs(raw: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """`127.0.0.0/8, ::1/128` (PIPELINES_OUTBOUND_ALLOW); a bare address is a /32 or /128."""
    out: list[IPv4Network | IPv6Network] = []
    for part in (p.strip() for p in raw.split(",")):
        if part:
            try:
                out.append(ip_network(part, strict=False))
            except ValueError:
                raise ValueError(
                    f"PIPELINES_OUTBOUND_ALLOW must be comma-separated CIDRs (for example 127.0.0.0/8), not {part!r}"
                ) from None
    return tuple(out)


def parse_path_list(raw: str) -> tuple[Path, ...]:
    """`/srv/repos:/opt/git` or `/srv/repos,/opt/git` (PIPELINES_GIT_ALLOW_LOCAL): absolute paths."""
    parts = [p.strip() for chunk in raw.split(",") for p in chunk.split(os.pathsep)]
    paths = tuple(Path(p) for p in parts if p)
    for path in paths:
        if not path.is_absolute():
            raise ValueError(f"PIPELINES_GIT_ALLOW_LOCAL must list absolute directories, not {str(path)!r}")
    return paths


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_limit(env: dict[str, str], name: str, default: int | None, *, size: bool = False) -> int | None:
    """A resource limit: a count, or with `size` bytes with an optional K, M, G or T suffix
    (binary: 512M, 4G); `unlimited` (or 0) for none."""
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("unlimited", "0"):
        return None
    found = re.fullmatch(r"(\d+)([kmgt]?)(?:i?b)?" if size else r"(\d+)()", raw)
    if found is None:
        what = "a size in bytes (for example 512M or 4G)" if size else "a positive integer"
        raise ValueError(f"{name} must be {what} or unlimited, not {env.get(name)!r}")
    return int(found[1]) * _SIZE_UNITS[found[2]]


def _network(env: dict[str, str]) -> bool:
    raw = (env.get("PIPELINES_SCRIPT_NETWORK") or "host").strip().lower()
    if raw not in ("host", "none"):
        raise ValueError(f"PIPELINES_SCRIPT_NETWORK must be host or none, not {raw!r}")
    return raw == "host"


def default_script_user() -> str | None:
    """Scripts never run as root by default: as `nobody` when the executor is root, else as the
    executor's own user (None: no switch)."""
    return "nobody" if os.geteuid() == 0 else None


def nats_service_creds(env: Mapping[str, str]) -> dict[str, Path]:
    """PIPELINES_NATS_CREDS_<SERVICE> (API, RELAY, EXECUTOR, GATEWAY, PROJECTOR): one service's own
    broker credential file."""
    prefix = "PIPELINES_NATS_CREDS_"
    return {k[len(prefix) :].lower(): Path(v) for k, v in env.items() if k.startswith(prefix) and v}


def without_userinfo(url: str) -> str:
    """`nats://user:pw@host:4222` -> `nats://host:4222` (each of a comma-separated list)."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.netloc.rpartition("@")[2]
        out.append(urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)))
    return ",".join(out)


@dataclass(frozen=True, kw_only=True)
class Settings:
    # Both may hold credentials: never in a repr (logs, tracebacks).
    # Empty: none known (`servers_problem()` says why; services refuse to start).
    database_url: str = field(repr=False)
    nats_url: str = field(repr=False)
    # The broker credential file (infra/broker/creds.py: `.creds`, nkey seed or `user:password`) of
    # every service (PIPELINES_NATS_CREDS), and the files of single services that override it
    # (PIPELINES_NATS_CREDS_<SERVICE>). None: connect without credentials.
    nats_creds: Path | None = None
    nats_service_creds: Mapping[str, Path] = field(default_factory=dict, compare=False)
    # The broker URLs handed to downstream systems with their credentials (PIPELINES_BROKER_URLS,
    # comma-separated); default: nats_url without credentials.
    broker_urls: tuple[str, ...] = ()
    jwt_secret: str = field(repr=False)
    jwt_algorithm: str = "HS256"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8081
    # Where clients reach the gateway (`GET /api/v1/info` tells them); None: ws://<gateway host>:<port>/api/v1/ws.
    gateway_public_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".data"))
    # Default timeout of a script stage, in seconds.
    stage_timeout: float = 3600.0
    # Seconds between TERM and KILL when a process group is stopped.
    kill_grace: float = 1.0
    # JetStream stream that carries every stored event.
    events_stream: str = "PIPELINES_EVENTS"
    # Copies JetStream keeps of it (1 on one server; 3 on a 3-node cluster survives losing a node).
    events_stream_replicas: int = 1
    # AckWait of the executor's durable consumer, seconds.
    ack_wait: float = 30.0
    max_log_bytes: int = 10 * 1024 * 1024
    # Relay and projector fall back to polling the feed at this interval when no wake-up arrives.
    poll_interval: float = 0.5
    # An executor renews its stage leases every lease_ttl / 3 seconds; a lease not renewed for
    # lease_ttl seconds means its executor was lost.
    lease_ttl: float = 10.0
    # How often each executor looks for lost leases and due timers (retries, approval timeouts).
    sweep_interval: float = 1.0
    # Key material for run secrets at rest (PIPELINES_SECRETS_KEY). When unset, a random key is
    # generated once in <data_dir>/secrets.key (0600) and shared by every service of the data dir.
    secrets_key: str | None = field(default=None, repr=False)
    # The user (name or uid) scripts run as; None runs them as the executor's own user.
    script_user: str | None = field(default_factory=default_script_user)
    # A uid per run from this range (inclusive), instead of `script_user`; None: off.
    script_uids: tuple[int, int] | None = field(default_factory=default_script_uids)
    # Directories whose repositories (file:// URLs, absolute paths) pipelines may use; none by
    # default: a repoUrl on the server's own disk is refused (PIPELINES_GIT_ALLOW_LOCAL).
    git_allow_local: tuple[Path, ...] = ()
    # The user git runs as (PIPELINES_GIT_USER, default the script user): never the service's own
    # when it is root, so git cannot read the service's keys or data directory.
    git_user: str | None = field(default_factory=default_script_user)
    # Resource limits of each script (None: none); see infra.executor.sandbox.Limits.
    script_max_procs: int | None = 4096
    script_max_open_files: int | None = 4096
    script_max_file_size: int | None = 4 * 1024**3
    script_max_memory: int | None = 8 * 1024**3
    # Whether scripts reach the network (PIPELINES_SCRIPT_NETWORK=host, the default) or not (none).
    script_network: bool = True
    # Where scripts get their working directories (PIPELINES_WORK_DIR); default <data_dir>/work.
    work_dir: Path | None = None
    # Notification deliveries (notify stages): attempts in all, seconds before the second attempt
    # (each later wait doubles), and seconds each HTTP request may take (webhook deployers too).
    notify_max_attempts: int = 4
    notify_backoff: float = 1.0
    notify_timeout: float = 10.0
    # Where the executor, the relay and the projector serve GET /metrics (0: not served); the API
    # and the gateway serve theirs on their own ports.
    metrics_host: str = "127.0.0.1"
    executor_metrics_port: int = 0
    relay_metrics_port: int = 0
    projector_metrics_port: int = 0
    # Non-public addresses (loopback, private, link-local...) that deployer and channel URLs may
    # reach anyway (PIPELINES_OUTBOUND_ALLOW, comma-separated CIDRs); none by default.
    outbound_allow: tuple[IPv4Network | IPv6Network, ...] = ()
    # Browser origins allowed to call the API (PIPELINES_CORS_ORIGINS, comma-separated); none by default.
    cors_origins: tuple[str, ...] = ()
    # Request limits (a 413 above max_body_bytes, a 400 naming the limit otherwise).
    max_body_bytes: int = 10 * 1024 * 1024
    max_json_depth: int = 64
    max_stages: int = 200
    max_jobs: int = 200
    max_steps: int = 200
    max_matrix: int = 256
    max_variables: int = 200
    # Which script units the executor hands to agents (PIPELINES_RUN_ON_AGENTS): `labelled` (only
    # those with `runsOn`; the others run in the executor) or `all`.
    run_on_agents: str = "labelled"

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "max_stages", "max_jobs", "max_steps", "max_matrix"):
            if getattr(self, name) < 1:
                raise ValueError(f"PIPELINES_{name.upper()} must be at least 1, not {getattr(self, name)}")
        if not 1 <= self.notify_max_attempts <= 20:
            raise ValueError(f"PIPELINES_NOTIFY_MAX_ATTEMPTS must be 1-20, not {self.notify_max_attempts}")
        if not 0 <= self.notify_backoff <= 3600:
            raise ValueError(f"PIPELINES_NOTIFY_BACKOFF must be 0-3600 seconds, not {self.notify_backoff:g}")
        if not 0 < self.notify_timeout <= 600:
            raise ValueError(
                f"PIPELINES_NOTIFY_TIMEOUT must be more than 0 and at most 600 seconds, not {self.notify_timeout:g}"
            )
        if self.run_on_agents not in ("labelled", "all"):
            raise ValueError(f"PIPELINES_RUN_ON_AGENTS must be labelled or all, not {self.run_on_agents!r}")

    def servers_problem(self) -> str | None:
        """Why a service cannot start (no PostgreSQL or NATS URL), or None."""
        missing = [
            name
            for name, url in (("PIPELINES_DATABASE_URL", self.database_url), ("PIPELINES_NATS_URL", self.nats_url))
            if not url
        ]
        if not missing:
            return None
        return (
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set and no `make up` is running "
            f"for the data directory {self.data_dir.resolve()} (it writes {STACK_FILE} there): start `make up` "
            f"(with the same PIPELINES_DATA_DIR), or set {' and '.join(missing)}"
        )

    def definition_limits(self) -> Limits:
        """The definition size limits of PIPELINES_MAX_*."""
        return Limits(
            stages=self.max_stages,
            jobs=self.max_jobs,
            steps=self.max_steps,
            matrix=self.max_matrix,
            variables=self.max_variables,
        )

    @property
    def gateway_url(self) -> str:
        """The gateway's WebSocket URL as clients should use it."""
        if self.gateway_public_url:
            return self.gateway_public_url
        host = f"[{self.gateway_host}]" if ":" in self.gateway_host else self.gateway_host
        return f"ws://{host}:{self.gateway_port}/api/v1/ws"

    def nats_creds_for(self, service: str) -> Path | None:
        """The broker credential file `service` (api, relay, executor, gateway, projector) connects with."""
        return self.nats_service_creds.get(service, self.nats_creds)

    @property
    def public_broker_urls(self) -> tuple[str, ...]:
        if self.broker_urls:
            return self.broker_urls
        return tuple(without_userinfo(self.nats_url).split(","))

    @property
    def work_root(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.data_dir / "work"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        secret = e.get("PIPELINES_JWT_SECRET") or ""
        if not secret:
            warnings.warn(
                "PIPELINES_JWT_SECRET is not set: using an insecure development secret",
                stacklevel=2,
            )
            secret = DEV_JWT_SECRET
        data_dir = Path(e.get("PIPELINES_DATA_DIR", ".data"))
        # Never a guessed server (the machine's own PostgreSQL on 5432 is not ours): the URL given,
        # else the running `make up`'s of this data directory, else none (servers_problem() says so).
        stack = {} if e.get("PIPELINES_DATABASE_URL") and e.get("PIPELINES_NATS_URL") else running_stack_urls(data_dir)
        return cls(
            database_url=e.get("PIPELINES_DATABASE_URL") or stack.get("database", ""),
            nats_url=e.get("PIPELINES_NATS_URL") or stack.get("nats", ""),
            nats_creds=Path(e["PIPELINES_NATS_CREDS"]) if e.get("PIPELINES_NATS_CREDS") else None,
            nats_service_creds=nats_service_creds(e),
            broker_urls=tuple(u.strip() for u in e.get("PIPELINES_BROKER_URLS", "").split(",") if u.strip()),
            jwt_secret=secret,
            jwt_algorithm=e.get("PIPELINES_JWT_ALGORITHM", "HS256"),
            jwt_issuer=e.get("PIPELINES_JWT_ISSUER") or None,
            jwt_audience=e.get("PIPELINES_JWT_AUDIENCE") or None,
            api_host=e.get("PIPELINES_API_HOST", "127.0.0.1"),
            api_port=_int(e, "PIPELINES_API_PORT", 8080),
            gateway_host=e.get("PIPELINES_GATEWAY_HOST", "127.0.0.1"),
            gateway_port=_int(e, "PIPELINES_GATEWAY_PORT", 8081),
            gateway_public_url=e.get("PIPELINES_GATEWAY_PUBLIC_URL") or None,
            data_dir=data_dir,
            stage_timeout=_float(e, "PIPELINES_STAGE_TIMEOUT", 3600.0),
            kill_grace=_float(e, "PIPELINES_KILL_GRACE", 1.0),
            events_stream=e.get("PIPELINES_EVENTS_STREAM", "PIPELINES_EVENTS"),
            events_stream_replicas=max(1, _int(e, "PIPELINES_STREAM_REPLICAS", 1)),
            ack_wait=_float(e, "PIPELINES_ACK_WAIT", 30.0),
            max_log_bytes=_int(e, "PIPELINES_MAX_LOG_BYTES", 10 * 1024 * 1024),
            poll_interval=_float(e, "PIPELINES_POLL_INTERVAL", 0.5),
            lease_ttl=_float(e, "PIPELINES_LEASE_TTL", 10.0),
            sweep_interval=_float(e, "PIPELINES_SWEEP_INTERVAL", 1.0),
            secrets_key=e.get("PIPELINES_SECRETS_KEY") or None,
            script_user=e.get("PIPELINES_SCRIPT_USER") or default_script_user(),
            # An explicit PIPELINES_SCRIPT_USER means that user, unless a uid range is asked for too.
            script_uids=parse_uid_range(e["PIPELINES_SCRIPT_UIDS"])
            if e.get("PIPELINES_SCRIPT_UIDS")
            else None
            if e.get("PIPELINES_SCRIPT_USER")
            else default_script_uids(),
            git_allow_local=parse_path_list(e.get("PIPELINES_GIT_ALLOW_LOCAL", "")),
            git_user=e.get("PIPELINES_GIT_USER") or e.get("PIPELINES_SCRIPT_USER") or default_script_user(),
            script_max_procs=parse_limit(e, "PIPELINES_SCRIPT_MAX_PROCS", 4096),
            script_max_open_files=parse_limit(e, "PIPELINES_SCRIPT_MAX_OPEN_FILES", 4096),
            script_max_file_size=parse_limit(e, "PIPELINES_SCRIPT_MAX_FILE_SIZE", 4 * 1024**3, size=True),
            script_max_memory=parse_limit(e, "PIPELINES_SCRIPT_MAX_MEMORY", 8 * 1024**3, size=True),
            script_network=_network(e),
            work_dir=Path(e["PIPELINES_WORK_DIR"]) if e.get("PIPELINES_WORK_DIR") else None,
            notify_max_attempts=_int(e, "PIPELINES_NOTIFY_MAX_ATTEMPTS", 4),
            notify_backoff=_float(e, "PIPELINES_NOTIFY_BACKOFF", 1.0),
            notify_timeout=_float(e, "PIPELINES_NOTIFY_TIMEOUT", 10.0),
            metrics_host=e.get("PIPELINES_METRICS_HOST") or "127.0.0.1",
            executor_metrics_port=_port(e, "PIPELINES_EXECUTOR_METRICS_PORT"),
            relay_metrics_port=_port(e, "PIPELINES_RELAY_METRICS_PORT"),
            projector_metrics_port=_port(e, "PIPELINES_PROJECTOR_METRICS_PORT"),
            outbound_allow=parse_cidrs(e.get("PIPELINES_OUTBOUND_ALLOW", "")),
            cors_origins=tuple(o.strip() for o in e.get("PIPELINES_CORS_ORIGINS", "").split(",") if o.strip()),
            max_body_bytes=_int(e, "PIPELINES_MAX_BODY_BYTES", 10 * 1024 * 1024),
            max_json_depth=_int(e, "PIPELINES_MAX_JSON_DEPTH", 64),
            max_stages=_int(e, "PIPELINES_MAX_STAGES", 200),
            max_jobs=_int(e, "PIPELINES_MAX_JOBS", 200),
            max_steps=_int(e, "PIPELINES_MAX_STEPS", 200),
            max_matrix=_int(e, "PIPELINES_MAX_MATRIX", 256),
            max_variables=_int(e, "PIPELINES_MAX_VARIABLES", 200),
            run_on_agents=e.get("PIPELINES_RUN_ON_AGENTS") or "labelled",
        )
