"""The Pipeline decider (given-events / when-command / then-events) and stage validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain import pipeline
from domain.pipeline import (
    CreatePipeline,
    DeletePipeline,
    PipelineCreated,
    PipelineDeleted,
    PipelineUpdated,
    UpdatePipeline,
)
from domain.stages import Stage, stages_from_dicts, validate_stage_dicts
from tests.unit.decider_dsl import Spec

given = Spec(pipeline).given

T0 = datetime(2026, 3, 16, 12, 0, 0, tzinfo=UTC)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


TEST = Stage(id="test", name="Run tests", type="script", order=1, config={"command": "pytest -q"})
GATE = Stage(id="gate", name="gate", type="approval", order=2, config={"message": "Ship it?"})
LINT = Stage(id="lint", name="Lint", type="script", order=1, config={"command": "ruff check"})


def create(**overrides: Any) -> CreatePipeline:
    fields: dict[str, Any] = {
        "pipeline_id": "p1",
        "name": "deploy-to-production",
        "description": "Runs tests, approval gate, then deploys.",
        "stages": (TEST, GATE),
        "organization_id": "org1",
        "by": "alice",
        "at": T0,
    }
    return CreatePipeline(**(fields | overrides))


CREATED = PipelineCreated(
    pipeline_id="p1",
    name="deploy-to-production",
    description="Runs tests, approval gate, then deploys.",
    stages=(TEST, GATE),
    organization_id="org1",
    created_by="alice",
    at=T0,
    definition_version=1,
)
DELETED = PipelineDeleted(deleted_by="alice", at=t(5))


# ---- create ------------------------------------------------------------------------------


def test_create_records_the_pipeline_at_definition_version_1() -> None:
    state = given().when(create()).then(CREATED)
    assert state.live
    assert state.pipeline_id == "p1"
    assert state.name == "deploy-to-production"
    assert state.stages == (TEST, GATE)
    assert state.organization_id == "org1"
    assert state.created_by == "alice"
    assert state.created_at == state.updated_at == T0
    assert state.definition_version == 1


def test_creating_a_pipeline_twice_is_refused() -> None:
    given(CREATED).when(create(at=t(1))).refused(match="pipeline p1 already exists")


def test_creating_a_pipeline_again_under_a_deleted_id_is_refused() -> None:
    given(CREATED, DELETED).when(create(at=t(6))).refused(match="already exists")


# ---- update: PATCH and PUT ---------------------------------------------------------------


def test_patching_the_name_keeps_everything_else_and_the_definition_version() -> None:
    state = (
        given(CREATED)
        .when(UpdatePipeline(name="renamed", by="bob", at=t(1)))
        .then(
            PipelineUpdated(
                name="renamed",
                description="Runs tests, approval gate, then deploys.",
                stages=(TEST, GATE),
                updated_by="bob",
                at=t(1),
                definition_version=1,
            )
        )
    )
    assert state.name == "renamed"
    assert state.updated_at == t(1)
    assert state.created_at == T0
    assert state.definition_version == 1


def test_patching_without_set_description_leaves_the_description_alone() -> None:
    state = (
        given(CREATED)
        .when(UpdatePipeline(description="ignored", by="bob", at=t(1)))
        .then(
            PipelineUpdated(
                name="deploy-to-production",
                description="Runs tests, approval gate, then deploys.",
                stages=(TEST, GATE),
                updated_by="bob",
                at=t(1),
                definition_version=1,
            )
        )
    )
    assert state.description == "Runs tests, approval gate, then deploys."


def test_patching_the_description_to_null_clears_it() -> None:
    state = (
        given(CREATED)
        .when(UpdatePipeline(description=None, set_description=True, by="bob", at=t(1)))
        .then(
            PipelineUpdated(
                name="deploy-to-production",
                description=None,
                stages=(TEST, GATE),
                updated_by="bob",
                at=t(1),
                definition_version=1,
            )
        )
    )
    assert state.description is None


def test_patching_the_stages_is_a_new_definition_version() -> None:
    state = (
        given(CREATED)
        .when(UpdatePipeline(stages=(LINT,), by="bob", at=t(1)))
        .then(
            PipelineUpdated(
                name="deploy-to-production",
                description="Runs tests, approval gate, then deploys.",
                stages=(LINT,),
                updated_by="bob",
                at=t(1),
                definition_version=2,
            )
        )
    )
    assert state.stages == (LINT,)
    assert state.definition_version == 2


def test_put_replaces_every_field() -> None:
    put = UpdatePipeline(name="n2", description=None, set_description=True, stages=(LINT, GATE), by="bob", at=t(1))
    state = (
        given(CREATED)
        .when(put)
        .then(
            PipelineUpdated(
                name="n2", description=None, stages=(LINT, GATE), updated_by="bob", at=t(1), definition_version=2
            )
        )
    )
    assert (state.name, state.description, state.stages) == ("n2", None, (LINT, GATE))


def test_put_with_the_same_stages_keeps_the_definition_version() -> None:
    put = UpdatePipeline(name="n2", description="d2", set_description=True, stages=(TEST, GATE), by="bob", at=t(1))
    given(CREATED).when(put).then(
        PipelineUpdated(
            name="n2", description="d2", stages=(TEST, GATE), updated_by="bob", at=t(1), definition_version=1
        )
    )


def test_an_equal_copy_of_the_stages_is_not_a_new_definition_version() -> None:
    copy = tuple(Stage(id=s.id, name=s.name, type=s.type, order=s.order, config=dict(s.config)) for s in (TEST, GATE))
    events = given(CREATED).when(UpdatePipeline(stages=copy, by="bob", at=t(1))).decide()
    assert [e.definition_version for e in events] == [1]


def test_a_changed_stage_config_is_a_new_definition_version() -> None:
    changed = Stage(id="test", name="Run tests", type="script", order=1, config={"command": "pytest -x"})
    events = given(CREATED).when(UpdatePipeline(stages=(changed, GATE), by="bob", at=t(1))).decide()
    assert [e.definition_version for e in events] == [2]


def test_the_definition_version_counts_only_changes_of_the_stages() -> None:
    history = [
        CREATED,
        PipelineUpdated(name="a", description=None, stages=(LINT,), updated_by="bob", at=t(1), definition_version=2),
        PipelineUpdated(name="b", description=None, stages=(LINT,), updated_by="bob", at=t(2), definition_version=2),
    ]
    state = (
        given(*history)
        .when(UpdatePipeline(stages=(TEST,), by="bob", at=t(3)))
        .then(
            PipelineUpdated(name="b", description=None, stages=(TEST,), updated_by="bob", at=t(3), definition_version=3)
        )
    )
    assert state.definition_version == 3


def test_updating_a_pipeline_that_does_not_exist_is_not_found() -> None:
    given().when(UpdatePipeline(name="x", by="bob", at=t(1))).not_found(match="pipeline not found")


# ---- delete ------------------------------------------------------------------------------


def test_delete_marks_the_pipeline_deleted() -> None:
    state = given(CREATED).when(DeletePipeline(by="alice", at=t(5))).then(DELETED)
    assert state.exists and state.deleted and not state.live
    assert state.updated_at == t(5)


def test_updating_a_deleted_pipeline_is_not_found() -> None:
    given(CREATED, DELETED).when(UpdatePipeline(name="x", by="bob", at=t(6))).not_found(match="pipeline not found")


def test_deleting_a_deleted_pipeline_is_not_found() -> None:
    given(CREATED, DELETED).when(DeletePipeline(by="bob", at=t(6))).not_found(match="pipeline not found")


def test_deleting_a_pipeline_that_does_not_exist_is_not_found() -> None:
    given().when(DeletePipeline(by="bob", at=t(6))).not_found(match="pipeline not found")


# ---- validate_stage_dicts ----------------------------------------------------------------


def test_valid_stages_of_every_type_have_no_errors() -> None:
    raw = [
        {"id": "test", "name": "Run tests", "type": "script", "order": 1, "config": {"command": "npm test"}},
        {"id": "gate", "type": "approval", "timeout": 86400, "config": {"message": "Ship it?"}},
        {"type": "approval"},
        {"type": "deploy", "config": {"componentId": "web", "environmentId": "prod"}},
        {"type": "notify", "config": {"channel": "#deploys", "message": "shipped"}, "timeout": 2.5},
    ]
    assert validate_stage_dicts(raw) == {}


def test_an_empty_list_of_stages_is_valid() -> None:
    assert validate_stage_dicts([]) == {}


def test_stages_that_are_not_a_list_are_an_error_at_the_path() -> None:
    assert validate_stage_dicts({"type": "script"}) == {"stages": "must be an array of stages"}


def test_a_stage_that_is_not_an_object_is_an_error_at_its_index() -> None:
    assert validate_stage_dicts([{"type": "approval"}, "script"]) == {"stages[1]": "must be an object"}


def test_a_script_stage_without_a_command_is_an_error_at_the_config_path() -> None:
    errors = validate_stage_dicts([{"type": "script", "config": {}}])
    assert errors == {"stages[0].config.command": "is required for a script stage"}


def test_a_script_stage_without_config_needs_a_command() -> None:
    assert list(validate_stage_dicts([{"type": "script"}])) == ["stages[0].config.command"]


def test_a_blank_command_is_an_error() -> None:
    errors = validate_stage_dicts([{"type": "script", "config": {"command": "   "}}])
    assert errors == {"stages[0].config.command": "must be a non-empty string"}


def test_a_deploy_stage_names_each_missing_field() -> None:
    # Without environmentId the component's default environment is used (filled in when saved).
    assert validate_stage_dicts([{"type": "approval"}, {"type": "deploy", "config": {"componentId": "web"}}]) == {}
    errors = validate_stage_dicts([{"type": "deploy", "config": {"environmentId": "prod"}}])
    assert list(errors) == ["stages[0].config.componentId"]


def test_an_unknown_stage_type_is_an_error_at_the_type_path() -> None:
    errors = validate_stage_dicts([{"type": "bash", "config": {"command": "true"}}])
    assert list(errors) == ["stages[0].type"]
    assert "script, approval, deploy, notify" in errors["stages[0].type"]


def test_a_stage_without_a_type_is_an_error_at_the_type_path() -> None:
    assert list(validate_stage_dicts([{"id": "x"}])) == ["stages[0].type"]


def test_an_unknown_stage_field_is_an_error_at_its_path() -> None:
    errors = validate_stage_dicts([{"type": "approval", "colour": "red"}])
    assert errors == {"stages[0].colour": "unknown field"}


def test_an_unknown_config_field_is_an_error_at_its_path() -> None:
    errors = validate_stage_dicts([{"type": "script", "config": {"command": "true", "shell": "zsh"}}])
    assert errors == {"stages[0].config.shell": "unknown field for a script stage"}


def test_a_duplicate_stage_id_is_an_error_at_the_second_occurrence() -> None:
    errors = validate_stage_dicts(
        [{"id": "a", "type": "approval"}, {"id": "b", "type": "approval"}, {"id": "a", "type": "approval"}]
    )
    assert errors == {"stages[2].id": 'duplicate stage id "a"'}


@pytest.mark.parametrize(
    ("item", "path"),
    [
        ({"type": "approval", "id": ""}, "stages[0].id"),
        ({"type": "approval", "id": 7}, "stages[0].id"),
        ({"type": "approval", "name": "x" * 201}, "stages[0].name"),
        ({"type": "approval", "order": "1"}, "stages[0].order"),
        ({"type": "approval", "order": True}, "stages[0].order"),
        ({"type": "approval", "timeout": 0}, "stages[0].timeout"),
        ({"type": "approval", "timeout": True}, "stages[0].timeout"),
        ({"type": "approval", "config": ["message"]}, "stages[0].config"),
    ],
    ids=[
        "empty-id",
        "numeric-id",
        "long-name",
        "string-order",
        "bool-order",
        "zero-timeout",
        "bool-timeout",
        "list-config",
    ],
)
def test_a_malformed_stage_field_is_an_error_at_its_path(item: dict[str, Any], path: str) -> None:
    assert list(validate_stage_dicts([item])) == [path]


def test_every_error_is_reported_at_once_under_the_given_path() -> None:
    raw = [{"type": "script", "extra": 1}, {"type": "nope"}, {"type": "notify", "config": {}}]
    assert set(validate_stage_dicts(raw, path="spec.stages")) == {
        "spec.stages[0].extra",
        "spec.stages[0].config.command",
        "spec.stages[1].type",
        "spec.stages[2].config.channel",
    }


def test_a_typed_stage_may_carry_a_retry_policy_as_in_the_design_example() -> None:
    # DESIGN.md, "Definitions", canonical example: a script stage with stage-level timeout and retry.
    raw = [
        {
            "id": "test",
            "name": "Run tests",
            "type": "script",
            "timeout": 600,
            "retry": {"maxAttempts": 3, "backoff": 2},
            "config": {"command": "pytest -q"},
        }
    ]
    assert validate_stage_dicts(raw) == {}


# ---- stages_from_dicts -------------------------------------------------------------------


def test_stages_keep_the_ids_the_client_sent_and_get_generated_ids_when_missing() -> None:
    raw = [
        {"type": "approval"},
        {"id": "build", "type": "script", "config": {"command": "make"}},
        {"type": "notify", "config": {"channel": "c", "message": "m"}},
    ]
    stages = stages_from_dicts(raw, new_id=["gen-1", "gen-2", "gen-3"])
    assert [s.id for s in stages] == ["gen-1", "build", "gen-2"]


def test_a_generated_id_never_repeats_an_id_the_client_sent() -> None:
    raw = [{"type": "approval"}, {"id": "gen-1", "type": "approval"}]
    stages = stages_from_dicts(raw, new_id=["gen-1", "gen-2"])
    assert [s.id for s in stages] == ["gen-2", "gen-1"]


def test_stages_are_built_in_the_clients_list_order_and_numbered_from_1() -> None:
    raw = [
        {"id": "c", "type": "approval"},
        {"id": "a", "type": "approval"},
        {"id": "b", "type": "approval"},
    ]
    stages = stages_from_dicts(raw, new_id=[])
    assert [(s.id, s.order) for s in stages] == [("c", 1), ("a", 2), ("b", 3)]


def test_stages_run_by_the_order_the_client_sent() -> None:
    raw = [
        {"id": "deploy", "type": "approval", "order": 3},
        {"id": "test", "type": "approval", "order": 1},
        {"id": "build", "type": "approval", "order": 2},
    ]
    stages = stages_from_dicts(raw, new_id=[])
    assert [(s.id, s.order) for s in stages] == [("test", 1), ("build", 2), ("deploy", 3)]


def test_an_explicit_order_of_zero_runs_before_a_higher_order() -> None:
    raw = [{"id": "second", "type": "approval", "order": 1}, {"id": "first", "type": "approval", "order": 0}]
    stages = stages_from_dicts(raw, new_id=[])
    assert [s.id for s in stages] == ["first", "second"]


def test_a_stage_is_built_with_its_name_config_and_timeout() -> None:
    raw = [
        {"id": "t", "name": "Run tests", "type": "script", "timeout": 60, "config": {"command": "pytest"}},
        {"id": "g", "type": "approval", "config": None},
    ]
    stages = stages_from_dicts(raw, new_id=[])
    assert stages == (
        Stage(id="t", name="Run tests", type="script", order=1, config={"command": "pytest"}, timeout=60),
        Stage(id="g", name="g", type="approval", order=2, config={}, timeout=None),
    )


def test_a_built_stage_does_not_share_the_clients_config_dict() -> None:
    config = {"command": "pytest"}
    (stage,) = stages_from_dicts([{"id": "t", "type": "script", "config": config}], new_id=[])
    config["command"] = "rm -rf /"
    assert stage.config == {"command": "pytest"}


def test_orders_the_client_sent_are_kept_as_sent_from_zero() -> None:
    raw = [
        {"id": "build", "type": "approval", "order": 0},
        {"id": "test", "type": "approval", "order": 1},
        {"id": "ship", "type": "approval", "order": 5},
    ]
    stages = stages_from_dicts(raw, new_id=[])
    assert [(s.id, s.order) for s in stages] == [("build", 0), ("test", 1), ("ship", 5)]


def test_stages_without_an_order_follow_the_one_before() -> None:
    raw = [{"id": "a", "type": "approval", "order": 0}, {"id": "b", "type": "approval"}]
    assert [(s.id, s.order) for s in stages_from_dicts(raw, new_id=[])] == [("a", 0), ("b", 1)]
