"""The placement rule (infra/agent/placement.py): organizations in turn, FIFO within one, labels and
organization respected, a job's steps on one agent, a unit nobody can take holding up nobody."""

from __future__ import annotations

from datetime import UTC, datetime

from infra.agent.placement import AgentView, Placement, Waiting
from infra.agent.registry import AgentRecord

NOW = 100.0


def placement(*agents: tuple[str, tuple[str, ...], int, str | None]) -> Placement:
    p = Placement(lease_ttl=10)
    for ident, labels, capacity, org in agents:
        record = AgentRecord(ident, org, ident, labels, capacity, "admin", datetime(2026, 1, 1, tzinfo=UTC))
        p.agents[ident] = AgentView(record, seen=NOW)
    return p


def hand_out(p: Placement) -> list[tuple[Waiting, str]]:
    return [(u, a) for u, a in p.place(NOW) if a is not None]


def free_one(p: Placement, agent: str) -> None:
    p.agents[agent].mine -= 1


def test_a_burst_of_one_organization_gets_every_other_slot_while_another_waits() -> None:
    p = placement(("a1", ("linux",), 1, None))
    burst = [Waiting(org="big", labels=("linux",), job=None) for _ in range(50)]
    for unit in burst:
        p.add(unit)
    order: list[Waiting] = [u for u, _ in hand_out(p)]  # the first of the burst takes the one slot
    lone = Waiting(org="small", labels=("linux",), job=None)
    p.add(lone)
    for _ in range(4):
        free_one(p, "a1")
        order += [u for u, _ in hand_out(p)]
    # The newcomer joins the turn after the organization already waiting: one more of the burst, then
    # it, then the burst again (first come first served within it).
    assert order == [burst[0], burst[1], lone, burst[2], burst[3]]
    assert lone.ahead == 1 and burst[3].ahead == 4


def test_a_unit_goes_only_to_an_agent_with_all_its_labels_and_its_organization() -> None:
    p = placement(("plain", ("linux",), 4, None), ("arm", ("arm64", "linux"), 4, "acme"))
    arm = Waiting(org="acme", labels=("arm64", "linux"), job=None)
    other_org = Waiting(org="globex", labels=("arm64",), job=None)
    anywhere = Waiting(org="globex", labels=("linux",), job=None)
    for unit in (arm, other_org, anywhere):
        p.add(unit)
    handed = dict((id(u), a) for u, a in hand_out(p))
    assert handed == {id(arm): "arm", id(anywhere): "plain"}
    assert other_org.reason == "waiting for an agent with arm64"
    assert p.waiting() == 1


def test_a_unit_nobody_can_take_holds_up_nobody_and_says_why() -> None:
    p = placement(("a1", ("linux",), 1, None))
    gpu = Waiting(org="o", labels=("gpu",), job=None)
    linux = Waiting(org="o", labels=("linux",), job=None)
    p.add(gpu)
    p.add(linux)
    assert [u for u, _ in hand_out(p)] == [linux]
    assert gpu.reason == "waiting for an agent with gpu"
    late = Waiting(org="o", labels=("linux",), job=None)
    p.add(late)
    assert hand_out(p) == []
    assert late.reason == "waiting for a free agent with linux (1 busy)"


def test_a_jobs_later_steps_wait_for_the_agent_of_its_earlier_ones_while_it_is_there() -> None:
    p = placement(("a1", ("linux",), 1, None), ("a2", ("linux",), 1, None))
    job = ("run", "stage", "build")
    p.job_agents[job] = "a2"
    p.agents["a2"].mine = 1  # busy
    step = Waiting(org="o", labels=("linux",), job=job)
    p.add(step)
    assert hand_out(p) == []
    assert step.reason == "waiting for agent a2, which runs this job's earlier steps"
    p.agents["a2"].seen = NOW - 60  # gone: any agent that fits
    assert [a for _, a in hand_out(p)] == ["a1"]


def test_the_least_busy_agent_gets_the_unit_and_a_withdrawn_unit_is_dropped() -> None:
    p = placement(("a1", (), 4, None), ("a2", (), 4, None))
    p.agents["a1"].running = 3
    gone = Waiting(org="o", labels=(), job=None, gone=True)
    unit = Waiting(org="o", labels=(), job=None)
    p.add(gone)
    p.add(unit)
    assert hand_out(p) == [(unit, "a2")]
    assert p.waiting() == 0


def test_a_slot_freed_by_a_finished_unit_is_handed_out_before_the_agents_next_presence() -> None:
    # The agent said (presence, each second) it runs its one unit; that unit's outcome then arrived.
    # Waiting for the next presence to learn that the slot is free would leave it idle for up to a
    # second after every unit (half the throughput of units of half a second: docs/benchmarks.md).
    p = placement(("a1", ("linux",), 1, None))
    first, second = Waiting(org=None, labels=(), job=None), Waiting(org=None, labels=(), job=None)
    p.add(first)
    p.add(second)
    assert [u for u, _ in hand_out(p)] == [first]
    p.agents["a1"].running = 1  # its presence: busy
    free_one(p, "a1")
    p.finished("a1")  # the outcome of the unit it ran
    assert [u for u, _ in hand_out(p)] == [second]
