"""The request and definition limits: settings with documented defaults, and the domain checks."""

from __future__ import annotations

from domain.spec import size_errors
from domain.stages import Limits, validate_stage_dicts
from infra.config import Settings
from infra.http.inputs import json_depth, text_problem

ENV = {"PIPELINES_JWT_SECRET": "x" * 32}


def test_limits_and_cors_origins_have_defaults_and_come_from_the_environment() -> None:
    s = Settings.from_env(ENV)
    assert (s.max_body_bytes, s.max_json_depth, s.max_stages, s.max_jobs, s.max_steps, s.max_matrix) == (
        10 * 1024 * 1024,
        64,
        200,
        200,
        200,
        256,
    )
    assert s.max_variables == 200 and s.cors_origins == ()
    s = Settings.from_env(
        {**ENV, "PIPELINES_MAX_STAGES": "3", "PIPELINES_CORS_ORIGINS": "https://a.example, https://b.example"}
    )
    assert s.max_stages == 3 and s.cors_origins == ("https://a.example", "https://b.example")


def test_stage_and_spec_sizes_are_checked_against_the_given_limits() -> None:
    stage = {"type": "script", "config": {"command": "true"}}
    assert validate_stage_dicts([stage] * 3, limits=Limits(stages=2)) == {
        "stages": "has 3 stages; at most 2 (PIPELINES_MAX_STAGES)"
    }
    assert validate_stage_dicts([stage] * 3, limits=Limits(stages=3)) == {}
    job = {"name": "j", "steps": [{"run": "true"}], "matrix": {"a": [1, 2, 3]}}
    assert [e.path for e in size_errors({"jobs": [job]}, Limits(matrix=2))] == ["jobs[0].matrix"]
    assert [e.path for e in size_errors({"jobs": [job, job]}, Limits(jobs=5))] == ["jobs"]
    assert size_errors({"jobs": [job]}, Limits()) == []


def test_text_and_depth_checks() -> None:
    assert text_problem("fine") is None
    assert text_problem("a\0b") == "must not contain NUL characters"
    assert text_problem("\ud800") is not None
    assert json_depth(b"[[[]]]", 3) is False and json_depth(b"[[[[]]]]", 3) is True
    assert json_depth(b'["[[[[[[", {"a": "{{{{"}]', 2) is False
