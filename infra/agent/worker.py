"""The agent: runs the units the executor hands it, with the same code the executor runs its own
with (infra.executor.scripts, in the run's sandbox), and reports their lines and outcomes.

It holds no database credentials: everything a unit needs (its rendered command, its environment
with the run's secrets resolved, its timeout) comes in the Assign message. It renews what it runs
with the executor that handed it over; a unit whose executor stops answering for a lease's time,
or says it no longer gives it, is an orphan and is killed (its attempt is retried elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from infra.agent import protocol as p
from infra.agent.config import AgentConfig
from infra.executor.sandbox import RunSandboxes, Sandbox, private_dir_of, private_root_of
from infra.executor.scripts import ScriptOutcome, ScriptRun, clean_env
from infra.executor.uids import ScriptUids

log = logging.getLogger("pipelines.agent")

# Lines are sent in batches: at most this many, or what came within FLUSH seconds.
BATCH = 200
FLUSH = 0.05


@dataclass
class Running:
    assign: p.Assign
    script: ScriptRun
    task: asyncio.Task[None] | None = None
    # When the executor last said it still gives us this unit (loop time).
    renewed: float = 0.0
    # Set once the script ended: resent until the executor no longer lists the unit.
    finished: p.Finished | None = None
    lines: list[tuple[p.Stream, str]] = field(default_factory=list)


class Agent:
    def __init__(
        self,
        nc: NATS,
        *,
        agent_id: str,
        labels: tuple[str, ...],
        capacity: int,
        work_root: Path,
        lease_ttl: float,
        sandbox: Sandbox,
        script_user: str | None,
        script_uids: tuple[int, int] | None = None,
    ) -> None:
        self.nc = nc
        self.id = agent_id
        self.labels = labels
        self.capacity = capacity
        self.work_root = work_root
        self.ttl = lease_ttl
        root = work_root.absolute()
        self.sandboxes = RunSandboxes(sandbox, label=str(root), spare_dir=private_root_of(root))
        self.script_user = script_user
        # A uid per run (when root), as on an executor host: runs of different organizations on a
        # shared agent do not share a user.
        self.uids = ScriptUids(work_root / ".uids", *script_uids) if script_uids else None
        self.units: dict[str, Running] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Set when the agent stops: what it kills then failed (its retry policy decides), not cancelled.
        self._stopping = False

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def running(self) -> int:
        return sum(1 for r in self.units.values() if r.finished is None)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.nc.subscribe(p.work_subject(self.id), cb=self._on_work)
        loops = [asyncio.create_task(self._presence(stop)), asyncio.create_task(self._renew(stop))]
        try:
            await stop.wait()
        finally:
            for task in loops:
                task.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            # Stopping: what runs here is killed and reported failed, so its retry policy decides.
            self._stopping = True
            for r in list(self.units.values()):
                if r.finished is None:
                    await r.script.stop()
            tasks = [r.task for r in self.units.values() if r.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.nc.flush(2)
            # The sandboxes (and the spare) this agent holds end with it: none is left behind.
            await self.sandboxes.aclose()

    async def _send(self, executor: str, message: p.Report) -> None:
        try:
            await self.nc.publish(p.report_subject(self.id, executor), p.encode(message))
        except Exception as exc:  # the broker is away: renewals and resends make up for it
            log.warning("cannot report to executor %s: %s", executor, exc)

    async def _on_work(self, msg: Msg) -> None:
        try:
            work = p.decode_work(msg.data)
        except Exception as exc:
            log.warning("undecodable work message: %s", exc)
            return
        if isinstance(work, p.Assign):
            await self._assign(work)
        elif isinstance(work, p.Cancel):
            r = self.units.get(work.unit)
            if r is not None and r.finished is None:
                await r.script.stop()
        elif isinstance(work, p.Renewed):
            self._renewed(work)
        elif isinstance(work, p.RunEnded):
            await self._run_ended(work.run_id)

    async def _assign(self, a: p.Assign) -> None:
        if a.unit in self.units:  # a resend: already accepted
            await self._send(a.executor, p.Accepted(unit=a.unit))
            return
        if self.running >= self.capacity:
            await self._send(a.executor, p.Refused(unit=a.unit, reason=f"at capacity ({self.capacity})"))
            return
        r = Running(assign=a, script=ScriptRun(kill_grace=a.kill_grace), renewed=asyncio.get_running_loop().time())
        self.units[a.unit] = r
        await self._send(a.executor, p.Accepted(unit=a.unit))
        r.task = asyncio.create_task(self._execute(r), name=f"unit-{a.unit}")

    async def _execute(self, r: Running) -> None:
        a = r.assign
        workdir = self.work_root / a.run_id
        flusher = asyncio.create_task(self._flush_lines(r))

        def on_line(stream: p.Stream, text: str) -> None:
            r.lines.append((stream, text))

        try:
            user: str | int | None = self.script_user
            env = dict(a.env)
            if self.uids is not None:
                user = await asyncio.to_thread(self.uids.acquire, a.run_id)
                env.update(USER=f"run-{user}", LOGNAME=f"run-{user}")
            outcome = await r.script.run(
                a.command,
                workdir=workdir,
                env=clean_env(workdir, env),
                timeout=a.timeout,
                on_line=on_line,
                user=user,
                sandbox=self.sandboxes,
            )
        except Exception as exc:
            log.exception("unit %s: running it failed", a.unit)
            outcome = ScriptOutcome(exit_code=None, error=f"the agent failed to run this: {exc}")
        if self._stopping and outcome.killed:
            outcome = ScriptOutcome(exit_code=None, error="the agent stopped while this was running")
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await self._send_lines(r)
        r.finished = p.Finished(
            unit=a.unit,
            attempt=a.attempt,
            exit_code=outcome.exit_code,
            timed_out=outcome.timed_out,
            killed=outcome.killed,
            error=outcome.error,
        )
        await self._send(a.executor, r.finished)

    async def _flush_lines(self, r: Running) -> None:
        while True:
            await asyncio.sleep(FLUSH)
            await self._send_lines(r)

    async def _send_lines(self, r: Running) -> None:
        while r.lines:
            batch, r.lines = r.lines[:BATCH], r.lines[BATCH:]
            await self._send(r.assign.executor, p.Lines(unit=r.assign.unit, attempt=r.assign.attempt, lines=batch))

    def _renewed(self, answer: p.Renewed) -> None:
        now = asyncio.get_running_loop().time()
        valid = set(answer.valid)
        for unit in answer.asked:
            r = self.units.get(unit)
            if r is None:
                continue
            if unit in valid:
                r.renewed = now
                if r.finished is not None:  # the executor has not got the outcome: again
                    self._spawn(self._send(r.assign.executor, r.finished))
            elif r.finished is None:
                log.warning("unit %s: executor %s no longer gives it to us: killing it", unit, r.assign.executor)
                self._spawn(r.script.stop())
            else:
                del self.units[unit]  # its outcome is recorded

    async def _renew(self, stop: asyncio.Event) -> None:
        interval = max(self.ttl / 3, 0.1)
        while not stop.is_set():
            await asyncio.sleep(interval)
            now = asyncio.get_running_loop().time()
            by_executor: dict[str, list[str]] = {}
            for unit, r in list(self.units.items()):
                if now - r.renewed > self.ttl:
                    # Nobody answered for a lease's time: the executor is gone (or we are cut
                    # off); another executor recovers the attempt, so this one must not go on.
                    if r.finished is None:
                        log.warning("unit %s: lease lost (no renewal for %.0f s): killing it", unit, self.ttl)
                        await r.script.stop()
                    else:
                        del self.units[unit]
                    continue
                by_executor.setdefault(r.assign.executor, []).append(unit)
            for executor, units in by_executor.items():
                await self._send(executor, p.Renew(units=units))

    async def _presence(self, stop: asyncio.Event) -> None:
        subject = p.presence_subject(self.id)
        while not stop.is_set():
            with contextlib.suppress(Exception):
                await self.nc.publish(
                    subject,
                    p.encode(p.Presence(labels=list(self.labels), capacity=self.capacity, running=self.running)),
                )
            await asyncio.sleep(PRESENCE_INTERVAL)

    async def _run_ended(self, run_id: str) -> None:
        if any(r.assign.run_id == run_id and r.finished is None for r in self.units.values()):
            return
        workdir = self.work_root / run_id
        await asyncio.to_thread(shutil.rmtree, workdir, True)
        private = private_dir_of(workdir.absolute())
        await self.sandboxes.close(private)
        await asyncio.to_thread(shutil.rmtree, private, True)
        if self.uids is not None:
            await asyncio.to_thread(self.uids.release, run_id)


# How often an agent says it is there (and how full it is); one missed for PRESENCE_LOST seconds
# and the executors stop handing it units.
PRESENCE_INTERVAL = 1.0


async def connect(config: AgentConfig, *, on_refused: Callable[[str], object]) -> NATS:
    """Connect with the agent's own credentials; reconnect for as long as it takes, unless the broker
    refuses them (revoked): then `on_refused`."""

    connected = False

    async def on_error(exc: Exception) -> None:
        text = str(exc)
        log.warning("nats: %s", text)
        # Refused before the first connection: its user may not exist yet (the supervisor adds the
        # local agent's once the database is migrated): keep trying. Refused after: revoked.
        if connected and ("authorization" in text.lower() or "authentication" in text.lower()):
            on_refused(text)

    nc = await nats.connect(
        list(config.servers),
        user=config.user,
        password=config.password,
        name=f"pipelines-agent-{config.id}",
        error_cb=on_error,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
    )
    connected = True
    return nc
