"""The sandbox a run's steps run in: the run's own PID and mount namespaces (a fresh /proc, a
private /tmp), no network when asked, resource limits and the run's uid; built from util-linux
(`unshare`, `nsenter`, `mount`, `setpriv`, `setsid`) and the shell's `ulimit`. Each run's steps
are started by one runner per run, a small shell inside the sandbox that the executor drives over
a pipe. Without root, scripts run as before (logged once)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from infra import trace

log = logging.getLogger("pipelines.sandbox")

_TOOLS_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
GIB = 1024**3
# In the environment of a holder (not of its steps): which executor's work directory it serves.
LABEL_VARIABLE = "PIPELINES_SANDBOX_OF"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Limits:
    """Resource limits of a script (None: none). `procs` counts every process of the run's uid
    (RLIMIT_NPROC is per user), `memory` is each process's address space (RLIMIT_AS)."""

    procs: int | None = 4096
    open_files: int | None = 4096
    file_size: int | None = 4 * GIB
    memory: int | None = 8 * GIB


@dataclass(frozen=True)
class Sandbox:
    limits: Limits = Limits()
    # False: a network namespace of its own with only the loopback interface.
    network: bool = True


@functools.cache
def _tool(name: str) -> str | None:
    return shutil.which(name, path=_TOOLS_PATH)


@functools.cache
def unavailable() -> str | None:
    """Why scripts cannot be sandboxed on this host, or None when they can."""
    if os.geteuid() != 0:
        return "the executor is not root (namespaces and a uid per run need root)"
    missing = [t for t in ("unshare", "nsenter", "mount", "setpriv", "setsid") if _tool(t) is None]
    if missing:
        return f"{', '.join(missing)} (util-linux) not found in {_TOOLS_PATH}"
    return None


@functools.cache
def warn_unsandboxed(reason: str) -> None:
    """Say once per process that scripts run without the sandbox, and why."""
    log.warning("scripts run WITHOUT the sandbox (no PID namespace, shared /tmp, no resource limits): %s", reason)


def private_dir_of(workdir: Path) -> Path:
    """The run's private directory: its /tmp and the files its steps are run from. Beside the work
    directory (not in it, so a run's workspace holds only what its scripts put there)."""
    return private_root_of(workdir.parent) / workdir.name


def private_root_of(work_root: Path) -> Path:
    """Where the private directories of the runs under `work_root` are."""
    return work_root / ".sandbox"


def prologue(limits: Limits) -> str:
    """Shell that sets the limits, put before the script's first line (on that same line, so
    that the script's line numbers stay what they were). dash's ulimit takes one resource per
    call and, with neither -H nor -S, sets both: the script cannot raise them again. -p is
    RLIMIT_NPROC, -f is in 512-byte blocks, -v (RLIMIT_AS) in KiB."""
    parts = []
    if limits.procs is not None:
        parts.append(f"ulimit -p {limits.procs}")
    if limits.open_files is not None:
        parts.append(f"ulimit -n {limits.open_files}")
    if limits.file_size is not None:
        parts.append(f"ulimit -f {max(limits.file_size // 512, 1)}")
    if limits.memory is not None:
        parts.append(f"ulimit -v {max(limits.memory // 1024, 1)}")
    return "".join(f"{p} 2>/dev/null; " for p in parts)


@functools.cache
def hides_itself(private: Path) -> bool:
    """A private directory under /tmp (a work directory there: tests, a developer's data dir)
    would be hidden by the private /tmp mounted over it, with the run's workspace: such runs keep
    the host's /tmp (with TMPDIR pointing to their own), and a warning says so once."""
    hidden = Path(os.path.realpath(private)).is_relative_to("/tmp")
    if hidden:
        log.warning("the work directory is under /tmp: scripts keep the host's /tmp (TMPDIR is their own)")
    return hidden


def runner_init(limits: Limits) -> str:
    """What a run's runner runs: a shell, as the run's uid, in the run's working directory, with
    the run's limits (set once: every step inherits them and cannot raise them), `$1` the run's
    private directory relative to it. It says it is ready, then reads one line per command:

    - `R <id>`: start step `<id>`: a subshell forks the step (`setsid` makes it a process group
      of its own and execs `sh <id>.sh`, its output into the FIFOs `<id>.out` and `<id>.err` the
      executor reads), reports `P <id> <pid>`, waits for it and reports `E <id> <status>` (a line
      is written at once: reports of steps running side by side never interleave). The step's
      environment is not sourced here but by the step's own shell, on its script's first line
      (`step_prologue`): `setsid` then runs with the runner's environment, whose locale is C,
      instead of the step's (C.UTF-8: its setlocale() opened and mapped a dozen locale files per
      step).
    - `K <signal> <pgid>`: signal a step's process group (when the executor could not learn its
      pid on the host: a step that ended at once may have left children behind).

    At the end of its input (the executor closed it, or died) it waits for the steps still
    running (stop and the orphan sweep kill those of a dead executor) and exits; PID 1 then
    exits, and the kernel ends whatever is left in the namespace."""
    setsid = _tool("setsid")
    return (
        "p=$1; " + prologue(limits) + "echo ready; exec 2>/dev/null; "
        "while read -r op id arg; do case $op in "
        f'R) ( {setsid} /bin/sh "$p/$id.sh" </dev/null >"$p/$id.out" 2>"$p/$id.err" & '
        'echo "P $id $!"; wait $!; echo "E $id $?" ) & ;; '
        'K) kill -s "$id" -- "-$arg" ;; '
        "esac; done; wait"
    )


def holder_init(sandbox: Sandbox) -> str:
    """What PID 1 of a run's namespaces runs, as root (`$1` is the runner's text). Started ahead
    of need, it waits for its run: four lines (the directory to mount on /tmp or `-`, the run's
    working directory, its private directory relative to that, the runner's `uid gid` or `-` to
    stay root); then it starts the run's runner with its own input and output (the executor's
    pipes), lets go of them and waits for the runner, reaping the orphans the run's steps leave
    (a zombie still counts against the process limit); as PID 1 it ignores signals it has no
    handler for. When the runner ends, so does PID 1 and with it the namespace. If the executor
    dies before giving it a run, the lines never come (end of file) and it exits."""
    lines = ["set -e", "runner=$1"]
    # A /tmp of its own, mounted ahead of need (`$2`, when given): the run's /tmp directory is then
    # this one, renamed into the run's private directory (`=`), and no mount is left to do.
    lines.append(f'[ -z "$2" ] || {{ {_tool("mount")} --bind "$2" /tmp; echo mounted; }}')
    if not sandbox.network and _tool("ip") is not None:
        lines.append(f"{_tool('ip')} link set lo up")
    lines += [
        "IFS= read -r tmp",
        "IFS= read -r dir",
        "IFS= read -r private",
        "read -r uid gid",
        f'[ "$tmp" = - ] || [ "$tmp" = = ] || {_tool("mount")} --bind "$tmp" /tmp',
        'cd "$dir"',
        # Nothing of ours in the steps' environment (cd exported OLDPWD).
        f"unset OLDPWD {LABEL_VARIABLE}",
        # A command run in the background reads /dev/null unless told otherwise: hand it our input.
        "exec 3<&0",
        'if [ "$uid" = - ]; then /bin/sh -c "$runner" pipelines-runner "$private" <&3 3<&- &',
        # `unshare -S/-G` (no namespace: only the uid, gid and no supplementary group) rather than
        # `setpriv --reuid`, which looks a numeric uid up by name first (the host's NSS modules: ~2
        # ms of CPU). The capabilities go with the uid; no_new_privs, set before `unshare` started
        # (see RunSandboxes._spawn_holder), makes setuid and file capabilities grant nothing.
        f'else {_tool("unshare")} -S "$uid" -G "$gid" -- /bin/sh -c "$runner" pipelines-runner "$private" <&3 3<&- &',
        "fi",
        "r=$!",
        "exec 3<&- </dev/null >/dev/null 2>&1",
        "set +e",
        "wait $r",
    ]
    return "\n".join(lines)


class SandboxError(Exception):
    """A run's sandbox could not be started."""


Ids = tuple[int, int]  # uid, gid


def step_prologue(limits: Limits) -> str:
    """Shell put before a sandboxed script's first line (on that line: its line numbers stay): it
    exports the step's environment from the file beside the script (`write_env`: `$0` is
    `<dir>/<id>.sh`, the file `<dir>/<id>.env`; a file that cannot be read ends the step, as
    `.` does in sh), then sets the limits (`prologue`)."""
    return '. "${0%sh}env"; ' + prologue(limits)


# Set by the step's shell at its start: sourced after it, a run variable of that name would
# replace the shell's own value (an inherited one the shell resets, as it did when the runner
# sourced the file before starting the step).
_SHELL_MANAGED = frozenset({"PPID", "PWD"})


def write_env(private: Path, step_id: str, env: Mapping[str, str], owner: Ids | None) -> Path:
    """The step's environment as a file the step's shell sources first (`step_prologue`; mode
    0400, the step's user's): its secrets are never on a command line. Created exclusively, never
    through a link.
    A name the shell cannot export (not an identifier) is left out: sh could not name it either."""
    text = "".join(
        f"export {name}='{value.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}'\n"
        for name, value in env.items()
        if _NAME.fullmatch(name) and name not in _SHELL_MANAGED
    )
    path = private / f"{step_id}.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        os.write(fd, text.encode())
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    return path


class RunnerStep:
    """A step the run's runner started: its output (two FIFOs the executor reads), its pid on
    this host (also its process group), its exit status.

    The executor opens each FIFO for reading before the step exists, and for writing too (a
    `keeper`): without a writer, a FIFO reads as ended before the step has even opened it. The
    keepers are closed once the step has exited (`release`): the output then ends when the last
    process holding it (the step, children it left behind) is gone, as with a pipe."""

    def __init__(self, held: _Held, step_id: str, files: list[Path]) -> None:
        self._held = held
        self.id = step_id
        self._files = files
        self._keepers: list[int] = []
        self._fds: list[int] = []  # read ends not yet given to a transport
        self._transports: list[asyncio.ReadTransport] = []
        self.stdout = asyncio.StreamReader(limit=2**20)
        self.stderr = asyncio.StreamReader(limit=2**20)
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self._exit: asyncio.Future[int | None] = loop.create_future()
        self.ns_pid: int | None = None
        self.pid: int | None = None  # on this host: what stop, timeouts and the orphan sweep kill
        self.returncode: int | None = None

    def prepare(self, private: Path, owner: Ids | None) -> None:
        """Make the step's FIFOs and open them (before the runner is told to start it)."""
        for suffix in (".out", ".err"):
            path = private / f"{self.id}{suffix}"
            os.mkfifo(path, 0o600)
            self._files.append(path)
            if owner is not None:
                os.chown(path, *owner, follow_symlinks=False)
            self._fds.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW))
            self._keepers.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW))

    async def connect(self) -> None:
        """Read the FIFOs (while the runner starts the step: what it writes meanwhile waits in them)."""
        loop = asyncio.get_running_loop()
        fds, self._fds = self._fds, []
        connected = await asyncio.gather(
            *(
                loop.connect_read_pipe(functools.partial(asyncio.StreamReaderProtocol, reader), os.fdopen(fd, "rb", 0))
                for fd, reader in zip(fds, (self.stdout, self.stderr), strict=True)
            ),
            return_exceptions=True,
        )
        for result in connected:
            if isinstance(result, BaseException):
                raise result
            self._transports.append(result[0])

    def _started(self, ns_pid: int) -> None:
        self.ns_pid = ns_pid
        # Now, while the step cannot have been reaped yet (its subshell reaps it after this line).
        with contextlib.suppress(SandboxError, OSError):
            self.pid = _host_pid(self._held.runner, ns_pid)
        if not self.started.done():
            self.started.set_result(None)

    def _exited(self, status: int | None) -> None:
        self.returncode = status
        if not self.started.done():
            self.started.set_result(None)
        if not self._exit.done():
            self._exit.set_result(status)

    @property
    def problem(self) -> str:
        """Why the run's sandbox ended, when it said so."""
        return self._held.problem

    async def wait(self) -> int | None:
        """The step's exit status (128 + n when killed by signal n); None when its sandbox ended
        before it did."""
        return await asyncio.shield(self._exit)

    def signal(self, sig: int) -> None:
        """Signal the step's process group (the step itself while it has none yet: between its
        fork and its `setsid`)."""
        if self.pid is not None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                # Not yet reaped (no report of its end): the pid is still the step's, not reused.
                if not self._exit.done():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(self.pid, sig)
            except PermissionError:
                pass
        elif self.ns_pid is not None:
            with contextlib.suppress(SandboxError):  # the runner is gone, and its steps with it
                self._held.send(f"K {signal.Signals(sig).name[3:]} {self.ns_pid}\n")

    def release(self) -> None:
        """The step has exited: its output ends once nothing holds it any more."""
        for fd in self._keepers:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._keepers.clear()

    def close(self) -> None:
        self.release()
        for transport in self._transports:
            transport.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._held.steps.pop(self.id, None)
        for path in self._files:
            with contextlib.suppress(OSError):
                path.unlink()


@dataclass
class _Held:
    """One run's sandbox held by this process: `unshare` (the executor's child, whose child is
    PID 1 of the run's namespaces, whose child is the run's runner) and the steps the runner is
    running. Steps are sent before the runner has said it is ready (they wait in its input)."""

    proc: asyncio.subprocess.Process
    uid: int | None
    ready: asyncio.Future[None]
    steps: dict[str, RunnerStep] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    ended: bool = False
    problem: str = ""  # why it ended, when it said so
    leftover: Path | None = None  # a spare's own /tmp, under the run's: removed once it has ended
    _runner: int | None = None

    @property
    def alive(self) -> bool:
        return not self.ended and self.proc.returncode is None

    @property
    def runner(self) -> int:
        """The runner's pid on this host (known once it has said anything)."""
        if self._runner is None:
            self._runner = _child_of(_child_of(self.proc.pid))
        return self._runner

    async def pid1(self) -> int:
        await asyncio.wait_for(asyncio.shield(self.ready), 10)
        return _child_of(self.proc.pid)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode())
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:  # RuntimeError: closed
            self.end()
            raise SandboxError(f"the run's sandbox has ended: {exc}") from exc

    async def read_reports(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        try:
            while line := await self.proc.stdout.readline():
                what, _, rest = line.decode(errors="replace").strip().partition(" ")
                if what == "ready" and not self.ready.done():
                    trace.mark("sandbox ready")
                    # Now PID 1 has one child, the runner: no step has left an orphan to it yet.
                    with contextlib.suppress(SandboxError, OSError):
                        self._runner = _child_of(_child_of(self.proc.pid))
                    self.ready.set_result(None)
                    continue
                step_id, _, value = rest.partition(" ")
                step = self.steps.get(step_id)
                if step is None or not value.lstrip("-").isdigit():
                    continue
                if what == "P":
                    step._started(int(value))
                elif what == "E":
                    step._exited(int(value))
            if not self.ready.done():  # it did not start: say why (setpriv, mount, cd)
                with contextlib.suppress(TimeoutError):
                    said = await asyncio.wait_for(self.proc.stderr.read(4096), 2)
                    self.problem = said.decode(errors="replace").strip()
        finally:
            self.end()
            self.remove_leftover()  # its output has ended: so has PID 1, and the namespace

    def remove_leftover(self) -> None:
        if self.leftover is not None:
            _rmdir(self.leftover)
            self.leftover = None

    def end(self) -> None:
        """The runner is gone (or going): the steps it was running are over as far as it can say."""
        self.ended = True
        if not self.ready.done():
            self.ready.set_exception(SandboxError(f"the run's sandbox did not start: {self.problem or 'it ended'}"))
            self.ready.exception()  # retrieved: nobody may be waiting for it
        for step in list(self.steps.values()):
            step._exited(None)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()  # unshare: --kill-child ends PID 1, and the namespace with it
        if self.reader is not None:
            self.reader.cancel()
        self.end()


class RunSandboxes:
    """One sandbox per run on this host: starting one costs more than a step (new namespaces, a
    mount, a runner), starting a step in one costs a fork and two execs (see `make bench`).

    The sandbox is held by a process of its own (`unshare`, whose child is PID 1 of the run's
    PID namespace, in the run's mount namespace and, with no network, its network namespace).
    PID 1 starts the run's runner (`runner_init`), which starts each step. Killing `unshare`
    kills PID 1 (--kill-child), and the kernel then kills everything left in the namespace.
    `close` does that when the run ends, from any executor process of the host (the holder's pid
    is kept in a directory only root reads); `aclose` for every run this process holds, when it
    stops. A step of a user other than the runner's (a step plugin run as the service's user)
    enters the sandbox on its own instead (`enter`: nsenter, setpriv), as every step did before
    runners (`runner=False` keeps that, for comparison)."""

    def __init__(
        self, sandbox: Sandbox, *, label: str = "", runner: bool = True, spare_dir: Path | None = None
    ) -> None:
        self.sandbox = sandbox
        # Where a spare keeps the /tmp it mounts ahead of need (beside the runs' private
        # directories: renamed into one, it becomes that run's /tmp). None: mounted at the start.
        self.spare_dir = spare_dir
        self._spare_tmp: dict[int, Path] = {}  # the spares' own /tmp, by pid
        self._leftover: Path | None = None  # a spare's own /tmp that a run's was mounted over
        # Set in the environment of this process's holders (not their steps'): a test can tell
        # its own from those of other executors of the host.
        self.label = label
        self.runner = runner
        self._held: dict[Path, _Held] = {}
        self._locks: dict[Path, asyncio.Lock] = {}
        # A holder started ahead of need, so that a run's first step does not wait for one.
        self._spare: asyncio.Task[asyncio.subprocess.Process] | None = None

    def prologue(self) -> str:
        """What a script run in this sandbox starts with (`step_prologue`): its environment file
        (`write_env`) must be beside it."""
        return step_prologue(self.sandbox.limits)

    async def _held_for(self, private: Path, tmp: Path, workdir: Path, owner: Ids | None) -> _Held:
        lock = self._locks.setdefault(private, asyncio.Lock())
        async with lock:
            held = self._held.get(private)
            if held is None or not held.alive:
                if held is not None:
                    held.kill()
                held = await self._start(private, tmp, workdir, owner)
                self._held[private] = held
                if len(self._held) > 1000:  # runs that ended on another executor, which killed their holder
                    for key in [k for k, h in self._held.items() if not h.alive]:
                        del self._held[key]
                        self._locks.pop(key, None)
        return held

    async def start(
        self, private: Path, tmp: Path, workdir: Path, owner: Ids | None, script: Path
    ) -> RunnerStep | None:
        """Start the step `script` (in `private`, its environment file beside it: `write_env`) in
        the run's sandbox (started when it has none yet), by its runner; None when the runner runs
        as another user than `owner` (then `enter` the sandbox)."""
        if not self.runner:
            return None
        held = await self._held_for(private, tmp, workdir, owner)
        trace.mark("sandbox held")
        if held.uid != (None if owner is None else owner[0]):
            return None
        step_id = script.stem
        step = RunnerStep(held, step_id, [])
        held.steps[step_id] = step
        try:
            step.prepare(private, owner)
            held.send(f"R {step_id}\n")
            await step.connect()
        except BaseException:
            step.close()
            raise
        return step

    async def enter(
        self, private: Path, tmp: Path, workdir: Path, command: list[str], owner: Ids | None = None
    ) -> list[str]:
        """The argv that runs `command` in the run's sandbox (started when it has none yet)."""
        held = await self._held_for(private, tmp, workdir, owner)
        nsenter = _tool("nsenter")
        assert nsenter is not None
        flags = ["--pid", "--mount"] + ([] if self.sandbox.network else ["--net"])
        return [nsenter, f"--target={await held.pid1()}", *flags, f"--wdns={workdir}", "--", *command]

    async def close(self, private: Path) -> None:
        """End the run's sandbox and everything still running in it."""
        self._locks.pop(private, None)
        held = self._held.pop(private, None)
        if held is not None:
            held.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.proc.wait(), 5)
            held.remove_leftover()
        await asyncio.to_thread(_kill_recorded, private)

    async def aclose(self) -> None:
        """End the spare holder and the sandbox of every run this process holds (this executor
        is stopping: its runs are recorded as stopped and continue elsewhere, or here after a
        restart, in a sandbox of their own). Waits for nothing but their end, a few seconds at
        most: never for a spare to become ready."""
        spare, self._spare = self._spare, None
        if spare is not None:
            if not spare.done():  # still being spawned: killed as soon as it exists
                spare.add_done_callback(self._kill_spare)
            elif not spare.cancelled() and spare.exception() is None:
                _kill_spawned(spare)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(spare.result().wait(), 5)
                self._forget_tmp(spare.result().pid)
        held = list(self._held.items())
        self._held.clear()
        self._locks.clear()
        for _, h in held:
            h.kill()
        for private, h in held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(h.proc.wait(), 5)
            h.remove_leftover()
            _record_path(private).unlink(missing_ok=True)

    async def _holder(self) -> asyncio.subprocess.Process:
        unshare = _tool("unshare")
        assert unshare is not None
        flags = ["--pid", "--fork", "--kill-child", "--mount-proc", "--propagation=private"]
        if not self.sandbox.network:
            flags.append("--net")
        tmp: Path | None = None
        if self.spare_dir is not None and not hides_itself(self.spare_dir):
            tmp = self.spare_dir / f".spare-{secrets.token_hex(8)}"
            try:
                self.spare_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
                tmp.mkdir(mode=0o700)
            except OSError:
                tmp = None
        try:
            proc = await self._spawn_holder(unshare, flags, tmp)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.rmdir()
            raise
        if tmp is not None:
            self._spare_tmp[proc.pid] = tmp
        return proc

    async def _spawn_holder(self, unshare: str, flags: list[str], tmp: Path | None) -> asyncio.subprocess.Process:
        setpriv = _tool("setpriv")
        assert setpriv is not None
        return await asyncio.create_subprocess_exec(
            # Inherited by everything in the sandbox: its steps gain nothing from setuid or file
            # capabilities (root keeps its own: PID 1 still mounts and switches to the run's uid).
            setpriv,
            "--no-new-privs",
            "--inh-caps=-all",
            "--",
            unshare,
            *flags,
            "--",
            "/bin/sh",
            "-c",
            holder_init(self.sandbox),
            "pipelines-sandbox",
            runner_init(self.sandbox.limits),
            *([] if tmp is None else [str(tmp)]),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": _TOOLS_PATH, LABEL_VARIABLE: self.label},
            cwd="/",
            start_new_session=True,  # not in the executor's process group: its signals are not the run's
            close_fds=True,
        )

    async def _take_spare(self) -> asyncio.subprocess.Process:
        # The next spare is started once this run's sandbox is ready (`_start`), not meanwhile: on
        # a busy host it would slow down the start it is meant to save.
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(OSError):
                proc = await spare
                if proc.returncode is None:
                    return proc
                self._forget_tmp(proc.pid)
        return await self._holder()

    async def _start(self, private: Path, tmp: Path, workdir: Path, owner: Ids | None) -> _Held:
        _kill_recorded(private)  # a holder left by an executor that died (a stat when there is none)
        if "\n" in str(workdir) or "\n" in str(tmp):
            raise SandboxError("the work directory's path has a line break")
        proc = await self._take_spare()
        assert proc.stdin is not None
        held = _Held(
            proc=proc, uid=None if owner is None else owner[0], ready=asyncio.get_running_loop().create_future()
        )
        try:
            lines = [
                "-" if hides_itself(private) else await self._take_tmp(proc, tmp, owner),
                str(workdir.absolute()),
                os.path.relpath(private, workdir.absolute()),
                "-" if owner is None else f"{owner[0]} {owner[1]}",
            ]
            # Not waiting for it to be ready: the run's first step follows at once (a failure to
            # start ends its output, and the step's outcome says why).
            held.send("".join(f"{line}\n" for line in lines))
            _record(private, proc.pid)
        except BaseException:
            held.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            raise
        held.reader = asyncio.create_task(held.read_reports())
        held.ready.add_done_callback(self._spare_after)
        held.leftover, self._leftover = self._leftover, None
        return held

    async def _take_tmp(self, proc: asyncio.subprocess.Process, tmp: Path, owner: Ids | None) -> str:
        """What the holder mounts on /tmp: `=` when the /tmp it mounted ahead of need became the
        run's (renamed over the run's still empty /tmp directory), else the run's directory."""
        own = self._spare_tmp.pop(proc.pid, None)
        if own is None:
            return str(tmp)
        assert proc.stdout is not None
        mounted = False
        try:
            # Said long ago by a spare: at once. Never renamed before it is mounted.
            mounted = await asyncio.wait_for(proc.stdout.readline(), 10) == b"mounted\n"
        finally:
            if not mounted:
                with contextlib.suppress(OSError):
                    own.rmdir()
        if not mounted:
            raise SandboxError("the run's sandbox did not start: it could not mount its /tmp")
        try:
            os.rename(own, tmp)  # only over an empty directory: a run's /tmp is never lost
        except OSError:
            # The run's /tmp is mounted over it: it goes when the sandbox has ended (removing it
            # sooner would unmount what is mounted on it).
            self._leftover = own
            return str(tmp)
        if owner is not None:
            os.chown(tmp, *owner, follow_symlinks=False)
        return "="

    def _kill_spare(self, task: asyncio.Task[asyncio.subprocess.Process]) -> None:
        _kill_spawned(task)
        if not task.cancelled() and task.exception() is None:
            self._forget_tmp(task.result().pid)

    def _forget_tmp(self, pid: int) -> None:
        own = self._spare_tmp.pop(pid, None)
        if own is not None:
            with contextlib.suppress(OSError):
                own.rmdir()

    def _spare_after(self, ready: asyncio.Future[None]) -> None:
        # The next spare starts once this run's sandbox is ready, not meanwhile: on a busy host it
        # would slow down the start it is meant to save.
        if self._spare is None and not ready.cancelled() and ready.exception() is None:
            self._spare = asyncio.create_task(self._holder())


def _kill_spawned(task: asyncio.Task[asyncio.subprocess.Process]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        task.result().kill()


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _host_pid(runner: int, ns_pid: int) -> int | None:
    """The pid on this host of the runner's grandchild whose pid in the run's namespace is
    `ns_pid` (the runner's subshell forked it), or None when it is gone."""
    for subshell in _children(runner):
        for pid in _children(subshell):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    if line.split()[-1] == str(ns_pid):
                        return pid
                    break
    return None


def _child_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise SandboxError(f"the run's sandbox has {len(children)} init processes")
    return int(children[0])


def _record_path(private: Path) -> Path:
    return private.parent / ".holders" / private.name


def _started(pid: int) -> str:
    """The process's start time (clock ticks after boot): with the pid, names it (pids are reused)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


def _record(private: Path, pid: int) -> None:
    path = _record_path(private)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(f"{pid} {_started(pid)}\n")


def _kill_recorded(private: Path) -> None:
    """Kill the holder recorded for this run, if that pid is still its holder (not reused)."""
    path = _record_path(private)
    try:
        pid, started = path.read_text().split()
        if _started(int(pid)) == started:
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    path.unlink(missing_ok=True)


def setpriv_argv(uid: int, gid: int) -> list[str] | None:
    setpriv = _tool("setpriv")
    if setpriv is None:
        return None
    # setpriv drops to the user (no supplementary groups, no capabilities) after the spawn, so
    # Python can spawn without a full fork(): about 3x cheaper per script.
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


@functools.cache
def others_can_run_python() -> bool:
    """Whether another uid can run this service's interpreter (step plugins run in it): every
    directory on the way to it, its prefixes and the executable itself searchable by others."""
    paths = {Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(sys.base_prefix)}
    for path in paths:
        for p in (path, *path.parents):
            try:
                if not os.stat(p).st_mode & stat.S_IXOTH:
                    return False
            except OSError:
                return False
    return True
