"""Checks on a run's event history as `GET /pipelines/:id/runs/:runId/events` returns it.

Shared by the race tests (tests/integration/test_races.py) and the fault suite: fold the run
stream with `domain.run.evolve`, keep the status before and after every event, and list what
contradicts the run's state machine (DESIGN.md, "Run status") and, for stages of jobs, the life of
every job and step (`step_problems`). `effect_problems` compares what the scripts themselves
recorded with the attempts the history holds.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from domain import events as ev
from domain import run as rn
from domain.errors import Refused
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


# A step of a job: (stage id, job name, step name).
StepKey = tuple[str, str, str]


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

    def stage_attempts(self) -> Counter[str]:
        """How many attempts of each stage started."""
        return Counter(s.event.stage_id for s in self.steps if s.type == "stage_started")

    def step_attempts(self) -> Counter[StepKey]:
        """How many attempts of each step of a job started, by (stage id, job, step)."""
        return Counter(
            (s.event.stage_id, s.event.job, s.event.step) for s in self.steps if isinstance(s.event, rn.StepStarted)
        )

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

    problems += step_problems(steps, state)

    logs: list[rn.LogAppended] = []
    for rec in log_records:
        event = ev.decode(json.dumps(rec["data"]))
        if not isinstance(event, rn.LogAppended):
            problems.append(f"a {rec['type']} event on the log stream")
            continue
        logs.append(event)
    return History(run_id=run_id, steps=steps, state=state, logs=logs, problems=problems)


def _step_name(key: StepKey) -> str:
    stage_id, job, step = key
    return f"step {step} of job {job} (stage {stage_id})"


def step_problems(steps: list[Step], state: rn.RunState) -> list[str]:
    """The life of jobs and steps in stages of jobs:

    - a job starts at most once, only after every job it needs finished, and finishes at most once,
      never while one of its steps still runs;
    - a step starts only inside its running job while the run is running (or waits at another gate),
      its attempts are 1, 2, ... and each starts at most once;
    - every started attempt ends with its own step_finished or step_retry_scheduled (an approval step
      with run_approved/run_rejected); when the run ended, an attempt left open must have been
      settled by the run's end (a waiting gate cancelled), never still `running`;
    - a run that succeeded has every job succeeded or skipped (or failed with continueOnError), and
      every step of those jobs too.
    """
    problems: list[str] = []
    open_steps: dict[StepKey, tuple[int, int]] = {}  # attempt, position of its step_started
    last_attempt: dict[StepKey, int] = {}
    started: dict[tuple[StepKey, int], int] = {}
    jobs_started: dict[tuple[str, str], int] = {}
    jobs_finished: dict[tuple[str, str], int] = {}

    def close(key: StepKey, attempt: int | None, s: Step) -> None:
        what = _step_name(key)
        if key not in open_steps:
            if isinstance(s.event, rn.StepFinished) and s.event.attempt == 0:
                return  # decided without running (skipped, or its `when` failed)
            problems.append(f"{s.type} at {s.position} for {what} attempt {attempt}, which was not running")
            return
        running, _ = open_steps.pop(key)
        if attempt is not None and attempt != running:
            problems.append(f"{s.type} at {s.position} for {what} names attempt {attempt}, but attempt {running} ran")

    for s in steps:
        e = s.event
        if isinstance(e, rn.JobStarted):
            jk = (e.stage_id, e.job)
            if jk in jobs_started:
                problems.append(f"job {e.job} (stage {e.stage_id}) started again at {s.position}")
            jobs_started.setdefault(jk, s.position)
            if s.before not in ("running", "waiting_approval"):
                problems.append(f"job {e.job} started at {s.position} while the run was {s.before}")
            with contextlib.suppress(Refused, LookupError):
                for need in state.job(e.stage_id, e.job).needs:
                    if (e.stage_id, need) not in jobs_finished:
                        problems.append(f"job {e.job} started at {s.position} before job {need}, which it needs, ended")
        elif isinstance(e, rn.JobFinished):
            jk = (e.stage_id, e.job)
            if jk in jobs_finished:
                problems.append(f"job {e.job} (stage {e.stage_id}) finished again at {s.position}")
            jobs_finished.setdefault(jk, s.position)
            still = [k for k in open_steps if (k[0], k[1]) == jk]
            if still:
                problems.append(f"job {e.job} finished {e.status} at {s.position} while {_step_name(still[0])} ran")
        elif isinstance(e, rn.StepStarted):
            key = (e.stage_id, e.job, e.step)
            what = _step_name(key)
            if (key, e.attempt) in started:
                problems.append(
                    f"attempt {e.attempt} of {what} started twice, at {started[key, e.attempt]} and {s.position}"
                )
            elif e.attempt != last_attempt.get(key, 0) + 1:
                problems.append(
                    f"attempt {e.attempt} of {what} started at {s.position} after attempt {last_attempt.get(key, 0)}"
                )
            if key in open_steps:
                problems.append(
                    f"attempt {e.attempt} of {what} started at {s.position} while attempt {open_steps[key][0]} ran"
                )
            if s.before not in ("running", "waiting_approval"):
                problems.append(f"{what} started at {s.position} while the run was {s.before}")
            jk = (e.stage_id, e.job)
            if jk not in jobs_started or jk in jobs_finished:
                problems.append(f"{what} started at {s.position} outside its job's run")
            started.setdefault((key, e.attempt), s.position)
            last_attempt[key] = max(last_attempt.get(key, 0), e.attempt)
            open_steps[key] = (e.attempt, s.position)
        elif isinstance(e, rn.StepFinished | rn.StepRetryScheduled):
            close((e.stage_id, e.job, e.step), e.attempt, s)
        elif isinstance(e, rn.RunApproved | rn.RunRejected) and e.job is not None and e.step is not None:
            close((e.stage_id, e.job, e.step), None, s)

    for key, (attempt, position) in open_steps.items():
        now: str = "(unknown)"
        with contextlib.suppress(Refused, LookupError):
            now = state.step_run(*key).status
        if state.terminal and now in ("running", "queued"):
            problems.append(
                f"the run ended {state.status}, but attempt {attempt} of {_step_name(key)} (started at {position}) "
                f"never finished: it is still {now}"
            )

    if state.status == "succeeded":
        for stage, sr in zip(state.stages, state.stage_runs, strict=False):
            if stage.type != "jobs":
                continue
            if sr.status not in ("succeeded", "skipped"):
                problems.append(f"the run succeeded, but its stage of jobs {stage.id} is {sr.status}")
            for job, jr in zip(stage.jobs, sr.jobs, strict=False):
                if jr.status not in ("succeeded", "skipped") and not (job.continue_on_error and jr.status in _BAD):
                    problems.append(f"the run succeeded, but job {jr.name} (stage {stage.id}) is {jr.status}")
                    continue
                for step, st in zip(job.steps, jr.steps, strict=False):
                    if st.status not in ("succeeded", "skipped") and not (step.continue_on_error and st.status in _BAD):
                        problems.append(
                            f"the run succeeded, but {_step_name((stage.id, jr.name, st.name))} is {st.status}"
                        )
    return problems


_BAD: frozenset[str] = frozenset({"failed", "cancelled", "timeout"})

# What an execution of a script stage or a shell step records (see the fault suite's `_effect`):
# (run id, stage id, job, step), job and step empty for a typed stage.
EffectKey = tuple[str, str, str, str]


def effect_problems(history: History, effects: Counter[EffectKey]) -> list[str]:
    """Executions against attempts, for pipelines whose every script stage and shell step records
    its execution first thing: none ran more often than its attempts started (a redelivery or a
    recovered lease never runs one twice), and each attempt that ended with an exit code (its
    process ran to the end) was recorded."""
    problems: list[str] = []
    state, run_id = history.state, history.run_id
    stage_attempts = history.stage_attempts()
    step_attempts = history.step_attempts()

    def ran_to_the_end(attempts: tuple[rn.AttemptResult, ...]) -> int:
        return sum(1 for a in attempts if a.exit_code is not None or a.status == "succeeded")

    for stage, sr in zip(state.stages, state.stage_runs, strict=False):
        if stage.type == "script":
            ran = effects.get((run_id, stage.id, "", ""), 0)
            if ran > stage_attempts[stage.id]:
                problems.append(f"stage {stage.id} ran {ran} times in {stage_attempts[stage.id]} attempts")
            if ran < ran_to_the_end(sr.attempts):
                problems.append(
                    f"stage {stage.id} ran {ran} times, but {ran_to_the_end(sr.attempts)} attempts ran to the end"
                )
        for job, jr in zip(stage.jobs, sr.jobs, strict=False):
            for step, st in zip(job.steps, jr.steps, strict=False):
                if step.kind != "shell":
                    continue
                key = (stage.id, jr.name, st.name)
                ran = effects.get((run_id, *key), 0)
                if ran > step_attempts[key]:
                    problems.append(f"{_step_name(key)} ran {ran} times in {step_attempts[key]} attempts")
                if ran < ran_to_the_end(st.attempts):
                    problems.append(
                        f"{_step_name(key)} ran {ran} times, but {ran_to_the_end(st.attempts)} attempts ran to the end"
                    )
    # Executions of this run that no stage or step of it explains.
    known = {(run_id, s.id, "", "") for s in state.stages if s.type == "script"} | {
        (run_id, stage.id, jr.name, st.name)
        for stage, sr in zip(state.stages, state.stage_runs, strict=False)
        for jr in sr.jobs
        for st in jr.steps
    }
    strays = [k for k in effects if k[0] == run_id and k not in known]
    if strays:
        problems.append(f"executions recorded for what the run does not have: {strays[:3]}")
    return problems


def describe(history: History) -> str:
    return " -> ".join(f"{s.type}[{s.after}]" for s in history.steps)
