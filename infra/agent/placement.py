"""Which agent gets which waiting unit: the fairness rule, kept apart from the broker so that it can
be reasoned about (and tested) on its own.

Units wait per organization, first come first served within one organization. A free slot goes to the
organizations in turn (round robin: the organization served last goes to the back), so an
organization's burst cannot starve another's. A unit that no free agent can take (labels,
organization, its job's agent) does not hold up the units behind it. Among the agents that fit, the
least busy one gets the unit; a job's later steps go to the agent that ran its earlier ones while
that agent is there (they share the job's working directory)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass

from infra.agent.registry import AgentRecord

__all__ = ["AgentView", "Placement", "Waiting"]


@dataclass
class AgentView:
    record: AgentRecord
    seen: float = -1e9  # (monotonic) time of its last presence
    running: int = 0  # as it last said
    mine: int = 0  # units this executor handed it that have not ended
    full_until: float = 0.0  # it refused a unit: not before its next presence


@dataclass(eq=False)
class Waiting:
    """A unit waiting for an agent."""

    org: str | None
    labels: tuple[str, ...]
    job: tuple[str, str, str] | None  # (run, stage, job): its steps go to one agent
    reason: str | None = None  # why it waits, once it has waited
    gone: bool = False  # withdrawn (stopped): skipped and dropped
    queued_at: int = 0  # how many units had been handed out when it was queued
    ahead: int = 0  # once handed out: how many units were handed out while it waited


def _labels(labels: tuple[str, ...]) -> str:
    return ", ".join(labels)


class Placement:
    def __init__(self, *, lease_ttl: float) -> None:
        self.ttl = lease_ttl
        self.agents: dict[str, AgentView] = {}
        self._queues: OrderedDict[str | None, deque[Waiting]] = OrderedDict()
        self.job_agents: dict[tuple[str, str, str], str] = {}
        self.handed_out = 0

    def add(self, unit: Waiting) -> None:
        unit.queued_at = self.handed_out
        self._queues.setdefault(unit.org, deque()).append(unit)

    def waiting(self) -> int:
        return sum(1 for q in self._queues.values() for u in q if not u.gone)

    def finished(self, agent: str) -> None:
        """A unit this executor handed `agent` ended there (its outcome arrived): the agent's last
        presence counted it as running, and waiting for the next one (each second) to learn that its
        slot is free would leave the slot idle meanwhile. The next presence says the truth again."""
        view = self.agents.get(agent)
        if view is not None:
            view.running = max(0, view.running - 1)

    def alive(self, view: AgentView, now: float) -> bool:
        return now - view.seen <= max(self.ttl, 3.0)

    def _free(self, view: AgentView, now: float) -> bool:
        return self.alive(view, now) and now >= view.full_until and max(view.running, view.mine) < view.record.capacity

    @staticmethod
    def _fits(view: AgentView, unit: Waiting) -> bool:
        org_ok = view.record.org is None or view.record.org == unit.org
        return org_ok and set(unit.labels) <= set(view.record.labels)

    def choose(self, unit: Waiting, now: float) -> tuple[str | None, str]:
        """The agent to hand the unit to now, or why none."""
        wanted = f" with {_labels(unit.labels)}" if unit.labels else ""
        if unit.job is not None:
            previous = self.job_agents.get(unit.job)
            view = self.agents.get(previous) if previous is not None else None
            if view is not None and self.alive(view, now):
                if self._free(view, now):
                    return view.record.id, ""
                return None, f"waiting for agent {view.record.name}, which runs this job's earlier steps"
        fitting = [v for v in self.agents.values() if self._fits(v, unit) and self.alive(v, now)]
        free = [v for v in fitting if self._free(v, now)]
        if free:
            best = min(free, key=lambda v: (max(v.running, v.mine) / v.record.capacity, v.record.id))
            return best.record.id, ""
        if fitting:
            return None, f"waiting for a free agent{wanted} ({len(fitting)} busy)"
        return None, f"waiting for an agent{wanted}"

    def place(self, now: float) -> Iterator[tuple[Waiting, str | None]]:
        """Hand out what can be handed out now, the organizations in turn: yields (unit, agent) for each
        unit handed out (its agent's slot taken), and (unit, None) for a unit whose reason to wait
        changed (in `unit.reason`)."""
        while True:
            placed = False
            for org in list(self._queues):
                queue = self._queues[org]
                for unit in list(queue):
                    if unit.gone:
                        queue.remove(unit)
                        continue
                    agent, reason = self.choose(unit, now)
                    if agent is None:
                        if reason != unit.reason:
                            unit.reason = reason
                            yield unit, None
                        continue
                    queue.remove(unit)
                    self.agents[agent].mine += 1
                    unit.ahead = self.handed_out - unit.queued_at
                    self.handed_out += 1
                    self._queues.move_to_end(org)  # served: the others come first next time
                    placed = True
                    yield unit, agent
                    break
                if not queue:
                    del self._queues[org]
                if placed:
                    break
            if not placed:
                return
