"""The Run decider, in given-events / when-command / then-events form.

Covers the run status table of DESIGN.md ("Domain"), the executor's commands (Advance,
CompleteStage) and the facts that `evolve` derives (stage results, finished_at).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from domain import run
from domain.errors import DomainError
from domain.run import (
    Advance,
    ApprovalRequested,
    Approve,
    Cancel,
    CompleteStage,
    Pause,
    Reject,
    Resume,
    RunApproved,
    RunCancelled,
    RunFailed,
    RunPaused,
    RunRejected,
    RunResumed,
    RunStarted,
    RunState,
    RunStopped,
    RunSucceeded,
    RunTriggered,
    StageFailed,
    StageStarted,
    StageSucceeded,
    Stop,
    TriggerRun,
)
from domain.stages import Stage
from tests.unit.decider_dsl import Spec

spec = Spec(run)
given_events = spec.given

T0 = datetime(2026, 3, 16, 12, 0, 0, tzinfo=UTC)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


BUILD = Stage(id="build", name="Build", type="script", order=1, config={"command": "make"})
GATE = Stage(id="gate", name="Gate", type="approval", order=2, config={"message": "Ship it?"})
DEPLOY = Stage(id="deploy", name="Deploy", type="script", order=3, config={"command": "./deploy"})
STAGES = (BUILD, GATE, DEPLOY)


def trigger(stages: tuple[Stage, ...] = STAGES, at: datetime = T0) -> TriggerRun:
    return TriggerRun(
        run_id="r1",
        pipeline_id="p1",
        organization_id="org1",
        definition_version=3,
        stages=stages,
        variables={"ENV": "prod"},
        by="alice",
        at=at,
    )


def triggered(stages: tuple[Stage, ...] = STAGES, at: datetime = T0) -> RunTriggered:
    return RunTriggered(
        run_id="r1",
        pipeline_id="p1",
        organization_id="org1",
        definition_version=3,
        stages=stages,
        variables={"ENV": "prod"},
        triggered_by="alice",
        at=at,
    )


def ok(stage_id: str, at: datetime, attempt: int = 1, exit_code: int | None = 0) -> CompleteStage:
    return CompleteStage(stage_id=stage_id, attempt=attempt, succeeded=True, exit_code=exit_code, at=at)


def fail(
    stage_id: str,
    at: datetime,
    attempt: int = 1,
    failure: Any = "failed",
    error: str | None = "exit status 1",
    exit_code: int | None = 1,
) -> CompleteStage:
    return CompleteStage(
        stage_id=stage_id,
        attempt=attempt,
        succeeded=False,
        failure=failure,
        error=error,
        exit_code=exit_code,
        at=at,
    )


def drive(*commands: Any) -> list[Any]:
    """The events that deciding `commands` one after another produces (each must be accepted)."""
    state: RunState = run.initial_state
    events: list[Any] = []
    for c in commands:
        new = run.decide(c, state)
        for e in new:
            state = run.evolve(state, e)
        events += new
    return events


# One history per run status, built by driving real commands through the decider.
QUEUED = (trigger(),)
RUNNING = (*QUEUED, Advance(at=t(1)))  # build is running
WAITING = (*RUNNING, ok("build", t(2)))  # gate requested
PAUSED = (*RUNNING, Pause(by="bob", at=t(2)))  # build still running
SUCCEEDED = (*WAITING, Approve(by="carol", at=t(3)), Advance(at=t(4)), ok("deploy", t(5)))
FAILED = (*RUNNING, fail("build", t(2)))
CANCELLED = (*RUNNING, Cancel(by="bob", at=t(2)))  # build still running

HISTORIES: dict[str, tuple[Any, ...]] = {
    "queued": QUEUED,
    "running": RUNNING,
    "waiting_approval": WAITING,
    "paused": PAUSED,
    "succeeded": SUCCEEDED,
    "failed": FAILED,
    "cancelled": CANCELLED,
}
NON_TERMINAL = ("queued", "running", "waiting_approval", "paused")
TERMINAL = ("succeeded", "failed", "cancelled")


def in_status(status: str) -> Any:
    return given_events(*drive(*HISTORIES[status]))


LATER = t(100)

CONTROL: dict[str, Callable[[], Any]] = {
    "approve": lambda: Approve(by="dave", reason="lgtm", at=LATER),
    "reject": lambda: Reject(by="dave", reason="no", at=LATER),
    "cancel": lambda: Cancel(by="dave", at=LATER),
    "stop": lambda: Stop(by="dave", at=LATER),
    "pause": lambda: Pause(by="dave", at=LATER),
    "resume": lambda: Resume(by="dave", at=LATER),
}
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "approve": ("waiting_approval",),
    "reject": ("waiting_approval",),
    "cancel": ("queued", "running", "waiting_approval", "paused"),
    "stop": NON_TERMINAL,
    "pause": ("running",),
    "resume": ("paused",),
}
REFUSED_CASES = [
    pytest.param(verb, status, id=f"{verb}-from-{status}")
    for verb, allowed in ALLOWED_FROM.items()
    for status in HISTORIES
    if status not in allowed
]


@pytest.mark.parametrize("status", list(HISTORIES))
def test_each_history_fixture_reaches_the_status_it_is_named_after(status: str) -> None:
    assert in_status(status).state.status == status


# ---- trigger ---------------------------------------------------------------------------------


def test_trigger_queues_the_run_with_the_definition_snapshot() -> None:
    state = given_events().when(trigger()).then(triggered())
    assert state.exists
    assert state.status == "queued"
    assert state.definition_version == 3
    assert state.stages == STAGES
    assert state.variables == {"ENV": "prod"}
    assert state.triggered_by == "alice"
    assert state.created_at == T0
    assert state.started_at is None and state.finished_at is None
    assert [(sr.stage_id, sr.status) for sr in state.stage_runs] == [
        ("build", "pending"),
        ("gate", "pending"),
        ("deploy", "pending"),
    ]


def test_triggering_a_run_that_already_exists_is_refused() -> None:
    given_events(triggered()).when(trigger(at=t(1))).refused(match="already exists")


@pytest.mark.parametrize(
    "command",
    [Advance(at=T0), ok("build", T0), *(make() for make in CONTROL.values())],
    ids=lambda c: type(c).__name__,
)
def test_commands_on_a_run_that_does_not_exist_are_not_found(command: Any) -> None:
    given_events().when(command).not_found(match="run not found")


# ---- advance (executor) ------------------------------------------------------------------


def test_advance_starts_a_queued_run_and_its_first_stage() -> None:
    state = (
        given_events(triggered())
        .when(Advance(at=t(1)))
        .then(
            RunStarted(at=t(1)),
            StageStarted(stage_id="build", attempt=1, at=t(1)),
        )
    )
    assert state.status == "running"
    assert state.started_at == t(1)
    assert state.stage_runs[0].status == "running"
    assert state.stage_runs[0].attempt == 1
    assert state.stage_runs[0].started_at == t(1)


def test_advance_to_an_approval_stage_starts_it_and_requests_approval() -> None:
    state = (
        given_events(triggered(stages=(GATE, DEPLOY)))
        .when(Advance(at=t(1)))
        .then(
            RunStarted(at=t(1)),
            StageStarted(stage_id="gate", attempt=1, at=t(1)),
            ApprovalRequested(stage_id="gate", message="Ship it?", at=t(1)),
        )
    )
    assert state.status == "waiting_approval"
    assert state.stage_runs[0].status == "waiting_approval"
    assert state.stage_runs[1].status == "pending"


def test_advance_while_a_stage_is_running_emits_nothing() -> None:
    in_status("running").when(Advance(at=t(50))).then_nothing()


def test_advance_while_waiting_for_approval_emits_nothing() -> None:
    in_status("waiting_approval").when(Advance(at=t(50))).then_nothing()


def test_advance_while_paused_emits_nothing() -> None:
    in_status("paused").when(Advance(at=t(50))).then_nothing()


def test_advance_while_paused_between_stages_emits_nothing() -> None:
    history = drive(*PAUSED, ok("build", t(3)))  # the stage running at the pause has finished
    given_events(*history).when(Advance(at=t(50))).then_nothing()


@pytest.mark.parametrize("status", TERMINAL)
def test_advance_on_a_finished_run_emits_nothing(status: str) -> None:
    in_status(status).when(Advance(at=t(50))).then_nothing()


def test_advance_after_the_last_stage_succeeded_emits_run_succeeded() -> None:
    one = (BUILD,)
    history = [
        triggered(stages=one),
        RunStarted(at=t(1)),
        StageStarted(stage_id="build", at=t(1)),
        StageSucceeded(stage_id="build", exit_code=0, at=t(2)),
    ]
    state = given_events(*history).when(Advance(at=t(3))).then(RunSucceeded(at=t(3)))
    assert state.status == "succeeded"
    assert state.finished_at == t(3)


def test_a_run_with_no_stages_succeeds_on_its_first_advance() -> None:
    state = (
        given_events(triggered(stages=()))
        .when(Advance(at=t(1)))
        .then(
            RunStarted(at=t(1)),
            RunSucceeded(at=t(1)),
        )
    )
    assert state.status == "succeeded"
    assert state.stage_runs == ()


# ---- complete a stage (executor) ---------------------------------------------------------


def test_completing_a_stage_successfully_starts_the_next_stage() -> None:
    history = drive(trigger(stages=(BUILD, DEPLOY)), Advance(at=t(1)))
    state = (
        given_events(*history)
        .when(ok("build", t(2)))
        .then(
            StageSucceeded(stage_id="build", exit_code=0, at=t(2)),
            StageStarted(stage_id="deploy", attempt=1, at=t(2)),
        )
    )
    assert [sr.status for sr in state.stage_runs] == ["succeeded", "running"]
    assert state.stage_runs[0].finished_at == t(2)
    assert state.stage_runs[0].exit_code == 0


def test_completing_the_stage_before_a_gate_requests_approval() -> None:
    state = (
        in_status("running")
        .when(ok("build", t(2)))
        .then(
            StageSucceeded(stage_id="build", exit_code=0, at=t(2)),
            StageStarted(stage_id="gate", attempt=1, at=t(2)),
            ApprovalRequested(stage_id="gate", message="Ship it?", at=t(2)),
        )
    )
    assert state.status == "waiting_approval"


def test_completing_the_last_stage_successfully_succeeds_the_run() -> None:
    history = drive(*WAITING, Approve(by="carol", at=t(3)), Advance(at=t(4)))
    state = (
        given_events(*history)
        .when(ok("deploy", t(5)))
        .then(
            StageSucceeded(stage_id="deploy", exit_code=0, at=t(5)),
            RunSucceeded(at=t(5)),
        )
    )
    assert state.status == "succeeded"
    assert state.finished_at == t(5)
    assert [sr.status for sr in state.stage_runs] == ["succeeded", "succeeded", "succeeded"]


def test_a_failed_stage_fails_the_run_and_skips_the_unreached_stages() -> None:
    state = (
        in_status("running")
        .when(fail("build", t(2)))
        .then(
            StageFailed(stage_id="build", status="failed", error="exit status 1", exit_code=1, at=t(2)),
            RunFailed(stage_id="build", reason="exit status 1", at=t(2)),
        )
    )
    assert state.status == "failed"
    assert state.finished_at == t(2)
    assert [sr.status for sr in state.stage_runs] == ["failed", "skipped", "skipped"]
    assert state.stage_runs[0].error == "exit status 1"
    assert state.stage_runs[0].exit_code == 1


def test_a_timed_out_stage_is_recorded_as_timeout_and_fails_the_run() -> None:
    state = (
        in_status("running")
        .when(fail("build", t(2), failure="timeout", error="timed out"))
        .then(
            StageFailed(stage_id="build", status="timeout", error="timed out", exit_code=1, at=t(2)),
            RunFailed(stage_id="build", reason="timed out", at=t(2)),
        )
    )
    assert state.stage_runs[0].status == "timeout"
    assert state.status == "failed"


def test_completing_a_stage_of_a_cancelled_run_records_the_result_and_starts_nothing() -> None:
    state = (
        in_status("cancelled")
        .when(ok("build", t(5)))
        .then(
            StageSucceeded(stage_id="build", exit_code=0, at=t(5)),
        )
    )
    assert state.status == "cancelled"
    assert state.finished_at == t(2)  # the time of the cancel, not of the late result
    assert [sr.status for sr in state.stage_runs] == ["succeeded", "skipped", "skipped"]


def test_a_failed_stage_of_a_cancelled_run_is_recorded_without_failing_the_run() -> None:
    state = (
        in_status("cancelled")
        .when(fail("build", t(5)))
        .then(
            StageFailed(stage_id="build", status="failed", error="exit status 1", exit_code=1, at=t(5)),
        )
    )
    assert state.status == "cancelled"
    assert state.finished_at == t(2)
    assert state.stage_runs[0].status == "failed"


def test_the_killed_stage_of_a_stopped_run_is_recorded_as_cancelled() -> None:
    history = drive(*RUNNING, Stop(by="bob", at=t(2)))
    state = (
        given_events(*history)
        .when(fail("build", t(3), failure="cancelled", error="killed", exit_code=-15))
        .then(
            StageFailed(stage_id="build", status="cancelled", error="killed", exit_code=-15, at=t(3)),
        )
    )
    assert state.status == "cancelled"
    assert state.finished_at == t(2)
    assert [sr.status for sr in state.stage_runs] == ["cancelled", "skipped", "skipped"]


def test_the_running_stage_of_a_paused_run_finishes_but_nothing_new_starts() -> None:
    state = (
        in_status("paused")
        .when(ok("build", t(3)))
        .then(
            StageSucceeded(stage_id="build", exit_code=0, at=t(3)),
        )
    )
    assert state.status == "paused"
    assert [sr.status for sr in state.stage_runs] == ["succeeded", "pending", "pending"]


def test_a_failed_stage_of_a_paused_run_fails_the_run() -> None:
    state = (
        in_status("paused")
        .when(fail("build", t(3)))
        .then(
            StageFailed(stage_id="build", status="failed", error="exit status 1", exit_code=1, at=t(3)),
            RunFailed(stage_id="build", reason="exit status 1", at=t(3)),
        )
    )
    assert state.status == "failed"


def test_completing_a_stage_twice_is_refused() -> None:
    history = drive(*RUNNING, ok("build", t(2)))
    given_events(*history).when(ok("build", t(3))).refused(match="is not running")


def test_completing_a_failed_stage_again_is_refused() -> None:
    in_status("failed").when(fail("build", t(3))).refused(match="is not running")


def test_completing_the_wrong_attempt_of_a_stage_is_refused() -> None:
    in_status("running").when(ok("build", t(2), attempt=2)).refused(match="attempt 2 is not running")


def test_completing_a_stage_that_has_not_started_is_refused() -> None:
    in_status("running").when(ok("deploy", t(2))).refused(match="deploy")


def test_completing_a_stage_the_run_does_not_have_is_refused() -> None:
    in_status("running").when(ok("nope", t(2))).refused(match="run has no stage 'nope'")


def test_an_approval_gate_cannot_be_completed_as_a_script() -> None:
    in_status("waiting_approval").when(ok("gate", t(3))).refused(match="is not running")


# ---- approve / reject --------------------------------------------------------------------


def test_approve_resumes_the_run_and_records_the_approver() -> None:
    state = (
        in_status("waiting_approval")
        .when(Approve(by="carol", reason="lgtm", at=t(3)))
        .then(
            RunApproved(stage_id="gate", approved_by="carol", comment="lgtm", at=t(3)),
        )
    )
    assert state.status == "running"
    assert state.stage_runs[1].status == "succeeded"
    assert state.stage_runs[1].finished_at == t(3)
    assert [(a.stage_id, a.decision, a.by, a.comment, a.at) for a in state.approvals] == [
        ("gate", "approved", "carol", "lgtm", t(3))
    ]


def test_after_approval_the_run_goes_on_at_the_stage_after_the_gate() -> None:
    history = drive(*WAITING, Approve(by="carol", at=t(3)))
    given_events(*history).when(Advance(at=t(4))).then(StageStarted(stage_id="deploy", attempt=1, at=t(4)))


def test_approving_the_last_gate_answers_running_then_the_run_succeeds() -> None:
    history = drive(trigger(stages=(BUILD, GATE)), Advance(at=t(1)), ok("build", t(2)))
    state = (
        given_events(*history)
        .when(Approve(by="carol", at=t(3)))
        .then(
            RunApproved(stage_id="gate", approved_by="carol", at=t(3)),
        )
    )
    assert state.status == "running"
    history = drive(trigger(stages=(BUILD, GATE)), Advance(at=t(1)), ok("build", t(2)), Approve(by="carol", at=t(3)))
    given_events(*history).when(Advance(at=t(4))).then(RunSucceeded(at=t(4)))


def test_approving_twice_is_refused() -> None:
    history = drive(*WAITING, Approve(by="carol", at=t(3)))
    given_events(*history).when(Approve(by="carol", at=t(4))).refused(match="cannot approve run in status running")


def test_each_gate_of_a_run_with_two_gates_is_approved_on_its_own() -> None:
    gate2 = Stage(id="gate2", name="Gate 2", type="approval", order=2)
    history = drive(trigger(stages=(GATE, gate2)), Advance(at=t(1)), Approve(by="carol", at=t(2)))
    given_events(*history).when(Approve(by="carol", at=t(3))).refused(match="cannot approve")
    history = drive(trigger(stages=(GATE, gate2)), Advance(at=t(1)), Approve(by="carol", at=t(2)), Advance(at=t(3)))
    given_events(*history).when(Approve(by="erin", at=t(4))).then(
        RunApproved(stage_id="gate2", approved_by="erin", at=t(4))
    )


def test_reject_fails_the_run_and_records_who_and_why() -> None:
    state = (
        in_status("waiting_approval")
        .when(Reject(by="carol", reason="not today", at=t(3)))
        .then(
            RunRejected(stage_id="gate", rejected_by="carol", reason="not today", at=t(3)),
        )
    )
    assert state.status == "failed"
    assert state.finished_at == t(3)
    assert state.status_by == "carol"
    assert state.status_reason == "not today"
    assert [sr.status for sr in state.stage_runs] == ["succeeded", "failed", "skipped"]
    assert state.stage_runs[1].error == "rejected by carol: not today"
    assert [(a.decision, a.by, a.comment) for a in state.approvals] == [("rejected", "carol", "not today")]


# ---- cancel / stop -----------------------------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "running", "waiting_approval", "paused"])
def test_cancel_ends_the_run_as_cancelled_at_the_time_of_the_cancel(status: str) -> None:
    state = (
        in_status(status)
        .when(Cancel(by="dave", reason="wrong branch", at=LATER))
        .then(
            RunCancelled(cancelled_by="dave", reason="wrong branch", at=LATER),
        )
    )
    assert state.status == "cancelled"
    assert state.finished_at == LATER
    assert state.status_by == "dave"
    assert state.status_reason == "wrong branch"
    assert not any(sr.status == "pending" for sr in state.stage_runs)


def test_cancelling_a_queued_run_skips_every_stage() -> None:
    state = in_status("queued").when(Cancel(by="dave", at=LATER)).then(RunCancelled(cancelled_by="dave", at=LATER))
    assert [sr.status for sr in state.stage_runs] == ["skipped", "skipped", "skipped"]


def test_cancel_leaves_the_running_stage_running_until_it_reports() -> None:
    state = in_status("running").when(Cancel(by="dave", at=LATER)).then(RunCancelled(cancelled_by="dave", at=LATER))
    assert [sr.status for sr in state.stage_runs] == ["running", "skipped", "skipped"]


def test_cancel_while_waiting_for_approval_cancels_the_gate() -> None:
    state = (
        in_status("waiting_approval")
        .when(Cancel(by="dave", at=LATER))
        .then(RunCancelled(cancelled_by="dave", at=LATER))
    )
    assert [sr.status for sr in state.stage_runs] == ["succeeded", "cancelled", "skipped"]
    assert state.stage_runs[1].finished_at == LATER


@pytest.mark.parametrize("status", NON_TERMINAL)
def test_stop_ends_any_unfinished_run_as_cancelled(status: str) -> None:
    state = (
        in_status(status)
        .when(Stop(by="dave", reason="runaway", at=LATER))
        .then(
            RunStopped(stopped_by="dave", reason="runaway", at=LATER),
        )
    )
    assert state.status == "cancelled"
    assert state.finished_at == LATER
    assert state.status_by == "dave"


def test_stop_while_waiting_for_approval_cancels_the_gate() -> None:
    state = in_status("waiting_approval").when(Stop(by="dave", at=LATER)).then(RunStopped(stopped_by="dave", at=LATER))
    assert [sr.status for sr in state.stage_runs] == ["succeeded", "cancelled", "skipped"]


# ---- pause / resume ----------------------------------------------------------------------


def test_pause_holds_a_running_run() -> None:
    state = (
        in_status("running")
        .when(Pause(by="bob", reason="lunch", at=t(2)))
        .then(
            RunPaused(paused_by="bob", reason="lunch", at=t(2)),
        )
    )
    assert state.status == "paused"
    assert state.status_by == "bob"
    assert state.finished_at is None
    assert state.stage_runs[0].status == "running"


def test_resume_continues_where_the_run_paused() -> None:
    history = drive(*PAUSED, ok("build", t(3)))
    state = given_events(*history).when(Resume(by="bob", at=t(4))).then(RunResumed(resumed_by="bob", at=t(4)))
    assert state.status == "running"
    history = drive(*PAUSED, ok("build", t(3)), Resume(by="bob", at=t(4)))
    given_events(*history).when(Advance(at=t(5))).then(
        StageStarted(stage_id="gate", attempt=1, at=t(5)),
        ApprovalRequested(stage_id="gate", message="Ship it?", at=t(5)),
    )


def test_resume_while_the_stage_is_still_running_starts_nothing_new() -> None:
    history = drive(*PAUSED, Resume(by="bob", at=t(3)))
    state = given_events(*history).state
    assert state.status == "running"
    given_events(*history).when(Advance(at=t(4))).then_nothing()


# ---- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(("verb", "status"), REFUSED_CASES)
def test_a_control_command_outside_its_allowed_statuses_is_refused(verb: str, status: str) -> None:
    err = in_status(status).when(CONTROL[verb]()).refused(match=f"cannot {verb} run")
    if status in TERMINAL:
        assert f"already {status}" in str(err)
    else:
        assert f"in status {status}" in str(err)


@pytest.mark.parametrize("verb", ["cancel", "stop"])
def test_cancelling_or_stopping_twice_is_refused(verb: str) -> None:
    history = drive(*RUNNING, CONTROL[verb]())
    given_events(*history).when(CONTROL[verb]()).refused(match="already cancelled")


def test_pausing_twice_is_refused() -> None:
    in_status("paused").when(Pause(by="bob", at=LATER)).refused(match="cannot pause run in status paused")


# ---- property: a finished run stays finished ---------------------------------------------

STAGE_POOL = (
    Stage(id="s1", name="s1", type="script", order=1, config={"command": "true"}),
    Stage(id="g1", name="g1", type="approval", order=2),
    Stage(id="s2", name="s2", type="script", order=3, config={"command": "true"}),
    Stage(id="g2", name="g2", type="approval", order=4),
    Stage(id="s3", name="s3", type="script", order=5, config={"command": "true"}),
)

stage_lists = st.lists(st.sampled_from(STAGE_POOL), max_size=5, unique_by=lambda s: s.id).map(tuple)

# Symbolic commands, resolved against the state when they are applied. Advancing and completing
# the active stage are weighted up so that runs get far enough to finish, then see late results.
complete_active = st.tuples(
    st.just("complete"),
    st.booleans(),  # succeeded
    st.sampled_from(["failed", "timeout", "cancelled"]),
    st.just("active"),
    st.just(0),
)
complete_any = st.tuples(
    st.just("complete"),
    st.booleans(),
    st.sampled_from(["failed", "timeout", "cancelled"]),
    st.sampled_from(["s1", "g1", "s2", "g2", "s3", "missing"]),
    st.integers(min_value=-1, max_value=1),  # attempt offset from the stage's own attempt
)
control = st.tuples(st.sampled_from(sorted(CONTROL)))
symbolic_commands = st.one_of(
    st.just(("advance",)),
    st.just(("advance",)),
    complete_active,
    complete_active,
    complete_active,
    complete_any,
    control,
    control,
)


def _resolve(symbol: tuple[Any, ...], state: RunState, at: datetime) -> Any:
    if symbol[0] == "advance":
        return Advance(at=at)
    if symbol[0] == "complete":
        _, succeeded, failure, target, offset = symbol
        if target == "active":
            active = next((sr for sr in state.stage_runs if sr.status == "running"), None)
            target = active.stage_id if active else "s1"
        current = next((sr.attempt for sr in state.stage_runs if sr.stage_id == target), 0)
        attempt = max(1, current + offset)
        return CompleteStage(stage_id=target, attempt=attempt, succeeded=succeeded, failure=failure, at=at)
    verb = symbol[0]
    return {"approve": Approve, "reject": Reject, "cancel": Cancel, "stop": Stop, "pause": Pause, "resume": Resume}[
        verb
    ](by="prop", at=at)


def _check_invariants(state: RunState) -> None:
    active = [sr for sr in state.stage_runs if sr.status in ("running", "waiting_approval")]
    assert len(active) <= 1, state.stage_runs
    if state.status == "waiting_approval":
        assert [sr.status for sr in active] == ["waiting_approval"]
    if state.terminal:
        assert state.finished_at is not None
        assert all(sr.status not in ("pending", "waiting_approval") for sr in state.stage_runs), state.stage_runs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stages=stage_lists, commands=st.lists(symbolic_commands, min_size=4, max_size=40))
def test_random_command_sequences_never_reopen_a_finished_run(
    stages: tuple[Stage, ...], commands: list[tuple[Any, ...]]
) -> None:
    state = run.evolve(run.initial_state, triggered(stages=stages))
    for i, symbol in enumerate(commands):
        at = t(i + 1)
        command = _resolve(symbol, state, at)
        was_terminal = state.terminal
        before = state
        try:
            events = run.decide(command, state)
        except DomainError:
            continue
        if was_terminal:
            assert all(isinstance(e, StageSucceeded | StageFailed) for e in events), (command, events)
            if events:
                event(f"a stage completed after the run was {before.status}")
        for e in events:
            state = run.evolve(state, e)
            if was_terminal:
                assert state.status == before.status
                assert state.finished_at == before.finished_at
            _check_invariants(state)
        if was_terminal:
            assert state.terminal
    event(f"ended {state.status}")
