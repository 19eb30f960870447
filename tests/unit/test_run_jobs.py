"""Stages of jobs in the Run decider: jobs run in parallel subject to `needs`, steps in order,
`when` conditions, matrix jobs, approval steps, retries, pause and cancel with several jobs at once.

Each test folds the events the decider emits, as the executor would: ask to Advance, record step
outcomes with CompleteStep, and look at the state.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from domain import run as rn
from domain.errors import Refused
from domain.spec import stages_from_spec, validate_spec

T0 = datetime(2026, 3, 16, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Run:
    """A run folded from what the decider emits."""

    def __init__(self, spec: dict[str, Any], variables: dict[str, str] | None = None) -> None:
        errors, _ = validate_spec(spec, zone=ZoneInfo, plugins=frozenset({"registry-push"}))
        assert not errors, errors
        stages = stages_from_spec(spec, ["s1", "s2", "s3", "s4"])
        self.clock = 0.0
        self.state = rn.initial_state
        self.do(
            rn.TriggerRun(
                run_id="r1",
                pipeline_id="p1",
                organization_id=None,
                definition_version=1,
                stages=stages,
                variables=variables or {},
                by="alice",
                at=at(0),
            )
        )

    def do(self, command: Any) -> list[rn.RunEvent]:
        events = rn.decide(command, self.state)
        self.state = rn.fold(events, self.state)
        return events

    def now(self) -> datetime:
        self.clock += 1
        return at(self.clock)

    def advance(self) -> list[rn.RunEvent]:
        return self.do(rn.Advance(at=self.now()))

    def finish(self, job: str, step: str, ok: bool = True, stage: str = "default", **kw: Any) -> list[rn.RunEvent]:
        attempt = self.state.step_run(stage, job, step).attempt
        return self.do(
            rn.CompleteStep(stage_id=stage, job=job, step=step, attempt=attempt, succeeded=ok, at=self.now(), **kw)
        )

    def running_steps(self) -> set[tuple[str, str]]:
        return {
            (jr.name, st.name)
            for sr in self.state.stage_runs
            for jr in sr.jobs
            for st in jr.steps
            if st.status == "running"
        }

    def job(self, name: str, stage: str = "default") -> rn.JobRun:
        return self.state.job_run(stage, name)


BUILD_TEST = {
    "jobs": [
        {"name": "build", "matrix": {"arch": ["amd64", "arm64"]}, "steps": [{"name": "compile", "run": "make"}]},
        {"name": "lint", "steps": [{"name": "ruff", "run": "ruff check"}]},
        {
            "name": "test",
            "needs": ["build"],
            "steps": [{"name": "unit", "run": "pytest"}, {"name": "report", "run": "cat report"}],
        },
    ]
}


def test_jobs_without_needs_start_together_and_a_matrix_expands_into_one_job_per_value() -> None:
    r = Run(BUILD_TEST)
    r.advance()
    assert r.state.status == "running"
    assert r.running_steps() == {("build (amd64)", "compile"), ("build (arm64)", "compile"), ("lint", "ruff")}
    assert r.job("test").status == "pending"


def test_a_job_starts_when_every_job_it_needs_succeeded_and_its_steps_run_in_order() -> None:
    r = Run(BUILD_TEST)
    r.advance()
    r.finish("build (amd64)", "compile")
    assert r.job("test").status == "pending"  # needs both matrix jobs
    r.finish("build (arm64)", "compile")
    assert ("test", "unit") in r.running_steps()
    assert r.state.step_run("default", "test", "report").status == "pending"
    r.finish("test", "unit")
    assert ("test", "report") in r.running_steps()
    r.finish("test", "report")
    assert r.job("test").status == "succeeded"
    assert r.state.status == "running"  # lint still runs
    r.finish("lint", "ruff")
    assert r.state.status == "succeeded"
    assert r.state.stage_runs[0].status == "succeeded"


def test_a_failed_job_fails_only_the_jobs_that_need_it_and_the_run_fails_when_the_rest_is_done() -> None:
    r = Run(BUILD_TEST)
    r.advance()
    r.finish("build (amd64)", "compile", ok=False, error="exit code 2", exit_code=2)
    r.finish("build (arm64)", "compile")
    assert r.job("build (amd64)").status == "failed"
    assert r.job("test").status == "failed"
    assert r.job("test").error == 'not run: needs "build (amd64)", which ended failed'
    assert [s.status for s in r.job("test").steps] == ["skipped", "skipped"]
    assert r.state.status == "running"  # lint is independent and still runs
    r.finish("lint", "ruff")
    assert r.job("lint").status == "succeeded"
    assert r.state.status == "failed"
    assert r.state.stage_runs[0].status == "failed"
    assert "build (amd64)" in (r.state.status_reason or "")


def test_a_false_when_skips_the_job_and_a_true_one_runs_it() -> None:
    spec = {
        "jobs": [
            {"name": "a", "steps": [{"run": "true"}]},
            {"name": "publish", "needs": ["a"], "when": "variables.PUBLISH == 'yes'", "steps": [{"run": "push"}]},
            {"name": "cleanup", "needs": ["publish"], "when": "always()", "steps": [{"run": "rm"}]},
        ]
    }
    r = Run(spec, variables={"PUBLISH": "no"})
    r.advance()
    r.finish("a", "step-1")
    assert r.job("publish").status == "skipped"
    assert r.job("publish").error == "when is false: variables.PUBLISH == 'yes'"
    assert ("cleanup", "step-1") in r.running_steps()
    r.finish("cleanup", "step-1")
    assert r.state.status == "succeeded"

    r = Run(spec, variables={"PUBLISH": "yes"})
    r.advance()
    r.finish("a", "step-1")
    assert ("publish", "step-1") in r.running_steps()


def test_a_step_after_a_failed_step_is_skipped_unless_its_when_asks_for_failure() -> None:
    spec = {
        "jobs": [
            {
                "name": "j",
                "steps": [
                    {"name": "build", "run": "make"},
                    {"name": "test", "run": "pytest"},
                    {"name": "logs", "run": "cat log", "when": "failure()"},
                ],
            }
        ]
    }
    r = Run(spec)
    r.advance()
    r.finish("j", "build", ok=False, error="exit code 1")
    assert r.state.step_run("default", "j", "test").status == "skipped"
    assert ("j", "logs") in r.running_steps()
    r.finish("j", "logs")
    assert r.job("j").status == "failed"
    assert r.state.status == "failed"


def test_continue_on_error_lets_the_job_and_the_run_go_on() -> None:
    spec = {
        "jobs": [
            {"name": "flaky", "continueOnError": True, "steps": [{"run": "maybe"}]},
            {"name": "after", "needs": ["flaky"], "steps": [{"run": "true", "continueOnError": True}, {"run": "ok"}]},
        ]
    }
    r = Run(spec)
    r.advance()
    r.finish("flaky", "step-1", ok=False)
    assert ("after", "step-1") in r.running_steps()
    r.finish("after", "step-1", ok=False)
    r.finish("after", "step-2")
    assert r.job("after").status == "succeeded"
    assert r.state.status == "succeeded"


def test_a_jobs_retry_policy_runs_a_failed_step_again_after_its_backoff() -> None:
    spec = {"jobs": [{"name": "j", "retry": {"maxAttempts": 2, "backoff": 10}, "steps": [{"run": "flaky"}]}]}
    r = Run(spec)
    r.advance()
    events = r.finish("j", "step-1", ok=False, error="exit code 1")
    assert isinstance(events[0], rn.StepRetryScheduled)
    st = r.state.step_run("default", "j", "step-1")
    assert st.status == "queued" and st.retry_at == events[0].retry_at
    assert r.state.next_retry_at == st.retry_at
    assert r.advance() == []  # not due yet
    r.clock += 20
    r.advance()
    assert r.state.step_run("default", "j", "step-1").attempt == 2
    r.finish("j", "step-1", ok=False)
    assert r.state.status == "failed"
    assert len(r.state.step_run("default", "j", "step-1").attempts) == 2


def test_an_approval_step_holds_its_job_while_other_jobs_go_on() -> None:
    spec = {
        "jobs": [
            {"name": "gate", "steps": [{"name": "ok", "approval": {"message": "Ship?"}}, {"name": "ship", "run": "x"}]},
            {"name": "docs", "steps": [{"name": "a", "run": "a"}, {"name": "b", "run": "b"}]},
        ]
    }
    r = Run(spec)
    r.advance()
    assert r.state.status == "waiting_approval"
    assert [(g.job, g.step) for g in r.state.open_gates] == [("gate", "ok")]
    r.finish("docs", "a")
    assert ("docs", "b") in r.running_steps()  # the other job goes on
    assert r.state.status == "waiting_approval"
    events = r.do(rn.Approve(by="boss", reason="go", at=r.now()))
    assert events == [
        rn.RunApproved(stage_id="default", job="gate", step="ok", approved_by="boss", comment="go", at=at(r.clock))
    ]
    assert r.state.status == "running"
    assert r.state.approvals[0].step == "ok"
    r.advance()
    assert ("gate", "ship") in r.running_steps()


def test_rejecting_an_approval_step_fails_the_run_and_running_steps_end_with_it() -> None:
    spec = {
        "jobs": [
            {"name": "gate", "steps": [{"name": "ok", "approval": {}}]},
            {"name": "docs", "steps": [{"name": "a", "run": "a"}, {"name": "b", "run": "b"}]},
        ]
    }
    r = Run(spec)
    r.advance()
    r.do(rn.Reject(by="boss", reason="no", at=r.now()))
    assert r.state.status == "failed"
    assert r.job("gate").status == "failed"
    assert r.job("docs").status == "running"  # its step still runs; its outcome is still recorded
    r.finish("docs", "a")
    assert r.job("docs").status == "cancelled"
    assert [s.status for s in r.job("docs").steps] == ["succeeded", "skipped"]
    assert r.state.stage_runs[0].status == "failed"


def test_pause_lets_running_steps_finish_and_starts_nothing_until_resumed() -> None:
    spec = {"jobs": [{"name": "a", "steps": [{"run": "1"}, {"run": "2"}]}, {"name": "b", "steps": [{"run": "1"}]}]}
    r = Run(spec)
    r.advance()
    r.do(rn.Pause(by="ops", at=r.now()))
    r.finish("a", "step-1")
    assert r.running_steps() == {("b", "step-1")}
    assert r.advance() == []
    r.do(rn.Resume(by="ops", at=r.now()))
    r.advance()
    assert r.running_steps() == {("a", "step-2"), ("b", "step-1")}


def test_cancel_with_jobs_running_marks_the_rest_cancelled_and_records_the_running_steps() -> None:
    r = Run(BUILD_TEST)
    r.advance()
    r.do(rn.Cancel(by="ops", at=r.now()))
    assert r.state.status == "cancelled"
    assert r.job("test").status == "cancelled"
    assert r.state.stage_runs[0].status == "running"  # steps still run
    r.finish("build (amd64)", "compile")
    r.finish("build (arm64)", "compile", ok=False, failure="cancelled")
    r.finish("lint", "ruff")
    assert r.job("build (amd64)").status == "succeeded"
    assert r.job("build (arm64)").status == "cancelled"
    assert r.state.stage_runs[0].status == "cancelled"
    with pytest.raises(Refused):
        r.finish("lint", "ruff")


def test_typed_stages_and_stages_of_jobs_run_in_order_and_a_false_stage_when_skips_the_stage() -> None:
    spec = {
        "stages": [
            {"id": "first", "type": "script", "config": {"command": "true"}},
            {"id": "opt", "when": "variables.X == '1'", "jobs": [{"name": "j", "steps": [{"run": "x"}]}]},
            {"id": "main", "jobs": [{"name": "k", "steps": [{"run": "y"}]}]},
        ]
    }
    r = Run(spec)
    events = r.advance()
    assert any(isinstance(e, rn.StageStarted) and e.stage_id == "first" for e in events)
    r.do(rn.CompleteStage(stage_id="first", attempt=1, succeeded=True, at=r.now()))
    assert r.state.stage_runs[1].status == "skipped"
    assert r.running_steps() == {("k", "step-1")}
    r.finish("k", "step-1", stage="main")
    assert r.state.status == "succeeded"


def test_an_approval_step_times_out_after_its_timeout() -> None:
    spec = {"jobs": [{"name": "g", "steps": [{"name": "ok", "approval": {}, "timeout": 60}]}]}
    r = Run(spec)
    r.advance()
    with pytest.raises(Refused, match="not timed out"):
        r.do(rn.ExpireApproval(stage_id="default", job="g", step="ok", at=at(30)))
    r.do(rn.ExpireApproval(stage_id="default", job="g", step="ok", at=at(120)))
    assert r.state.status == "running"
    r.advance()
    assert r.job("g").status == "timeout"
    assert r.state.status == "failed"


def test_a_recorded_outcome_without_advance_starts_nothing() -> None:
    spec = {"jobs": [{"name": "a", "steps": [{"run": "1"}, {"run": "2"}]}]}
    r = Run(spec)
    r.advance()
    events = r.do(
        rn.CompleteStep(
            stage_id="default", job="a", step="step-1", attempt=1, succeeded=True, advance=False, at=r.now()
        )
    )
    assert [type(e) for e in events] == [rn.StepFinished]
    assert r.running_steps() == set()
    r.advance()
    assert r.running_steps() == {("a", "step-2")}


def test_after_a_reject_a_job_whose_steps_all_ran_or_were_skipped_by_when_is_not_cancelled() -> None:
    spec = {
        "jobs": [
            {"name": "gate", "steps": [{"name": "ok", "approval": {}}]},
            {
                "name": "docs",
                "steps": [{"name": "opt", "run": "x", "when": "variables.X == '1'"}, {"name": "main", "run": "y"}],
            },
        ]
    }
    r = Run(spec)
    r.advance()
    assert ("docs", "main") in r.running_steps()
    r.do(rn.Reject(by="boss", at=r.now()))
    r.finish("docs", "main")
    assert r.job("docs").status == "succeeded"
    assert [s.status for s in r.job("docs").steps] == ["skipped", "succeeded"]


def test_a_matrix_job_is_seen_under_its_spec_name_by_the_jobs_that_need_it() -> None:
    spec = {
        "jobs": [
            {"name": "image", "matrix": {"arch": ["amd64", "arm64"]}, "steps": [{"run": "make"}]},
            {
                "name": "publish",
                "needs": ["image"],
                "when": "jobs.image.status == 'succeeded'",
                "steps": [{"run": "p"}],
            },
        ]
    }
    r = Run(spec)
    r.advance()
    r.finish("image (amd64)", "step-1")
    r.finish("image (arm64)", "step-1")
    assert ("publish", "step-1") in r.running_steps()


def test_matrix_values_that_would_name_the_same_job_are_refused() -> None:
    errors, _ = validate_spec(
        {"jobs": [{"name": "b", "matrix": {"v": [True, "true"]}, "steps": [{"run": "x"}]}]}, zone=ZoneInfo
    )
    assert [(e.path, e.message) for e in errors] == [("jobs[0].matrix.v", "values must be distinct")]


def _cron_in(timezone: str) -> dict[str, Any]:
    return {
        "jobs": [{"name": "a", "steps": [{"run": "x"}]}],
        "triggers": [{"type": "cron", "schedule": "0 3 * * *", "timezone": timezone}],
    }


def test_a_cron_trigger_in_an_unknown_time_zone_is_an_error() -> None:
    assert validate_spec(_cron_in("Europe/Berlin"), zone=ZoneInfo) == ([], [])
    for name in ("Mars/Olympus", "../etc/passwd", ""):
        errors, _ = validate_spec(_cron_in(name), zone=ZoneInfo)
        assert [(e.path, e.message) for e in errors] == [("triggers[0].timezone", f"unknown time zone {name!r}")]


def test_spec_validation_knows_the_time_zones_of_the_lookup_it_is_given() -> None:
    asked: list[str] = []

    def mars_only(name: str) -> tzinfo:
        asked.append(name)
        if name != "Mars/Olympus":
            raise KeyError(name)
        return UTC

    assert validate_spec(_cron_in("Mars/Olympus"), zone=mars_only) == ([], [])
    errors, _ = validate_spec(_cron_in("Europe/Berlin"), zone=mars_only)
    assert [e.path for e in errors] == ["triggers[0].timezone"]
    assert asked == ["Mars/Olympus", "Europe/Berlin"]
