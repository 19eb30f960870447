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
from collections import OrderedDict
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

from domain import expressions
from domain import run as rn
from domain.errors import NotFound, Refused
from domain.masking import Masker
from domain.run.units import Unit, split_key, started_units, unit_key, unit_status
from domain.stages import Stage
from infra.app.commands import Commands, ConcurrencyConflict
from infra.broker.bus import RUN_WAKE_QUEUE, RUN_WAKE_SUBJECT, log_subject
from infra.config import Settings
from infra.delivery.deliveries import Deliveries
from infra.executor.leases import Lease, LeaseStore
from infra.executor.plugins import plugin_command
from infra.executor.scripts import ScriptOutcome, ScriptRun, clean_env
from infra.executor.uids import NoFreeUid, ScriptUids
from infra.secrets import SecretStore
from infra.store.postgres import PostgresEventStore
from infra.stored_secrets import unit_secrets

log = logging.getLogger("pipelines.executor")

RUN_EVENTS_FILTER = "pipelines.v1.*.run.*.*"
STOP_SUBJECT = "pipelines.v1.*.run.*.run_stopped"
CONSUMER = "executor"
STREAM_VERSION = "Pipelines-Stream-Version"
KNOWN_RUNS = 10_000
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

    def line(
        self,
        stage_id: str | None,
        stream: Literal["stdout", "stderr", "system"],
        text: str,
        job: str | None = None,
        step: str | None = None,
    ) -> None:
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
        key = None if stage_id is None else unit_key(stage_id, job, step)
        self._buffer.append((key, rn.LogLine(stream, text)))
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
                payload: dict[str, Any] = {
                    "runId": self._state.run_id,
                    "stage": c.stage_id,
                    "lines": [{"stream": ln.stream, "text": ln.text} for ln in c.lines],
                }
                if c.job is not None:
                    payload["job"], payload["step"] = c.job, c.step
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
    """Consecutive lines of one stage (or one step of a job), in chunks of at most MAX_CHUNK_BYTES
    of text. Each line comes with its unit key (see domain.run.units)."""
    chunks: list[rn.LogAppended] = []
    current: list[rn.LogLine] = []
    current_key: str | None = None
    size = 0

    def close() -> None:
        stage_id, job, step = split_key(current_key) if current_key is not None else (None, None, None)
        chunks.append(rn.LogAppended(stage_id=stage_id, job=job, step=step, lines=tuple(current), at=at))

    for key, line in buffer:
        n = len(line.text) + 16
        if current and (key != current_key or size + n > MAX_CHUNK_BYTES):
            close()
            current, size = [], 0
        current_key = key
        current.append(line)
        size += n
    if current:
        close()
    return chunks


class _PipelineGone(Exception):
    """The run's pipeline was deleted before the run started."""


@dataclass
class _Driver:
    task: asyncio.Task[None] | None = None
    dirty: bool = False
    # Set when something happened to the run while its units run (an approval, a resume).
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    messages: list[Msg] = field(default_factory=list)
    scripts: set[ScriptRun] = field(default_factory=set)
    # The run's state and stream version as the driver last read or wrote them.
    known: tuple[rn.RunState, int] | None = None
    stop_requested: bool = False
    # Units running for this run. Kept here, not in one drive_once call: a call that fails (the
    # store briefly unavailable) leaves them to the next call, which waits for them and records
    # their outcomes, instead of leaving them running with nobody to record them.
    units: dict[asyncio.Task[ScriptOutcome], Unit] = field(default_factory=dict)


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
        self._orphans_at = 0.0
        # Starts whose lease another executor held when we took it (see _take_leases).
        self._contended: set[tuple[str, str, int]] = set()
        # A finished unit's last log chunk, still being appended while its completion is decided
        # and the next unit's lease is taken (see _complete).
        self._closing_logs: dict[tuple[str, str, int], asyncio.Task[None]] = {}
        self._log_flushes: set[asyncio.Task[None]] = set()  # every one still running, for drain()
        self.executor_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._drivers: dict[str, _Driver] = {}
        # The run stream versions this process has read or written, most recent last (bounded):
        # a message of an event at or below that version is one the executor already acted on.
        # Only the driver's own reads and decisions count (a read that acts on nothing, such as a
        # sweep's, must not hide an event from the driver).
        self._known: OrderedDict[str, int] = OrderedDict()
        self._background: set[asyncio.Task[Any]] = set()
        # Stage attempts this process is running right now: (run, stage, attempt).
        self._running: set[tuple[str, str, int]] = set()
        self.workdir = settings.work_root
        # A uid per run for its scripts (when root): see infra.executor.uids.
        self.uids = ScriptUids(self.workdir / ".uids", *settings.script_uids) if settings.script_uids else None
        self._uids_swept_at = 0.0
        # The uids this process claimed for runs it drives (until they end).
        self._run_uids: dict[str, int] = {}
        # Deploy and notify stages need the registry's tables (PostgreSQL).
        self.deliveries: Deliveries | None = (
            Deliveries(commands, commands.store.pool, settings.database_url, nc, sealer=secrets, settings=settings)
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
        # The API's direct wake-ups (one executor of the group each): a run starts without waiting
        # for the relay's hop; the JetStream message that follows is then already known.
        wakes = await self.nc.subscribe(
            f"{RUN_WAKE_SUBJECT}.{self.settings.events_stream}.*", queue=RUN_WAKE_QUEUE, cb=self._on_wake
        )
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
            for subscription in (sub, stops, wakes):
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    def _note_version(self, run_id: str, version: int) -> None:
        if self._known.get(run_id, -1) < version:
            self._known[run_id] = version
        self._known.move_to_end(run_id)
        while len(self._known) > KNOWN_RUNS:
            self._known.popitem(last=False)

    def on_message(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) != 6:
            self._spawn(msg.ack())
            return
        run_id, event_type = parts[4], parts[5]
        try:
            version = int((msg.headers or {}).get(STREAM_VERSION, "0"))
        except ValueError:
            version = 0
        if 0 < version <= self._known.get(run_id, 0) and event_type != "run_stopped":
            # Our own event (or one we read before acting): nothing new to react to.
            self._spawn(msg.ack())
            return
        driver = self.kick(run_id)
        driver.messages.append(msg)
        if event_type == "run_stopped":
            self.stop_local(run_id)

    async def _on_wake(self, msg: Msg) -> None:
        run_id = msg.subject.rsplit(".", 1)[-1]
        if run_id:
            self.kick(run_id)

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
        for script in list(driver.scripts):
            self._spawn(script.stop())

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
            driver.wake.set()
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
        if self.uids is not None and now - self._uids_swept_at > 300:
            self._uids_swept_at = now
            for uid, run_id in await asyncio.to_thread(self.uids.stale):
                state, _ = await self.commands.load_run(run_id)
                if not state.exists or state.terminal:
                    await asyncio.to_thread(self.uids.drop, uid, run_id)
        if self.leases is None:
            return
        if self.deliveries is not None and now - self._orphans_at > 60:
            self._orphans_at = now
            await self.deliveries.close_orphans(older_than=self.settings.lease_ttl)
        for lease in await self.leases.claim_expired(self.executor_id, hold=self.settings.lease_ttl):
            if (lease.run_id, lease.stage_id, lease.attempt) in self._running:
                continue  # ours after all (a slow heartbeat); the claim renewed it
            await self.recover(lease)
        for timer in await self.leases.claim_due(hold=max(30.0, self.settings.lease_ttl)):
            try:
                if timer.kind == "approval":
                    with contextlib.suppress(Refused, NotFound):
                        await self.commands.run_command(timer.run_id, functools.partial(_expire, timer.key))
                # The expiry's event is one this process knows: drive the run from here.
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
            stage_id, job, step = split_key(lease.stage_id)
            if state.exists and unit_status(state, lease.stage_id) == ("running", lease.attempt):
                what = f"stage {stage_id}" if job is None else f"step {step} of job {job}"
                message = (
                    f"executor lost: the executor running {what} (attempt {lease.attempt}) "
                    f"on {lease.host} stopped renewing its lease"
                )
                await self.commands.append_logs(
                    state,
                    [
                        rn.LogAppended(
                            stage_id=stage_id,
                            job=job,
                            step=step,
                            lines=(rn.LogLine("system", message),),
                            at=self.commands.now(),
                        )
                    ],
                )
                lost = ScriptOutcome(exit_code=None, error=message)
                # Only the outcome: what comes next is started by the driver that the kick below
                # runs (a unit started here would have a lease and nobody working on it).
                with contextlib.suppress(Refused):
                    await self.commands.run_command(
                        lease.run_id, lambda at: completion(stage_id, job, step, lease.attempt, lost, at, advance=False)
                    )
                # A deployment the lost executor was making is closed too (after the stage is
                # recorded, so a failure here still leaves the stage failed).
                # (A deploy step's deployment is closed by the orphan sweep once its stage ends: the
                # stage's other deploy steps may still be running elsewhere.)
                if self.deliveries is not None and job is None:
                    await self.deliveries.abandon(lease.run_id, stage_id, message, attempt=lease.attempt)
        finally:
            await self.leases.release(lease.run_id, lease.stage_id, lease.attempt)
        self.kick(lease.run_id)

    def _new_stage_attempts(self, state: rn.RunState, new: list[rn.RunEvent]) -> list[tuple[str, int]]:
        return [(unit.key, unit.attempt) for unit in started_units(state, new)]

    async def _take_leases(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        # Taken before the StageStarted append commits: a started stage always has a lease, so an
        # executor that dies right after the commit is still noticed.
        if self.leases is None:
            return
        for key, attempt in self._new_stage_attempts(state, new):
            taken = await self.leases.acquire(
                state.run_id, key, attempt, self.executor_id, self.host, self.settings.lease_ttl
            )
            if not taken:  # another executor decided the same start; whoever appends it keeps it
                self._contended.add((state.run_id, key, attempt))

    async def _drop_leases(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        if self.leases is None:
            return
        for key, attempt in self._new_stage_attempts(state, new):
            self._contended.discard((state.run_id, key, attempt))
            await self.leases.release(state.run_id, key, attempt, self.executor_id)

    async def _own_leases(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        """After our append started units: a lease another executor took for the same start (it
        lost the race) becomes ours."""
        if self.leases is None or not self._contended:
            return
        for key, attempt in self._new_stage_attempts(state, new):
            if (state.run_id, key, attempt) in self._contended:
                self._contended.discard((state.run_id, key, attempt))
                await self.leases.take_over(
                    state.run_id, key, attempt, self.executor_id, self.host, self.settings.lease_ttl
                )

    async def _schedule_timers(self, state: rn.RunState) -> None:
        if self.leases is None:
            return
        retry_at = state.next_retry_at
        if retry_at is not None:
            await self.leases.schedule(state.run_id, "retry", "next", retry_at)
        if state.status != "waiting_approval":
            return
        for gate in state.open_gates:
            if gate.started_at is None:
                continue
            if gate.job is None or gate.step is None:
                timeout = state.stage(gate.stage_id).timeout
            else:
                timeout = state.step(gate.stage_id, gate.job, gate.step).timeout
            if timeout is not None:
                await self.leases.schedule(
                    state.run_id,
                    "approval",
                    unit_key(gate.stage_id, gate.job, gate.step),
                    gate.started_at + timedelta(seconds=timeout),
                )

    async def drain(self) -> None:
        tasks = [d.task for d in self._drivers.values() if d.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The last log chunks of units that just ended are still being appended: let them land.
        if self._log_flushes:
            await asyncio.wait(set(self._log_flushes), timeout=5)

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

    async def _advance(self, run_id: str, driver: _Driver | None) -> tuple[rn.RunState, list[rn.RunEvent]]:
        # Always from a fresh read: an Advance that decides nothing appends nothing, so a stale
        # state would never show (an approval would go unnoticed).
        state, new = await self.commands.run_command(
            run_id,
            lambda at: rn.Advance(at=at),
            before_append=self._before_start,
            lost_race=self._drop_leases,
            on_version=self._noter(driver),
        )
        await self._own_leases(state, new)
        return state, new

    def _noter(self, driver: _Driver | None) -> Callable[[str, rn.RunState, int], None]:
        def note(run_id: str, state: rn.RunState, version: int) -> None:
            self._note_version(run_id, version)
            if driver is not None:
                driver.known = (state, version)

        return note

    async def _before_start(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        """Before a run starts, its pipeline must still be there; before a unit starts, its lease
        (both asked for at once: one round trip of waiting instead of two)."""
        if not any(isinstance(e, rn.RunStarted) for e in new):
            await self._take_leases(state, new)
            return
        try:
            loaded, taken = await asyncio.gather(
                self.commands.load_pipeline(state.pipeline_id), self._take_leases(state, new), return_exceptions=True
            )
            if isinstance(taken, BaseException):
                raise taken
            if isinstance(loaded, BaseException):
                raise loaded
            if not loaded[0].live:
                raise _PipelineGone(state.pipeline_id)
        except BaseException:
            # Nothing is appended: the leases taken for this start are not kept (a lease nobody
            # runs would be renewed by our heartbeat for as long as this process lives).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._drop_leases(state, new))
            raise

    async def drive_once(self, run_id: str, driver: _Driver | None = None) -> rn.RunState:
        """Take the run as far as it can go now: start it, run its stages and the steps of its jobs
        (several at once when jobs run in parallel), finish it."""
        if driver is not None:
            driver.wake.clear()
        try:
            state, new = await self._advance(run_id, driver)
        except _PipelineGone:
            state, _ = await self.commands.run_command(
                run_id, lambda at: rn.Cancel(by="system", reason="pipeline deleted", at=at)
            )
            return state
        tasks: dict[asyncio.Task[ScriptOutcome], Unit] = driver.units if driver is not None else {}
        completing: Unit | None = None  # taken out of `tasks`, its outcome being recorded
        try:
            while True:
                units = started_units(state, new)
                for unit in units:
                    self._running.add((run_id, unit.key, unit.attempt))
                    task = asyncio.create_task(self._execute(state, unit, driver), name=f"{run_id}:{unit.key}")
                    tasks[task] = unit
                if not tasks:
                    if not new:
                        if state.terminal:
                            # Attempts and stages share the run's working directory until it ends.
                            await asyncio.to_thread(shutil.rmtree, self.workdir / run_id, True)
                            if self.uids is not None:
                                self._run_uids.pop(run_id, None)
                                await asyncio.to_thread(self.uids.release, run_id)
                            if self.secrets is not None and state.secret_names:
                                await self.secrets.delete(run_id)
                        await self._schedule_timers(state)
                        return state
                    if state.terminal:
                        new = []  # an ended run decides nothing more: no read to find that out
                        continue
                    state, new = await self._advance(run_id, driver)
                    continue
                # Wait for a unit to finish, for something to happen to the run (an approval of
                # one job's gate while other jobs run, a resume, a stop), or for a retry to be due.
                retry_at = state.next_retry_at
                if retry_at is not None or state.status == "waiting_approval":
                    await self._schedule_timers(state)
                waiters: set[asyncio.Task[Any]] = set(tasks)
                wake: asyncio.Task[Any] | None = None
                if driver is not None:
                    wake = asyncio.create_task(driver.wake.wait())
                    waiters.add(wake)
                timeout = None if retry_at is None else max(0.0, (retry_at - self.commands.now()).total_seconds())
                done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if wake is not None and wake not in done:
                    wake.cancel()
                new = []
                if not done:  # a retry is due
                    state, new = await self._advance(run_id, driver)
                    continue
                for task in done:
                    unit_done = tasks.pop(task, None)
                    if unit_done is None:
                        continue
                    self._running.discard((run_id, unit_done.key, unit_done.attempt))
                    try:
                        outcome = task.result()
                    except Exception as exc:  # a bug in running the unit: record it, never hang
                        log.exception("run %s: running %s failed", run_id, unit_done.key)
                        outcome = ScriptOutcome(exit_code=None, error=f"the executor failed to run this: {exc}")
                    completing = unit_done
                    try:
                        state, more = await self._complete_retrying(run_id, unit_done, outcome, driver)
                        new += more
                        completing = None
                    except Refused as exc:
                        completing = None
                        # Someone else settled it (a lost lease recovered elsewhere, a stopped run):
                        # look at the run as it is now.
                        log.info("run %s: outcome of %s not recorded: %s", run_id, unit_done.key, exc)
                        state, more = await self._advance(run_id, driver)
                        new += more
                if driver is not None and driver.wake.is_set():
                    driver.wake.clear()
                    driver.dirty = False
                    state, more = await self._advance(run_id, driver)
                    new += more
        except asyncio.CancelledError:
            # Shutting down mid-run: record what was running as failed (each retry policy decides)
            # rather than leave it to the lease sweep.
            # A unit that had already finished keeps its real outcome.
            finished = {t: t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            lost = ScriptOutcome(exit_code=None, error="the executor stopped while this was running")
            for task, unit in tasks.items():
                with contextlib.suppress(Exception):
                    outcome = finished.get(task, lost)
                    await asyncio.wait_for(asyncio.shield(self._complete(run_id, unit, outcome, advance=False)), 5)
                self._forget_log(run_id, unit)
                self._running.discard((run_id, unit.key, unit.attempt))
            tasks.clear()
            if completing is not None:  # cut off while recording: the lease sweep recovers it
                self._forget_log(run_id, completing)
            raise

    async def _complete(
        self, run_id: str, unit: Unit, outcome: ScriptOutcome, driver: _Driver | None = None, advance: bool = True
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        stage_id = unit.stage.id
        job = unit.job.name if unit.job else None
        step = unit.step.name if unit.step else None
        closing = self._closing_logs.get((run_id, unit.key, unit.attempt))

        async def before_append(state: rn.RunState, new: list[rn.RunEvent]) -> None:
            # The unit's last log chunk commits before its completion does (a view as of the
            # completion shows the whole output), while the next unit's lease is being taken.
            if closing is None:
                await self._take_leases(state, new)
            else:
                await asyncio.gather(self._take_leases(state, new), _settled(closing))

        try:
            # A completion always appends (or is refused): the state the driver last saw saves a
            # read, and if it is stale the append loses the race and the command reads again.
            state, new = await self.commands.run_command(
                run_id,
                lambda at: completion(stage_id, job, step, unit.attempt, outcome, at, advance),
                before_append=before_append,
                lost_race=self._drop_leases,
                on_version=self._noter(driver),
                known=driver.known if driver is not None else None,
            )
        except (Refused, NotFound) as exc:
            self._forget_log(run_id, unit)
            if isinstance(exc, Refused):
                self._release_later(run_id, unit)
            raise
        self._forget_log(run_id, unit)
        # Any other failure keeps the lease: the caller tries again, and if this executor dies
        # meanwhile the lease expires and the attempt is recovered.
        self._release_later(run_id, unit)
        await self._own_leases(state, new)
        return state, new

    def _forget_log(self, run_id: str, unit: Unit) -> None:
        # The task itself goes on to the end, referenced by _log_flushes until then.
        self._closing_logs.pop((run_id, unit.key, unit.attempt), None)

    def _log_flushed(self, task: asyncio.Task[None]) -> None:
        self._log_flushes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: RunLog reported what failed

    def _release_later(self, run_id: str, unit: Unit) -> None:
        # Off the critical path: a lease left behind is found expired and dropped by the sweep
        # (its unit is no longer running).
        if self.leases is not None:
            self._spawn(self.leases.release(run_id, unit.key, unit.attempt))

    async def _complete_retrying(
        self, run_id: str, unit: Unit, outcome: ScriptOutcome, driver: _Driver | None
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        """Record an outcome, however long the store is unavailable (a lost outcome would leave
        the unit running under a lease this executor keeps renewing)."""
        delay = 0.2
        while True:
            try:
                return await self._complete(run_id, unit, outcome, driver)
            except (Refused, NotFound):
                raise
            except Exception as exc:
                log.warning("run %s: recording %s failed, trying again in %.1f s: %s", run_id, unit.key, delay, exc)
                if driver is not None:
                    driver.known = None  # read the run again
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _load_secrets(self, state: rn.RunState) -> tuple[dict[str, str], str | None]:
        """The unit's secret values (stored ones under the trigger's), or why they cannot be had."""
        return await unit_secrets(self.secrets, state)

    async def _execute(self, state: rn.RunState, unit: Unit, driver: _Driver | None) -> ScriptOutcome:
        secrets, secrets_problem = await self._load_secrets(state)
        masker = Masker(secrets.values())
        publish = None
        if self.nc is not None:
            nc, subject = self.nc, log_subject(state.organization_id, state.run_id)

            async def publish(payload: bytes) -> None:
                await nc.publish(subject, payload)

        runlog = RunLog(self.commands, state, max_bytes=self.settings.max_log_bytes, publish=publish, masker=masker)
        runlog.start()
        stage, job, step = unit.stage, unit.job, unit.step
        job_name, step_name = (job.name, step.name) if job and step else (None, None)

        def line(stream: Literal["stdout", "stderr", "system"], text: str) -> None:
            runlog.line(stage.id, stream, text, job_name, step_name)

        label = unit.label
        line("system", f"{label} started" + (f" (attempt {unit.attempt})" if unit.attempt > 1 else ""))
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self._timeout(state, unit)
        try:
            if secrets_problem is not None:
                outcome = ScriptOutcome(exit_code=None, error=secrets_problem)
            elif job is not None and step is not None:
                outcome = await self._run_step(state, unit, line, driver, secrets, timeout)
            elif stage.type == "script":
                outcome = await self._run_script(
                    state, unit, line, driver, secrets, command=str(stage.config.get("command", "")), timeout=timeout
                )
            elif stage.type in ("deploy", "notify"):
                outcome = await self._deliver(state, unit, stage, line, driver, secrets, timeout)
            else:
                outcome = ScriptOutcome(exit_code=None, error=f"{stage.type} stages are not run by the executor")
            ms = round((loop.time() - started) * 1000)
            if outcome.succeeded:
                line("system", f"{label} succeeded ({ms} ms)")
            else:
                described = _describe(outcome, timeout)
                line("system", f"{label} failed: {described}")
                if outcome.error is None:
                    outcome = dataclasses.replace(outcome, error=described)
        except BaseException:
            await runlog.close()
            raise
        # The last chunk is appended while the completion is prepared; _complete waits for it
        # before it appends the completion.
        closing = asyncio.create_task(runlog.close())
        self._closing_logs[(state.run_id, unit.key, unit.attempt)] = closing
        self._log_flushes.add(closing)
        closing.add_done_callback(self._log_flushed)
        # The error becomes part of a stage event: never with a secret in it.
        return dataclasses.replace(outcome, error=masker.mask_optional(outcome.error))

    def _timeout(self, state: rn.RunState, unit: Unit) -> float:
        """A stage's own timeout; for a step, its own, else what is left of its job's."""
        if unit.job is None or unit.step is None:
            return unit.stage.timeout or self.settings.stage_timeout
        limits = [self.settings.stage_timeout]
        if unit.step.timeout is not None:
            limits.append(unit.step.timeout)
        if unit.job.timeout is not None:
            jr = state.job_run(unit.stage.id, unit.job.name)
            if jr.started_at is not None:
                left = unit.job.timeout - (self.commands.now() - jr.started_at).total_seconds()
                limits.append(max(left, 0.001))
        return min(limits)

    def _context(self, state: rn.RunState, unit: Unit, secrets: dict[str, str]) -> dict[str, Any]:
        index = None
        if unit.job is not None and unit.step is not None:
            index = [s.name for s in unit.job.steps].index(unit.step.name)
        return rn.job_context(state, unit.stage, unit.job, upto=index, secrets=secrets)

    async def _run_step(
        self,
        state: rn.RunState,
        unit: Unit,
        line: Callable[[Literal["stdout", "stderr", "system"], str], None],
        driver: _Driver | None,
        secrets: dict[str, str],
        timeout: float,
    ) -> ScriptOutcome:
        assert unit.job is not None and unit.step is not None
        job, step = unit.job, unit.step
        context = self._context(state, unit, secrets)
        try:
            env = {k: expressions.interpolate(v, context) for k, v in job.env.items()}
            context["env"] = env
            extra = {
                **env,
                "JOB_NAME": job.name,
                "STEP_NAME": step.name,
                **{f"MATRIX_{k.upper()}": expressions.render(v) for k, v in (job.matrix_values or {}).items()},
            }
            if step.kind == "shell":
                command = expressions.interpolate(step.run or "", context)
                return await self._run_script(
                    state, unit, line, driver, secrets, command=command, extra=extra, timeout=timeout
                )
            if step.kind == "notify" and self.deliveries is not None:
                # The notifier renders the message itself, with run.* and pipeline.* in full; the
                # step adds its own context (never secret values: a message leaves the system).
                told: dict[str, Any] = {k: v for k, v in context.items() if k not in ("run", "pipeline")}
                told["secrets"] = {name: "***" for name in secrets}
                # The job's env rendered again without secret values (it may hold ${{ secrets.X }}).
                told["env"] = {k: expressions.interpolate(v, told) for k, v in job.env.items()}
                as_stage = Stage(
                    id=unit.stage.id, name=f"{job.name}/{step.name}", type="notify", order=0, config=dict(step.config)
                )
                return await self.deliveries.notify(state, as_stage, line, told)
            if step.kind in ("deploy", "notify"):
                config = {k: expressions.interpolate(str(v), context) for k, v in step.config.items()}
                as_stage = Stage(
                    id=unit.stage.id, name=f"{job.name}/{step.name}", type=step.kind, order=0, config=config
                )
                return await self._deliver(state, unit, as_stage, line, driver, secrets, timeout)
            if step.kind == "plugin":
                args = _interpolate_all(step.args, context)
                command, plugin_env = plugin_command(step.uses or "", step.action, args, context)
                return await self._run_script(
                    state,
                    unit,
                    line,
                    driver,
                    secrets,
                    command=command,
                    extra={**extra, **plugin_env},
                    timeout=timeout,
                    as_service=True,
                )
        except expressions.ExpressionError as exc:
            return ScriptOutcome(exit_code=None, error=f"step {step.name}: {exc}")
        return ScriptOutcome(exit_code=None, error=f"step kind {step.kind} is not run by the executor")

    async def _record_pgid(self, script: ScriptRun, run_id: str, key: str, attempt: int) -> None:
        assert self.leases is not None
        for _ in range(500):
            if script.finished:
                # Its whole process group is gone already: there is nothing for a recovery to
                # kill, and a script that ends within the first poll costs no write at all.
                return
            pid = script.pid
            if pid is not None:
                await self.leases.set_pgid(run_id, key, attempt, pid)
                return
            await asyncio.sleep(0.01)

    async def _deliver(
        self,
        state: rn.RunState,
        unit: Unit,
        stage: Stage,
        line: Callable[[Literal["stdout", "stderr", "system"], str], None],
        driver: _Driver | None,
        secrets: dict[str, str],
        timeout: float,
    ) -> ScriptOutcome:
        if self.deliveries is None:
            return ScriptOutcome(
                exit_code=None,
                error=f"{stage.type} is not configured on this server: "
                f"no {'deployer' if stage.type == 'deploy' else 'notifier'} is set up",
            )
        if stage.type == "notify":
            return await self.deliveries.notify(state, stage, line)

        async def run_command(command: str, extra: dict[str, str]) -> ScriptOutcome:
            return await self._run_script(
                state, unit, line, driver, secrets, command=command, extra=extra, timeout=timeout
            )

        return await self.deliveries.deploy(state, stage, unit.attempt, line, run_command)

    async def _run_script(
        self,
        state: rn.RunState,
        unit: Unit,
        line: Callable[[Literal["stdout", "stderr", "system"], str], None],
        driver: _Driver | None,
        secrets: dict[str, str],
        *,
        command: str,
        timeout: float,
        extra: dict[str, str] | None = None,
        as_service: bool = False,
    ) -> ScriptOutcome:
        script = ScriptRun(kill_grace=self.settings.kill_grace)
        if driver is not None:
            if driver.stop_requested:
                return ScriptOutcome(exit_code=None, killed=True)
        # Plugins are the admin's installed code: they run in their own process with a clean
        # environment, as the service's user (they need its Python).
        user: str | int | None = None if as_service else self.settings.script_user
        identity: dict[str, str] = {}
        if self.uids is not None and not as_service:
            user = self._run_uids.get(state.run_id)
            if user is None:
                try:
                    user = await asyncio.to_thread(self.uids.acquire, state.run_id)
                except NoFreeUid as exc:
                    return ScriptOutcome(exit_code=None, error=str(exc))
                if len(self._run_uids) > 10_000:  # runs another executor ended
                    self._run_uids.clear()
                self._run_uids[state.run_id] = user
            identity = {"USER": f"run-{user}", "LOGNAME": f"run-{user}"}
        if driver is not None:
            driver.scripts.add(script)
        workdir = self.workdir / state.run_id
        env = clean_env(
            workdir,
            {
                **state.variables,
                **secrets,
                "PIPELINE_ID": state.pipeline_id,
                "RUN_ID": state.run_id,
                "STAGE_ID": unit.stage.id,
                **identity,
                **(extra or {}),
            },
        )
        if self.leases is not None:
            self._spawn(self._record_pgid(script, state.run_id, unit.key, unit.attempt))
        try:
            return await script.run(
                command,
                workdir=workdir,
                env=env,
                timeout=timeout,
                on_line=line,
                user=user,
            )
        finally:
            if driver is not None:
                driver.scripts.discard(script)


def completion(
    stage_id: str,
    job: str | None,
    step: str | None,
    attempt: int,
    outcome: ScriptOutcome,
    at: datetime,
    advance: bool = True,
) -> rn.CompleteStage | rn.CompleteStep:
    """The command that records an attempt's outcome: of a typed stage, or of a step of a job.
    `advance=False` only records it (see rn.CompleteStage.advance)."""
    failure: Literal["failed", "timeout", "cancelled"] = (
        "cancelled" if outcome.killed else "timeout" if outcome.timed_out else "failed"
    )
    common: dict[str, Any] = {
        "stage_id": stage_id,
        "attempt": attempt,
        "succeeded": outcome.succeeded,
        "failure": failure,
        "error": None if outcome.succeeded else outcome.error,
        "exit_code": 0 if outcome.succeeded else outcome.exit_code,
        "advance": advance,
        "at": at,
    }
    if job is None or step is None:
        return rn.CompleteStage(**common)
    return rn.CompleteStep(job=job, step=step, **common)


async def _settled(task: asyncio.Task[None]) -> None:
    """Wait for `task` to end, whatever its outcome (a log append that failed for good was
    already reported by RunLog; the completion goes ahead regardless)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(task)


def _interpolate_all(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return expressions.interpolate(value, context)
    if isinstance(value, dict):
        return {k: _interpolate_all(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_all(v, context) for v in value]
    return value


def _expire(key: str, at: datetime) -> rn.ExpireApproval:
    stage_id, job, step = split_key(key)
    return rn.ExpireApproval(stage_id=stage_id, job=job, step=step, at=at)


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


def _describe(outcome: ScriptOutcome, timeout: float) -> str:
    if outcome.error:
        return outcome.error
    if outcome.killed:
        return "stopped: the script's process group was killed"
    if outcome.timed_out:
        return f"timed out after {timeout:g} s; the process group was killed"
    return f"exit code {outcome.exit_code}"


def workdir_of(settings: Settings, run_id: str) -> Path:
    return settings.work_root / run_id
