"""The executor: reacts to run events from JetStream and runs stages for real.

Every step is decided by the Run decider against the run stream's current version: the
executor asks to `Advance` (start the run, the next stage, or finish it) and records a stage's
outcome with `CompleteStage`. Both are appended under optimistic concurrency, so a redelivered
message, or a second executor, cannot start a stage twice: the loser's append fails, it reloads,
and sees the stage already running or done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from domain import run as rn
from domain.errors import NotFound, Refused
from domain.stages import Stage
from infra.bus import log_subject
from infra.commands import Commands, ConcurrencyConflict
from infra.config import Settings
from infra.delivery import Deliveries
from infra.leases import Lease, LeaseStore
from infra.masking import Masker
from infra.pg_store import PostgresEventStore
from infra.script_runner import ScriptOutcome, ScriptRun, clean_env
from infra.secrets import SecretStore, SecretsUnavailable

log = logging.getLogger("pipelines.executor")

RUN_EVENTS_FILTER = "pipelines.v1.*.run.*.*"
STOP_SUBJECT = "pipelines.v1.*.run.*.run_stopped"
CONSUMER = "executor"
_json = msgspec.json.Encoder()


class RunLog:
    """Buffers a run's log lines and appends them in chunks (every `interval` or `max_lines`),
    capped at `max_bytes` per run with a marker where the log was cut."""

    def __init__(
        self,
        commands: Commands,
        state: rn.RunState,
        *,
        max_bytes: int,
        publish: Callable[[bytes], Awaitable[None]] | None,
        interval: float = 0.05,
        max_lines: int = 500,
        masker: Masker | None = None,
    ) -> None:
        self._commands = commands
        self._masker = masker
        self._state = state
        self._max_bytes = max_bytes
        self._publish = publish
        self._interval = interval
        self._max_lines = max_lines
        self._buffer: list[tuple[str | None, rn.LogLine]] = []
        self._bytes = 0
        self._cut = False
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def line(self, stage_id: str | None, stream: Literal["stdout", "stderr", "system"], text: str) -> None:
        if self._cut:
            return
        if self._masker is not None:
            text = self._masker.mask(text)
        size = len(text.encode()) + 1
        if self._bytes + size > self._max_bytes and stream != "system":
            self._cut = True
            text = f"[log truncated: this run's log reached the limit of {self._max_bytes} bytes]"
            stream = "system"
        self._bytes += size
        self._buffer.append((stage_id, rn.LogLine(stream, text)))
        if len(self._buffer) >= self._max_lines:
            self._wake.set()

    async def _loop(self) -> None:
        # Never cancelled mid-flush: a flush swaps the buffer out before it appends, so a cancel
        # there would lose those lines. close() asks the loop to finish instead.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not self._buffer:
            return
        buffer, self._buffer = self._buffer, []
        chunks = chunk_lines(buffer, self._commands.now())
        # One append of at most a few chunks at a time keeps every stored event and every
        # transaction small (events are published on NATS, whose messages are capped at 1 MB).
        for start in range(0, len(chunks), 8):
            group = chunks[start : start + 8]
            for attempt in range(5):
                try:
                    await self._commands.append_logs(self._state, group)
                    break
                except Exception as exc:  # keep the lines; try again
                    log.warning("log append failed (attempt %d): %s", attempt + 1, exc)
                    await asyncio.sleep(0.2 * (attempt + 1))
        if self._publish is not None:
            for c in chunks:
                payload = {
                    "runId": self._state.run_id,
                    "stage": c.stage_id,
                    "lines": [{"stream": ln.stream, "text": ln.text} for ln in c.lines],
                }
                with contextlib.suppress(Exception):
                    await self._publish(_json.encode(payload))

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()


# A log event holds at most this many bytes of text (one over-long line is cut at MAX_LINE already).
MAX_CHUNK_BYTES = 256 * 1024


def chunk_lines(buffer: list[tuple[str | None, rn.LogLine]], at: datetime) -> list[rn.LogAppended]:
    """Consecutive lines of one stage, in chunks of at most MAX_CHUNK_BYTES of text."""
    chunks: list[rn.LogAppended] = []
    current: list[rn.LogLine] = []
    current_stage: str | None = None
    size = 0
    for stage_id, line in buffer:
        n = len(line.text) + 16
        if current and (stage_id != current_stage or size + n > MAX_CHUNK_BYTES):
            chunks.append(rn.LogAppended(stage_id=current_stage, lines=tuple(current), at=at))
            current, size = [], 0
        current_stage = stage_id
        current.append(line)
        size += n
    if current:
        chunks.append(rn.LogAppended(stage_id=current_stage, lines=tuple(current), at=at))
    return chunks


@dataclass
class _Driver:
    task: asyncio.Task[None] | None = None
    dirty: bool = False
    messages: list[Msg] = field(default_factory=list)
    script: ScriptRun | None = None
    stop_requested: bool = False


class Executor:
    def __init__(
        self,
        commands: Commands,
        settings: Settings,
        nc: NATS | None = None,
        leases: LeaseStore | None = None,
        secrets: SecretStore | None = None,
    ) -> None:
        self.commands = commands
        self.settings = settings
        self.nc = nc
        self.leases = leases
        self.secrets = secrets
        self._purged_at = 0.0
        self.executor_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._drivers: dict[str, _Driver] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Stage attempts this process is running right now: (run, stage, attempt).
        self._running: set[tuple[str, str, int]] = set()
        self.workdir = settings.work_root
        # Deploy and notify stages need the registry's tables (PostgreSQL).
        self.deliveries: Deliveries | None = (
            Deliveries(commands, commands.store.pool, settings.database_url, nc, sealer=secrets)
            if isinstance(commands.store, PostgresEventStore)
            else None
        )

    # ---- consuming JetStream -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        config = ConsumerConfig(
            durable_name=CONSUMER,
            filter_subject=RUN_EVENTS_FILTER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.settings.ack_wait,
            max_ack_pending=10_000,
        )
        try:
            await js.consumer_info(self.settings.events_stream, CONSUMER)
        except NotFoundError:
            with contextlib.suppress(Exception):
                await js.add_consumer(self.settings.events_stream, config)
        sub = await js.pull_subscribe_bind(CONSUMER, self.settings.events_stream)
        # Every executor hears every stop, whichever of them the durable consumer gave it to:
        # only the one running the stage can kill its process group.
        stops = await self.nc.subscribe(STOP_SUBJECT, cb=self._on_stop)
        heartbeat = asyncio.create_task(self._heartbeat())
        sweeper = asyncio.create_task(self._sweeper())
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(256, timeout=1.0)
                except TimeoutError:
                    continue
                except Exception as exc:
                    log.warning("fetch failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    self.on_message(msg)
        finally:
            heartbeat.cancel()
            sweeper.cancel()
            await self.drain()
            for subscription in (sub, stops):
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    def on_message(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) != 6:
            self._spawn(msg.ack())
            return
        run_id, event_type = parts[4], parts[5]
        driver = self.kick(run_id)
        driver.messages.append(msg)
        if event_type == "run_stopped":
            self.stop_local(run_id)

    async def _on_stop(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) == 6:
            self.stop_local(parts[4])

    def stop_local(self, run_id: str) -> None:
        """Kill the run's script if this process runs it (TERM, then KILL after the grace period)."""
        driver = self._drivers.get(run_id)
        if driver is None:
            return
        driver.stop_requested = True
        if driver.script is not None:
            self._spawn(driver.script.stop())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def kick(self, run_id: str) -> _Driver:
        """Make sure the run is being driven; a run already being driven looks again when done."""
        driver = self._drivers.get(run_id)
        if driver is None:
            driver = _Driver()
            self._drivers[run_id] = driver
            driver.task = asyncio.create_task(self._drive(run_id, driver), name=f"run-{run_id}")
        else:
            driver.dirty = True
        return driver

    async def _heartbeat(self) -> None:
        # Long stages keep their messages from being redelivered to another executor, and their
        # leases from expiring.
        interval = max(min(self.settings.ack_wait, self.settings.lease_ttl) / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            if self.leases is not None:
                try:
                    await self.leases.heartbeat(self.executor_id, self.settings.lease_ttl)
                except Exception as exc:
                    log.warning("lease heartbeat failed: %s", exc)
            for driver in list(self._drivers.values()):
                for msg in driver.messages:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    # ---- lost executors and timers -----------------------------------------------------------

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sweep failed: %s", exc)

    async def sweep_once(self) -> None:
        """Recover stages whose executor was lost; fire due retries and approval timeouts; now and
        then, delete the secrets of runs that ended (or never got recorded)."""
        now = asyncio.get_running_loop().time()
        if self.secrets is not None and now - self._purged_at > 60:
            self._purged_at = now
            await self.secrets.purge(older_than=600)
        if self.leases is None:
            return
        for lease in await self.leases.claim_expired(self.executor_id, hold=self.settings.lease_ttl):
            if (lease.run_id, lease.stage_id, lease.attempt) in self._running:
                continue  # ours after all (a slow heartbeat); the claim renewed it
            await self.recover(lease)
        for timer in await self.leases.claim_due(hold=max(30.0, self.settings.lease_ttl)):
            try:
                if timer.kind == "approval":
                    with contextlib.suppress(Refused, NotFound):
                        await self.commands.run_command(timer.run_id, functools.partial(_expire, timer.key))
                else:
                    self.kick(timer.run_id)
            finally:
                await self.leases.done(timer)

    async def recover(self, lease: Lease) -> None:
        """A stage attempt whose executor stopped renewing its lease: make sure nothing of it still
        runs here, record the attempt as failed (its retry policy decides what next), go on."""
        assert self.leases is not None
        if lease.host == self.host and lease.pgid:
            await kill_orphan(lease.pgid, lease.run_id, self.settings.kill_grace)
        try:
            state, _ = await self.commands.load_run(lease.run_id)
            sr = state.stage_runs[state.stage_index(lease.stage_id)] if state.exists else None
            if sr is not None and sr.status == "running" and sr.attempt == lease.attempt:
                message = (
                    f"executor lost: the executor running stage {lease.stage_id} (attempt {lease.attempt}) "
                    f"on {lease.host} stopped renewing its lease"
                )
                await self.commands.append_logs(
                    state,
                    [
                        rn.LogAppended(
                            stage_id=lease.stage_id, lines=(rn.LogLine("system", message),), at=self.commands.now()
                        )
                    ],
                )
                with contextlib.suppress(Refused):
                    await self.commands.run_command(
                        lease.run_id,
                        lambda at: rn.CompleteStage(
                            stage_id=lease.stage_id, attempt=lease.attempt, succeeded=False, error=message, at=at
                        ),
                        before_append=self._take_leases,
                        lost_race=self._drop_leases,
                    )
        finally:
            await self.leases.release(lease.run_id, lease.stage_id, lease.attempt)
        self.kick(lease.run_id)

    def _new_stage_attempts(self, state: rn.RunState, new: list[rn.RunEvent]) -> list[tuple[str, int]]:
        return [
            (e.stage_id, e.attempt)
            for e in new
            if isinstance(e, rn.StageStarted) and state.stage(e.stage_id).type != "approval"
        ]

    async def _take_leases(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        # Taken before the StageStarted append commits: a started stage always has a lease, so an
        # executor that dies right after the commit is still noticed.
        if self.leases is None:
            return
        for stage_id, attempt in self._new_stage_attempts(state, new):
            await self.leases.acquire(
                state.run_id, stage_id, attempt, self.executor_id, self.host, self.settings.lease_ttl
            )

    async def _drop_leases(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        if self.leases is None:
            return
        for stage_id, attempt in self._new_stage_attempts(state, new):
            await self.leases.release(state.run_id, stage_id, attempt)

    async def _schedule_timers(self, state: rn.RunState) -> None:
        if self.leases is None:
            return
        retry_at = state.next_retry_at
        if retry_at is not None:
            stage_id = next(sr.stage_id for sr in state.stage_runs if sr.status == "queued")
            await self.leases.schedule(state.run_id, "retry", stage_id, retry_at)
        gate = state.active_stage
        if state.status == "waiting_approval" and gate is not None and gate.started_at is not None:
            timeout = state.stage(gate.stage_id).timeout
            if timeout is not None:
                await self.leases.schedule(
                    state.run_id, "approval", gate.stage_id, gate.started_at + timedelta(seconds=timeout)
                )

    async def drain(self) -> None:
        tasks = [d.task for d in self._drivers.values() if d.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drive(self, run_id: str, driver: _Driver) -> None:
        try:
            while True:
                driver.dirty = False
                try:
                    await self.drive_once(run_id, driver)
                except (NotFound, ConcurrencyConflict) as exc:
                    log.warning("run %s: %s", run_id, exc)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("run %s: driving failed", run_id)
                    await asyncio.sleep(1)
                    driver.dirty = True
                if not driver.dirty:
                    break
        finally:
            if self._drivers.get(run_id) is driver:
                del self._drivers[run_id]
            for msg in driver.messages:
                with contextlib.suppress(Exception):
                    await msg.ack()

    # ---- driving a run -----------------------------------------------------------------------

    async def _advance(self, run_id: str) -> tuple[rn.RunState, list[rn.RunEvent]]:
        return await self.commands.run_command(
            run_id, lambda at: rn.Advance(at=at), before_append=self._take_leases, lost_race=self._drop_leases
        )

    async def drive_once(self, run_id: str, driver: _Driver | None = None) -> rn.RunState:
        """Take the run as far as it can go now: start it, run stages, finish it."""
        state, _ = await self.commands.load_run(run_id)
        if not state.exists:
            raise NotFound(f"run {run_id} not found")
        if state.status == "queued":
            pipeline, _ = await self.commands.load_pipeline(state.pipeline_id)
            if not pipeline.live:
                state, _ = await self.commands.run_command(
                    run_id, lambda at: rn.Cancel(by="system", reason="pipeline deleted", at=at)
                )
                return state
        state, new = await self._advance(run_id)
        while True:
            job = self._started_job(state, new)
            if job is None:
                if not new:
                    if state.terminal:
                        # Attempts and stages share the run's working directory until it ends.
                        await asyncio.to_thread(shutil.rmtree, self.workdir / run_id, True)
                        if self.secrets is not None and state.secret_names:
                            await self.secrets.delete(run_id)
                    await self._schedule_timers(state)
                    return state
                state, new = await self._advance(run_id)
                continue
            stage, attempt = job
            key = (run_id, stage.id, attempt)
            self._running.add(key)
            try:
                outcome = await self._execute(state, stage, attempt, driver)
            except asyncio.CancelledError:
                # Shutting down mid-stage: record the attempt as failed (its retry policy decides)
                # rather than leave it to the lease sweep.
                lost = ScriptOutcome(exit_code=None, error="the executor stopped while this stage was running")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._complete(run_id, stage, attempt, lost)), 5)
                raise
            finally:
                self._running.discard(key)
            try:
                state, new = await self._complete(run_id, stage, attempt, outcome)
            except Refused as exc:
                log.info("run %s: outcome of %s not recorded: %s", run_id, stage.id, exc)
                state, new = await self._advance(run_id)

    async def _complete(
        self, run_id: str, stage: Stage, attempt: int, outcome: ScriptOutcome
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        try:
            return await self.commands.run_command(
                run_id,
                lambda at: self._completion(stage, attempt, outcome, at),
                before_append=self._take_leases,
                lost_race=self._drop_leases,
            )
        finally:
            if self.leases is not None:
                await self.leases.release(run_id, stage.id, attempt)

    @staticmethod
    def _started_job(state: rn.RunState, new: list[rn.RunEvent]) -> tuple[Stage, int] | None:
        for e in new:
            if isinstance(e, rn.StageStarted):
                stage = next(s for s in state.stages if s.id == e.stage_id)
                if stage.type != "approval":
                    return stage, e.attempt
        return None

    @staticmethod
    def _completion(stage: Stage, attempt: int, outcome: ScriptOutcome, at: Any) -> rn.CompleteStage:
        if outcome.succeeded:
            return rn.CompleteStage(stage_id=stage.id, attempt=attempt, succeeded=True, exit_code=0, at=at)
        failure: Literal["failed", "timeout", "cancelled"] = (
            "cancelled" if outcome.killed else "timeout" if outcome.timed_out else "failed"
        )
        return rn.CompleteStage(
            stage_id=stage.id,
            attempt=attempt,
            succeeded=False,
            failure=failure,
            error=outcome.error,
            exit_code=outcome.exit_code,
            at=at,
        )

    async def _load_secrets(self, state: rn.RunState) -> tuple[dict[str, str], str | None]:
        """The run's secret values, or why they cannot be had (the stage then fails with that)."""
        if not state.secret_names:
            return {}, None
        if self.secrets is None:
            return {}, "this executor has no secret store: the run's secrets cannot be read"
        try:
            values = await self.secrets.get(state.run_id)
        except SecretsUnavailable as exc:
            return {}, str(exc)
        missing = sorted(set(state.secret_names) - set(values))
        if missing:
            return values, f"the run's secrets {', '.join(missing)} are no longer available"
        return {name: values[name] for name in state.secret_names}, None

    async def _execute(self, state: rn.RunState, stage: Stage, attempt: int, driver: _Driver | None) -> ScriptOutcome:
        secrets, secrets_problem = await self._load_secrets(state)
        masker = Masker(secrets.values())
        publish = None
        if self.nc is not None:
            nc, subject = self.nc, log_subject(state.organization_id, state.run_id)

            async def publish(payload: bytes) -> None:
                await nc.publish(subject, payload)

        runlog = RunLog(self.commands, state, max_bytes=self.settings.max_log_bytes, publish=publish, masker=masker)
        runlog.start()
        label = f"Stage {stage.name}" if stage.name == stage.id else f"Stage {stage.name} ({stage.id})"
        runlog.line(stage.id, "system", f"{label} started" + (f" (attempt {attempt})" if attempt > 1 else ""))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if secrets_problem is not None:
                outcome = ScriptOutcome(exit_code=None, error=secrets_problem)
            elif stage.type == "script":
                outcome = await self._run_script(state, stage, runlog, driver, secrets)
            elif stage.type in ("deploy", "notify") and self.deliveries is not None:
                outcome = await self._deliver(self.deliveries, state, stage, attempt, runlog, driver, secrets)
            else:
                outcome = ScriptOutcome(
                    exit_code=None,
                    error=f"{stage.type} stages are not configured on this server: "
                    f"no {'deployer' if stage.type == 'deploy' else 'notifier'} is set up",
                )
            ms = round((loop.time() - started) * 1000)
            if outcome.succeeded:
                runlog.line(stage.id, "system", f"{label} succeeded ({ms} ms)")
            else:
                runlog.line(stage.id, "system", f"{label} failed: {_describe(outcome, stage, self.settings)}")
                if outcome.error is None:
                    outcome = ScriptOutcome(
                        exit_code=outcome.exit_code,
                        timed_out=outcome.timed_out,
                        killed=outcome.killed,
                        error=_describe(outcome, stage, self.settings),
                    )
        finally:
            await runlog.close()
        # The error becomes part of a stage event: never with a secret in it.
        return dataclasses.replace(outcome, error=masker.mask_optional(outcome.error))

    async def _record_pgid(self, script: ScriptRun, run_id: str, stage_id: str, attempt: int) -> None:
        assert self.leases is not None
        for _ in range(500):
            pid = script.pid
            if pid is not None:
                await self.leases.set_pgid(run_id, stage_id, attempt, pid)
                return
            await asyncio.sleep(0.01)

    async def _deliver(
        self,
        deliveries: Deliveries,
        state: rn.RunState,
        stage: Stage,
        attempt: int,
        runlog: RunLog,
        driver: _Driver | None,
        secrets: dict[str, str],
    ) -> ScriptOutcome:
        def line(stream: Literal["stdout", "stderr", "system"], text: str) -> None:
            runlog.line(stage.id, stream, text)

        if stage.type == "notify":
            return await deliveries.notify(state, stage, line)

        async def run_command(command: str, extra: dict[str, str]) -> ScriptOutcome:
            return await self._run_script(state, stage, runlog, driver, secrets, command=command, extra=extra)

        return await deliveries.deploy(state, stage, attempt, line, run_command)

    async def _run_script(
        self,
        state: rn.RunState,
        stage: Stage,
        runlog: RunLog,
        driver: _Driver | None,
        secrets: dict[str, str],
        *,
        command: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> ScriptOutcome:
        script = ScriptRun(kill_grace=self.settings.kill_grace)
        if driver is not None:
            driver.script = script
            if driver.stop_requested:
                return ScriptOutcome(exit_code=None, killed=True)
        workdir = self.workdir / state.run_id
        env = clean_env(
            workdir,
            {
                **state.variables,
                **secrets,
                "PIPELINE_ID": state.pipeline_id,
                "RUN_ID": state.run_id,
                "STAGE_ID": stage.id,
                **(extra or {}),
            },
        )
        if self.leases is not None:
            self._spawn(self._record_pgid(script, state.run_id, stage.id, stage_attempt(state, stage.id)))
        try:
            return await script.run(
                str(stage.config.get("command", "")) if command is None else command,
                workdir=workdir,
                env=env,
                timeout=stage.timeout or self.settings.stage_timeout,
                on_line=lambda stream, text: runlog.line(stage.id, stream, text),
                user=self.settings.script_user,
            )
        finally:
            if driver is not None:
                driver.script = None


def _expire(stage_id: str, at: datetime) -> rn.ExpireApproval:
    return rn.ExpireApproval(stage_id=stage_id, at=at)


def stage_attempt(state: rn.RunState, stage_id: str) -> int:
    return state.stage_runs[state.stage_index(stage_id)].attempt


async def kill_orphan(pgid: int, run_id: str, grace: float) -> None:
    """Kill a lost executor's script group, if it is still there and still that run's script."""
    try:
        environ = Path(f"/proc/{pgid}/environ").read_bytes().split(b"\0")
    except OSError:
        environ = []
    if environ and f"RUN_ID={run_id}".encode() not in environ:
        return  # the pid was reused by something else: not ours to kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + max(grace, 2.0)
    while asyncio.get_running_loop().time() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.02)


def _describe(outcome: ScriptOutcome, stage: Stage, settings: Settings) -> str:
    if outcome.error:
        return outcome.error
    if outcome.killed:
        return "stopped: the script's process group was killed"
    if outcome.timed_out:
        return f"timed out after {stage.timeout or settings.stage_timeout:g} s; the process group was killed"
    return f"exit code {outcome.exit_code}"


def workdir_of(settings: Settings, run_id: str) -> Path:
    return settings.work_root / run_id
