"""Driving one run: what to start next, waiting for its running units, recording their outcomes;
one driver task per run this process is driving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from domain import run as rn
from domain.errors import NotFound, Refused
from domain.run.units import Unit, started_units
from infra import trace
from infra.app.commands import Commands, ConcurrencyConflict
from infra.executor.background import Background
from infra.executor.leasing import UnitLeases
from infra.executor.runlog import ClosingLogs, LastChunks, settled
from infra.executor.scripts import ScriptOutcome, ScriptRun
from infra.executor.timers import Timers
from infra.executor.units import UnitRunner, completion
from infra.store.records import Alongside

log = logging.getLogger("pipelines.executor")

KNOWN_RUNS = 10_000


class PipelineGone(Exception):
    """The run's pipeline was deleted before the run started."""


@dataclass
class RunDriver:
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


class KnownVersions:
    """The run stream versions this process has read or written, most recent last (bounded): a
    message of an event at or below that version is one the executor already acted on. Only the
    driver's own reads and decisions count (a read that acts on nothing, such as a sweep's, must
    not hide an event from the driver)."""

    def __init__(self, limit: int = KNOWN_RUNS) -> None:
        self._versions: OrderedDict[str, int] = OrderedDict()
        self._limit = limit

    def note(self, run_id: str, version: int) -> None:
        if self._versions.get(run_id, -1) < version:
            self._versions[run_id] = version
        self._versions.move_to_end(run_id)
        while len(self._versions) > self._limit:
            self._versions.popitem(last=False)

    def get(self, run_id: str) -> int:
        return self._versions.get(run_id, 0)


class RunDrivers:
    def __init__(
        self,
        commands: Commands,
        units: UnitRunner,
        leases: UnitLeases,
        timers: Timers,
        closing_logs: ClosingLogs,
        background: Background,
    ) -> None:
        self.commands = commands
        self.units = units
        self.leases = leases
        self.timers = timers
        self.closing_logs = closing_logs
        self._background = background
        self.known = KnownVersions()
        self._drivers: dict[str, RunDriver] = {}
        # Stage attempts this process is running right now: (run, stage, attempt).
        self.running: set[tuple[str, str, int]] = set()

    def drivers(self) -> list[RunDriver]:
        return list(self._drivers.values())

    def stop_local(self, run_id: str) -> None:
        """Kill the run's script if this process runs it (TERM, then KILL after the grace period)."""
        driver = self._drivers.get(run_id)
        if driver is None:
            return
        driver.stop_requested = True
        for script in list(driver.scripts):
            self._background.spawn(script.stop())

    def kick(self, run_id: str) -> RunDriver:
        """Make sure the run is being driven; a run already being driven looks again when done."""
        driver = self._drivers.get(run_id)
        if driver is None:
            driver = RunDriver()
            self._drivers[run_id] = driver
            driver.task = asyncio.create_task(self._drive(run_id, driver), name=f"run-{run_id}")
        else:
            driver.dirty = True
            driver.wake.set()
        return driver

    async def drain(self) -> None:
        tasks = [d.task for d in self._drivers.values() if d.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The last log chunks that completions did not take are still being appended: let them land.
        await self.closing_logs.wait(timeout=5)

    async def _drive(self, run_id: str, driver: RunDriver) -> None:
        trace.enter_run(run_id)  # the marks of this run's units, scripts and sandbox
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

    async def _advance(self, run_id: str, driver: RunDriver | None) -> tuple[rn.RunState, list[rn.RunEvent]]:
        # Always from a fresh read: an Advance that decides nothing appends nothing, so a stale
        # state would never show (an approval would go unnoticed).
        state, new = await self.commands.run_command(
            run_id,
            lambda at: rn.Advance(at=at),
            before_append=self._before_start,
            alongside=self.leases.alongside,  # the leases of the units it starts
            on_version=self._noter(driver),
        )
        return state, new

    def _noter(self, driver: RunDriver | None) -> Callable[[str, rn.RunState, int], None]:
        def note(run_id: str, state: rn.RunState, version: int) -> None:
            self.known.note(run_id, version)
            if driver is not None:
                driver.known = (state, version)

        return note

    async def _before_start(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        """Before a run starts, its pipeline must still be there."""
        if any(isinstance(e, rn.RunStarted) for e in new):
            pipeline, _ = await self.commands.load_pipeline(state.pipeline_id)
            if not pipeline.live:
                raise PipelineGone(state.pipeline_id)

    async def drive_once(self, run_id: str, driver: RunDriver | None = None) -> rn.RunState:
        """Take the run as far as it can go now: start it, run its stages and the steps of its jobs
        (several at once when jobs run in parallel), finish it."""
        if driver is not None:
            driver.wake.clear()
        try:
            state, new = await self._advance(run_id, driver)
        except PipelineGone:
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
                    self.running.add((run_id, unit.key, unit.attempt))
                    task = asyncio.create_task(self.units.execute(state, unit, driver), name=f"{run_id}:{unit.key}")
                    tasks[task] = unit
                if not tasks:
                    if not new:
                        if state.terminal:
                            await self.units.run_ended(state)
                        await self.timers.schedule(state)
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
                    await self.timers.schedule(state)
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
                    self.running.discard((run_id, unit_done.key, unit_done.attempt))
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
                # Unless the completion took them, the unit's last lines go on their own.
                self.closing_logs.store_later(run_id, unit.key, unit.attempt)
                self.running.discard((run_id, unit.key, unit.attempt))
            tasks.clear()
            if completing is not None:  # cut off while recording: the lease sweep recovers it
                self.closing_logs.store_later(run_id, completing.key, completing.attempt)
            raise

    async def _complete(
        self, run_id: str, unit: Unit, outcome: ScriptOutcome, driver: RunDriver | None = None, advance: bool = True
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        stage_id = unit.stage.id
        job = unit.job.name if unit.job else None
        step = unit.step.name if unit.step else None
        closing = self.closing_logs.get(run_id, unit.key, unit.attempt)
        last: LastChunks | None = None

        async def before_append(state: rn.RunState, new: list[rn.RunEvent]) -> None:
            # The unit's last log lines, once its log stopped appending (an earlier chunk being
            # appended lands first): the completion appends them ahead of itself.
            nonlocal last
            if closing is not None and last is None:
                last = await settled(closing)

        def alongside(state: rn.RunState, new: list[rn.RunEvent]) -> Alongside | None:
            # In the completion's transaction: the unit's last log lines (a view as of the
            # completion shows the whole output), the end of its lease, the leases of the units
            # it starts.
            before = [(last.stream, last.records)] if last is not None else []
            return self.leases.alongside(state, new, ended=(unit.key, unit.attempt), before=before)

        try:
            # A completion always appends (or is refused): the state the driver last saw saves a
            # read, and if it is stale the append loses the race and the command reads again.
            state, new = await self.commands.run_command(
                run_id,
                lambda at: completion(stage_id, job, step, unit.attempt, outcome, at, advance),
                before_append=before_append,
                alongside=alongside,
                on_version=self._noter(driver),
                known=driver.known if driver is not None else None,
            )
        except (Refused, NotFound) as exc:
            # Nothing was appended, and nothing will be: the last lines go on their own.
            self.closing_logs.store_later(run_id, unit.key, unit.attempt)
            if isinstance(exc, Refused):
                self.leases.release_later(run_id, unit.key, unit.attempt)
            raise
        # Any other failure keeps the lease and the last lines: the caller tries again, and if
        # this executor dies meanwhile the lease expires and the attempt is recovered.
        self.closing_logs.forget(run_id, unit.key, unit.attempt)
        if last is not None:
            await last.runlog.publish(last.chunks)  # the live tail, now that they are stored
        return state, new

    async def _complete_retrying(
        self, run_id: str, unit: Unit, outcome: ScriptOutcome, driver: RunDriver | None
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
