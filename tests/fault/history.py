"""Checks on a run's event history as `GET /pipelines/:id/runs/:runId/events` returns it.

Shared by the race tests (tests/integration/test_races.py) and the fault suite: fold the run
stream with `domain.run.evolve`, keep the status before and after every event, and list what
contradicts the run's state machine (DESIGN.md, "Run status").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from domain import events as ev
from domain import run as rn
from projections.views import run_view

# The run commands of the API, the event each one records when accepted, where it is allowed
# from (DESIGN.md), and the run status it answers with.
COMMANDS: tuple[str, ...] = ("approve", "reject", "cancel", "stop", "pause", "resume")
EVENT_OF: dict[str, str] = {
    "approve": "run_approved",
    "reject": "run_rejected",
    "cancel": "run_cancelled",
    "stop": "run_stopped",
    "pause": "run_paused",
    "resume": "run_resumed",
}
COMMAND_OF: dict[str, str] = {v: k for k, v in EVENT_OF.items()}
ACTIVE: frozenset[str] = frozenset({"queued", "running", "waiting_approval", "paused"})
ALLOWED_FROM: dict[str, frozenset[str]] = {
    "approve": frozenset({"waiting_approval"}),
    "reject": frozenset({"waiting_approval"}),
    "cancel": ACTIVE,
    "stop": ACTIVE,
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused"}),
}
ANSWERS: dict[str, str] = {
    "approve": "running",
    "reject": "failed",
    "cancel": "cancelled",
    "stop": "cancelled",
    "pause": "paused",
    "resume": "running",
}
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
STATUSES: frozenset[str] = TERMINAL | ACTIVE


@dataclass
class Step:
    """One event of the run stream, with the run's status before and after it."""

    type: str
    before: str
    after: str
    position: int
    event: Any


@dataclass
class History:
    run_id: str
    steps: list[Step]
    state: rn.RunState
    logs: list[rn.LogAppended]
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.state.status

    @property
    def statuses(self) -> set[str]:
        """Every status the run has been in."""
        return {s.after for s in self.steps}

    def controls(self) -> list[Step]:
        """The events recorded for accepted commands, in stream order."""
        return [s for s in self.steps if s.type in COMMAND_OF]

    def view(self) -> dict[str, Any]:
        """The run object (API JSON) that the folded history gives."""
        out: dict[str, Any] = msgspec.to_builtins(run_view(self.state, self.logs))
        return out


def fold_history(run_id: str, records: list[dict[str, Any]]) -> History:
    """Fold the records of `GET .../events` and list every invariant they break."""
    problems: list[str] = []
    positions = [r["position"] for r in records]
    if positions != sorted(positions) or len(set(positions)) != len(positions):
        problems.append(f"event positions are not strictly increasing: {positions}")
    run_records = [r for r in records if r["streamId"] == f"run-{run_id}"]
    log_records = [r for r in records if r["streamId"] == f"runlog-{run_id}"]
    others = [r for r in records if r not in run_records and r not in log_records]
    if others:
        problems.append(f"events of other streams in the run's history: {[r['streamId'] for r in others]}")
    versions = [r["streamVersion"] for r in run_records]
    if versions != list(range(1, len(versions) + 1)):
        problems.append(f"run stream versions are not 1..n in position order: {versions}")
    log_versions = [r["streamVersion"] for r in log_records]
    if log_versions != list(range(1, len(log_versions) + 1)):
        problems.append(f"log stream versions are not 1..n in position order: {log_versions}")

    state = rn.initial_state
    steps: list[Step] = []
    for i, rec in enumerate(run_records):
        event = ev.decode(json.dumps(rec["data"]))
        if rec["type"] != ev.event_type(event):
            problems.append(f"record {rec['position']} says type {rec['type']} but holds {ev.event_type(event)}")
        if isinstance(event, rn.LogAppended) or not isinstance(event, ev.RUN_EVENTS):
            problems.append(f"a {rec['type']} event on the run stream")
            continue
        if i == 0 and not isinstance(event, rn.RunTriggered):
            problems.append(f"the run stream starts with {rec['type']}, not run_triggered")
        before = state.status if state.exists else "(none)"
        try:
            state = rn.evolve(state, cast(rn.RunEvent, event))
        except Exception as exc:  # a history the fold cannot take is itself a finding
            problems.append(f"evolve failed on {rec['type']} at position {rec['position']}: {exc!r}")
            continue
        steps.append(Step(rec["type"], before, state.status, rec["position"], event))

    for s in steps:
        if s.before in TERMINAL and s.after != s.before:
            problems.append(f"{s.type} at {s.position} moved a {s.before} run to {s.after}")
        if s.type == "stage_started" and s.before != "running":
            problems.append(f"a stage started at {s.position} while the run was {s.before}")
        if s.type in COMMAND_OF:
            command = COMMAND_OF[s.type]
            if s.before not in ALLOWED_FROM[command]:
                problems.append(f"{command} was recorded at {s.position} although the run was {s.before}")
        if s.type == "run_succeeded" and s.before != "running":
            problems.append(f"run_succeeded at {s.position} from {s.before}")
        if s.type == "run_failed" and s.before not in ("running", "paused", "waiting_approval"):
            problems.append(f"run_failed at {s.position} from {s.before}")
    terminal_events = [s for s in steps if s.after in TERMINAL and s.before not in TERMINAL]
    if len(terminal_events) > 1:
        problems.append(f"the run ended more than once: {[s.type for s in terminal_events]}")

    logs: list[rn.LogAppended] = []
    for rec in log_records:
        event = ev.decode(json.dumps(rec["data"]))
        if not isinstance(event, rn.LogAppended):
            problems.append(f"a {rec['type']} event on the log stream")
            continue
        logs.append(event)
    return History(run_id=run_id, steps=steps, state=state, logs=logs, problems=problems)


def describe(history: History) -> str:
    return " -> ".join(f"{s.type}[{s.after}]" for s in history.steps)
