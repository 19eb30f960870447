"""The executor's side of agents: which agents are there (their records from the store, their
presence from the broker), handing units to them (fairly across organizations: the rule is
infra/agent/placement.py's), and recording only what an agent may say.

Trust: a report's agent is the one the broker says sent it (the subject's token, which the agent's
permissions pin). A report on a unit that was not handed to that agent, or on another attempt, is
refused (logged, counted in pipelines_agent_reports_refused)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from infra.agent import protocol as p
from infra.agent.placement import AgentView, Placement, Waiting
from infra.agent.registry import AgentStore
from infra.executor.scripts import ScriptOutcome
from infra.metrics import agent_reports_refused, agent_units

log = logging.getLogger("pipelines.executor.agents")

OnLine = Callable[[p.Stream, str], None]
# How long an agent has to accept a unit before it is handed to another.
ACCEPT_TIMEOUT = 5.0
# How often the executor reads the agents' records again (issued, revoked).
REFRESH = 2.0


@dataclass(eq=False)
class Pending(Waiting):
    """A waiting unit of this executor's, and what to tell when it is placed or why it waits."""

    placed: asyncio.Future[str] | None = None
    on_wait: Callable[[str | None], None] | None = None


@dataclass(frozen=True)
class Handed:
    """A unit an agent took: whose, and how many other units were handed out while it waited."""

    org: str | None
    run_id: str
    ahead: int


@dataclass
class Dispatched:
    unit: str
    agent: str
    run_id: str
    key: str
    attempt: int
    on_line: OnLine
    accepted: asyncio.Future[str | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    outcome: asyncio.Future[ScriptOutcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    heard: float = 0.0


class Agents:
    def __init__(self, nc: NATS, executor_id: str, store: AgentStore, *, lease_ttl: float, kill_grace: float) -> None:
        self.nc = nc
        self.executor_id = executor_id
        self.store = store
        self.ttl = lease_ttl
        self.kill_grace = kill_grace
        self.placement = Placement(lease_ttl=lease_ttl)
        self.agents = self.placement.agents
        self._dispatched: dict[str, Dispatched] = {}
        self._run_agents: dict[str, set[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[object] = []
        # The units handed out, in order (the last 10,000): what fairness is checked on.
        self.handed: deque[Handed] = deque(maxlen=10_000)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._subs = [
            await self.nc.subscribe(f"{p.AGENTS}.*.presence", cb=self._on_presence),
            await self.nc.subscribe(f"{p.AGENTS}.*.report.{self.executor_id}", cb=self._on_report),
        ]
        self._tasks = [asyncio.create_task(self._refresh_loop()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]

    async def refresh(self) -> None:
        records = await self.store.active()
        for ident in list(self.agents):
            if ident not in records:  # revoked
                del self.agents[ident]
        for ident, record in records.items():
            view = self.agents.get(ident)
            if view is None:
                self.agents[ident] = AgentView(record)
            else:
                view.record = record
        self._pump()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("cannot read the agents: %s", exc)

    # ---- placing units ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand out what can be handed out now (infra/agent/placement.py says who gets what)."""
        for unit, agent in self.placement.place(asyncio.get_running_loop().time()):
            assert isinstance(unit, Pending) and unit.placed is not None and unit.on_wait is not None
            if agent is None:
                unit.on_wait(unit.reason)
            elif unit.placed.done():  # withdrawn meanwhile: the slot is not taken after all
                self.agents[agent].mine = max(0, self.agents[agent].mine - 1)
            else:
                unit.placed.set_result(agent)

    # ---- running a unit --------------------------------------------------------------------

    async def run(
        self,
        *,
        org: str | None,
        run_id: str,
        key: str,
        attempt: int,
        labels: tuple[str, ...],
        job: tuple[str, str, str] | None,
        command: str,
        env: dict[str, str],
        timeout: float,
        on_line: OnLine,
        on_wait: Callable[[str | None], None],
        stopper: RemoteStop,
    ) -> ScriptOutcome:
        """Hand the unit to an agent (waiting for one as long as it takes) and wait for its outcome.
        An agent that goes quiet for a lease's time is lost: the attempt fails (its retry policy
        decides), and the agent, if it is still there, kills it."""
        loop = asyncio.get_running_loop()
        while True:
            pending = Pending(
                org=org,
                labels=labels,
                job=job,
                placed=loop.create_future(),
                on_wait=on_wait,
            )
            assert pending.placed is not None
            stopper.pending = pending
            self.placement.add(pending)
            self._pump()
            try:
                agent = await pending.placed
            except asyncio.CancelledError:
                if pending.placed.cancelled() and stopper.stopped:
                    return ScriptOutcome(exit_code=None, killed=True)
                raise
            finally:
                pending.gone = True
                stopper.pending = None
            d = Dispatched(secrets.token_hex(12), agent, run_id, key, attempt, on_line, heard=loop.time())
            self._dispatched[d.unit] = d
            stopper.dispatched = d
            try:
                assign = p.Assign(
                    unit=d.unit,
                    executor=self.executor_id,
                    run_id=run_id,
                    org=org,
                    key=key,
                    attempt=attempt,
                    command=command,
                    env=env,
                    timeout=timeout,
                    kill_grace=self.kill_grace,
                )
                await self.nc.publish(p.work_subject(agent), p.encode(assign))
                try:
                    refused = await asyncio.wait_for(asyncio.shield(d.accepted), ACCEPT_TIMEOUT)
                except TimeoutError:
                    refused = "it did not answer"
                    view = self.agents.get(agent)
                    if view is not None:
                        view.seen = -1e9  # nothing more for it until it says it is there again
                    with contextlib.suppress(Exception):
                        await self._cancel(d)  # should it take it after all
                if refused is not None:
                    log.info("run %s: agent %s did not take %s: %s", run_id, agent, key, refused)
                    self._release(d, full=True)
                    if stopper.stopped:
                        return ScriptOutcome(exit_code=None, killed=True)
                    continue  # queued again, at the back of its organization's queue
                if pending.reason is not None:
                    on_wait(None)  # no longer waiting
                self.handed.append(Handed(org, run_id, pending.ahead))
                self._run_agents.setdefault(run_id, set()).add(agent)
                if job is not None:
                    self.placement.job_agents[job] = agent
                if stopper.stopped:
                    await self._cancel(d)
                outcome = await asyncio.shield(d.outcome)
                agent_units.labels("lost" if outcome.exit_code is None and outcome.error else "ended").inc()
                return outcome
            except asyncio.CancelledError:
                # The executor is stopping: the agent kills it (and would, when its renewals go
                # unanswered, anyway).
                with contextlib.suppress(Exception):
                    await self._cancel(d)
                raise
            finally:
                stopper.dispatched = None
                if self._dispatched.get(d.unit) is d:
                    self._release(d)

    def _release(self, d: Dispatched, *, full: bool = False) -> None:
        self._dispatched.pop(d.unit, None)
        view = self.agents.get(d.agent)
        if view is not None:
            view.mine = max(0, view.mine - 1)
            if full:
                view.full_until = asyncio.get_running_loop().time() + 1.0
        self._pump()

    async def _cancel(self, d: Dispatched) -> None:
        await self.nc.publish(p.work_subject(d.agent), p.encode(p.Cancel(unit=d.unit)))

    def run_ended(self, run_id: str) -> None:
        """Tell the agents that ran the run's units to free its working directory."""
        agents = self._run_agents.pop(run_id, set())
        for job in [j for j in self.placement.job_agents if j[0] == run_id]:
            del self.placement.job_agents[job]
        for agent in agents:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().create_task(
                    self.nc.publish(p.work_subject(agent), p.encode(p.RunEnded(run_id=run_id)))
                )

    # ---- what agents say -------------------------------------------------------------------

    async def _on_presence(self, msg: Msg) -> None:
        agent = msg.subject.split(".")[3]
        view = self.agents.get(agent)
        if view is None:
            return  # not (or no longer) an agent we know: the broker would not let a revoked one in
        try:
            presence = p.decode_presence(msg.data)
        except Exception:
            return
        view.seen = asyncio.get_running_loop().time()
        view.running = presence.running
        view.full_until = 0.0
        self._pump()

    def _refuse(self, agent: str, reason: str, what: str) -> None:
        agent_reports_refused.labels(reason).inc()
        log.warning("refused a report of agent %s: %s (%s)", agent, what, reason)

    async def _on_report(self, msg: Msg) -> None:
        agent = msg.subject.split(".")[3]
        try:
            report = p.decode_report(msg.data)
        except Exception as exc:
            self._refuse(agent, "undecodable", str(exc)[:200])
            return
        now = asyncio.get_running_loop().time()
        if isinstance(report, p.Renew):
            valid = []
            for unit in report.units:
                d = self._dispatched.get(unit)
                if d is not None and d.agent == agent:
                    d.heard = now
                    valid.append(unit)
            answer = p.Renewed(asked=report.units, valid=valid)
            with contextlib.suppress(Exception):
                await self.nc.publish(p.work_subject(agent), p.encode(answer))
            return
        d = self._dispatched.get(report.unit)
        if d is None:
            self._refuse(agent, "unknown unit", f"{report.__class__.__name__.lower()} on unit {report.unit[:40]}")
            return
        if d.agent != agent:
            self._refuse(agent, "not its unit", f"unit {d.unit} of run {d.run_id} was handed to {d.agent}")
            return
        if isinstance(report, (p.Lines, p.Finished)) and report.attempt != d.attempt:
            self._refuse(agent, "stale attempt", f"attempt {report.attempt} of {d.key}; the current is {d.attempt}")
            return
        d.heard = now
        if isinstance(report, p.Accepted):
            if not d.accepted.done():
                d.accepted.set_result(None)
        elif isinstance(report, p.Refused):
            if not d.accepted.done():
                d.accepted.set_result(report.reason or "refused")
        elif isinstance(report, p.Lines):
            for stream, text in report.lines:
                d.on_line(stream, text)
        elif isinstance(report, p.Finished):
            if not d.accepted.done():
                d.accepted.set_result(None)
            if not d.outcome.done():
                self.placement.finished(agent)  # its slot is free now (the run's release hands it out)
                d.outcome.set_result(
                    ScriptOutcome(
                        exit_code=report.exit_code,
                        timed_out=report.timed_out,
                        killed=report.killed,
                        error=report.error,
                    )
                )

    async def _watch(self) -> None:
        """Units whose agent went quiet for a lease's time are lost."""
        while True:
            await asyncio.sleep(max(self.ttl / 3, 0.1))
            now = asyncio.get_running_loop().time()
            for d in list(self._dispatched.values()):
                if d.accepted.done() and not d.outcome.done() and now - d.heard > self.ttl:
                    name = self.agents[d.agent].record.name if d.agent in self.agents else d.agent
                    log.warning("run %s: agent %s lost while running %s", d.run_id, d.agent, d.key)
                    d.outcome.set_result(
                        ScriptOutcome(
                            exit_code=None,
                            error=f"agent lost: agent {name} stopped answering for {self.ttl:g} s while running this",
                        )
                    )

    def waiting(self) -> int:
        return self.placement.waiting()


class RemoteStop:
    """What a run's stop reaches for a unit handed (or to be handed) to an agent: the same
    `stop()`/`finished`/`pid` as a local ScriptRun."""

    def __init__(self, agents: Agents) -> None:
        self._agents = agents
        self.pending: Pending | None = None
        self.dispatched: Dispatched | None = None
        self.stopped = False
        self.finished = False
        self.pid: int | None = None  # nothing of ours to kill on this host

    async def stop(self) -> None:
        self.stopped = True
        if self.pending is not None and self.pending.placed is not None and not self.pending.placed.done():
            self.pending.gone = True
            self.pending.placed.cancel()
        if self.dispatched is not None:
            with contextlib.suppress(Exception):
                await self._agents._cancel(self.dispatched)
