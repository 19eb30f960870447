"""The executor's side of agents: which agents are there (their records from the store, their
presence from the broker), handing units to them fairly, and recording only what an agent may say.

Fairness: units waiting for an agent are queued per organization, first come first served within
one organization; a free slot goes to the organizations in turn (round robin), so an organization
with a burst of 50 runs gets every other slot while another has one waiting, not all 50 first. A
unit that no free agent can take (labels, organization, its job's agent) does not hold up the ones
behind it.

Trust: a report's agent is the one the broker says sent it (the subject's token, which the agent's
permissions pin). A report on a unit that was not handed to that agent, or on another attempt, is
refused (logged, counted in pipelines_agent_reports_refused)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from infra.agent import protocol as p
from infra.agent.registry import AgentRecord, AgentStore
from infra.executor.scripts import ScriptOutcome
from infra.metrics import agent_reports_refused, agent_units

log = logging.getLogger("pipelines.executor.agents")

OnLine = Callable[[p.Stream, str], None]
# How long an agent has to accept a unit before it is handed to another.
ACCEPT_TIMEOUT = 5.0
# How often the executor reads the agents' records again (issued, revoked).
REFRESH = 2.0


@dataclass
class AgentView:
    record: AgentRecord
    seen: float = -1e9  # loop time of its last presence
    running: int = 0  # as it last said
    mine: int = 0  # units this executor handed it that have not ended
    full_until: float = 0.0  # it refused a unit: not before its next presence


@dataclass
class Pending:
    seq: int
    org: str | None
    labels: tuple[str, ...]
    job: tuple[str, str, str] | None  # (run, stage, job): its steps go to one agent
    placed: asyncio.Future[str]
    on_wait: Callable[[str | None], None]
    reason: str | None = None
    # How many units had been handed out when this one was queued.
    queued_at: int = 0


@dataclass(frozen=True)
class Handed:
    """A unit handed out: whose, and how many other units were handed out while it waited."""

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


def _labels(labels: tuple[str, ...]) -> str:
    return ", ".join(labels)


class Agents:
    def __init__(self, nc: NATS, executor_id: str, store: AgentStore, *, lease_ttl: float, kill_grace: float) -> None:
        self.nc = nc
        self.executor_id = executor_id
        self.store = store
        self.ttl = lease_ttl
        self.kill_grace = kill_grace
        self.agents: dict[str, AgentView] = {}
        # Per organization, its units waiting for an agent (FIFO); the order of organizations is
        # the round robin's (the one served last goes to the end).
        self._queues: OrderedDict[str | None, deque[Pending]] = OrderedDict()
        self._seq = itertools.count()
        self._dispatched: dict[str, Dispatched] = {}
        self._job_agents: dict[tuple[str, str, str], str] = {}
        self._run_agents: dict[str, set[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[object] = []
        # The units handed out, in order (the last 10,000): what fairness is checked on.
        self.handed: deque[Handed] = deque(maxlen=10_000)
        self._handed_total = 0

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

    def _alive(self, view: AgentView, now: float) -> bool:
        return now - view.seen <= max(self.ttl, 3.0)

    def _free(self, view: AgentView, now: float) -> bool:
        return self._alive(view, now) and now >= view.full_until and max(view.running, view.mine) < view.record.capacity

    def _fits(self, view: AgentView, pending: Pending) -> bool:
        return (view.record.org is None or view.record.org == pending.org) and set(pending.labels) <= set(
            view.record.labels
        )

    def _choose(self, pending: Pending, now: float) -> tuple[str | None, str]:
        """The agent to hand the unit to now, or why none."""
        wanted = f" with {_labels(pending.labels)}" if pending.labels else ""
        if pending.job is not None:
            previous = self._job_agents.get(pending.job)
            view = self.agents.get(previous) if previous is not None else None
            if view is not None and self._alive(view, now):
                # A job is a unit of work for a single agent: its steps share the working directory.
                if self._free(view, now):
                    return view.record.id, ""
                return None, f"waiting for agent {view.record.name}, which runs this job's earlier steps"
        fitting = [v for v in self.agents.values() if self._fits(v, pending) and self._alive(v, now)]
        free = [v for v in fitting if self._free(v, now)]
        if free:
            # The least busy one: units spread over agents.
            best = min(free, key=lambda v: (max(v.running, v.mine) / v.record.capacity, v.record.id))
            return best.record.id, ""
        if fitting:
            return None, f"waiting for a free agent{wanted} ({len(fitting)} busy)"
        return None, f"waiting for an agent{wanted}"

    def _pump(self) -> None:
        """Hand out what can be handed out now, the organizations in turn."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while True:
            placed = False
            for org in list(self._queues):
                queue = self._queues[org]
                for pending in list(queue):
                    if pending.placed.done():  # cancelled meanwhile
                        queue.remove(pending)
                        continue
                    agent, reason = self._choose(pending, now)
                    if agent is None:
                        if reason != pending.reason:
                            pending.reason = reason
                            pending.on_wait(reason)
                        continue
                    queue.remove(pending)
                    view = self.agents[agent]
                    view.mine += 1
                    pending.placed.set_result(agent)
                    self._queues.move_to_end(org)  # served: the others come first next time
                    placed = True
                    break
                if not queue:
                    del self._queues[org]
                if placed:
                    break
            if not placed:
                return

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
                next(self._seq), org, labels, job, loop.create_future(), on_wait, queued_at=self._handed_total
            )
            stopper.pending = pending
            self._queues.setdefault(org, deque()).append(pending)
            self._pump()
            try:
                agent = await pending.placed
            except asyncio.CancelledError:
                if pending.placed.cancelled() and stopper.stopped:
                    return ScriptOutcome(exit_code=None, killed=True)
                raise
            finally:
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
                self.handed.append(Handed(org, run_id, self._handed_total - pending.queued_at))
                self._handed_total += 1
                self._run_agents.setdefault(run_id, set()).add(agent)
                if job is not None:
                    self._job_agents[job] = agent
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
        for job in [j for j in self._job_agents if j[0] == run_id]:
            del self._job_agents[job]
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
        return sum(len(q) for q in self._queues.values())


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
        if self.pending is not None and not self.pending.placed.done():
            self.pending.placed.cancel()
        if self.dispatched is not None:
            with contextlib.suppress(Exception):
                await self._agents._cancel(self.dispatched)
