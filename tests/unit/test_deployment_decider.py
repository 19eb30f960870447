"""The deployment decider: abandoning closes an unfinished deployment once, and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

from domain import deployment as dp

AT = datetime(2026, 1, 1, tzinfo=UTC)
QUEUED = dp.DeploymentQueued(
    deployment_id="d1",
    organization_id="o",
    environment_id="e",
    component_id="c",
    run_id="r",
    pipeline_id="p",
    stage_id="s",
    definition_version=1,
    deployer="command",
    at=AT,
)
ABANDON = dp.AbandonDeployment(deployment_id="d1", reason="executor lost", at=AT)


def fold(*events: dp.DeploymentEvent) -> dp.DeploymentState:
    state = dp.initial_state
    for e in events:
        state = dp.evolve(state, e)
    return state


def test_abandoning_a_queued_or_running_deployment_fails_it_with_the_reason() -> None:
    for state in (fold(QUEUED), fold(QUEUED, dp.DeploymentStarted(deployment_id="d1", at=AT))):
        new = dp.decide(ABANDON, state)
        assert new == [dp.DeploymentFailed(deployment_id="d1", error="executor lost", at=AT)]
        after = dp.evolve(state, new[0])
        assert after.status == "failed" and after.error == "executor lost" and after.finished_at == AT
        assert dp.decide(ABANDON, after) == []  # twice: nothing more


def test_finished_or_unknown_deployments_are_left_alone() -> None:
    started = fold(QUEUED, dp.DeploymentStarted(deployment_id="d1", at=AT))
    assert dp.decide(ABANDON, dp.evolve(started, dp.DeploymentSucceeded(deployment_id="d1", at=AT))) == []
    assert dp.decide(ABANDON, dp.evolve(started, dp.DeploymentFailed(deployment_id="d1", error="x", at=AT))) == []
    assert dp.decide(ABANDON, dp.initial_state) == []
