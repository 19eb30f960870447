"""Stages: the typed stages of the Pipelines API reference (script, approval, deploy, notify) and
stages of jobs from the pipeline model (jobs of steps, run in parallel subject to `needs`)."""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

StageType = Literal["script", "approval", "deploy", "notify", "jobs"]
STAGE_TYPES: tuple[str, ...] = ("script", "approval", "deploy", "notify")
StepKind = Literal["shell", "approval", "deploy", "notify", "plugin"]

# Which config fields each stage type takes, and whether each is required.
CONFIG_FIELDS: dict[str, dict[str, bool]] = {
    "script": {"command": True},
    "approval": {"message": False},
    # Without environmentId: the component's defaultEnvironmentId (filled in when the pipeline is saved).
    "deploy": {"componentId": True, "environmentId": False},
    # Without message: a default naming the pipeline, the run and its status.
    "notify": {"channel": True, "message": False},
}


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    max_attempts: int = 1
    # Seconds before the second attempt; each later wait grows.
    backoff: float = 0.0


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a job: a builtin (`run` for shell, or approval/deploy/notify with `config`) or a
    plugin named by `uses` (Python entry-point group `pipelines.steps`) with `action` and `args`."""

    name: str
    kind: StepKind
    run: str | None = None
    uses: str | None = None
    action: str | None = None
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    when: str | None = None
    timeout: float | None = None
    continue_on_error: bool = False


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A job of a stage of jobs. A job with a `matrix` is expanded into one job per combination
    before a run starts; `matrix_values` then holds that combination."""

    name: str
    steps: tuple[Step, ...]
    needs: tuple[str, ...] = ()
    when: str | None = None
    matrix: dict[str, list[Any]] | None = None
    matrix_values: dict[str, Any] | None = None
    # The job's name in the spec, for a job expanded from a matrix (`name` then has its values).
    base_name: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: float | None = None
    retry: RetryPolicy | None = None
    continue_on_error: bool = False
    # The labels an agent must have (all of them) to run this job's steps (`runsOn`).
    runs_on: tuple[str, ...] = ()


class Stage(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    type: StageType
    order: int
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    # Seconds; None means the service's default (script) or no timeout (approval).
    timeout: float | None = None
    retry: RetryPolicy | None = None
    # Only for type "jobs".
    jobs: tuple[Job, ...] = ()
    when: str | None = None
    # A typed stage's `runsOn`: the labels of the agent that may run it.
    runs_on: tuple[str, ...] = ()


# An agent label: letters, digits and _ . - (say `linux`, `arm64`, `gpu`, `deploy-net`).
LABEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
MAX_LABELS = 16


def validate_runs_on(raw: object, path: str) -> dict[str, str]:
    """The problems of a `runsOn` (an array of agent labels, or one label) by path; none when valid."""
    labels = [raw] if isinstance(raw, str) else raw
    if not isinstance(labels, list) or not labels:
        return {path: "must be a non-empty array of agent labels"}
    if len(labels) > MAX_LABELS:
        return {path: f"has {len(labels)} labels; at most {MAX_LABELS}"}
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not LABEL.match(label):
            return {f"{path}[{i}]": "an agent label is letters, digits and _ . - (at most 63, not first . or -)"}
    return {}


def runs_on_of(raw: object) -> tuple[str, ...]:
    """A validated `runsOn` as the sorted labels it names (duplicates dropped)."""
    if raw is None:
        return ()
    labels = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return tuple(sorted({str(label) for label in labels}))


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """How big a pipeline's definition may be (PIPELINES_MAX_STAGES, _JOBS, _STEPS, _MATRIX,
    _VARIABLES): a run of the largest one must still be cheap to decide and to stop."""

    stages: int = 200
    jobs: int = 200
    steps: int = 200
    matrix: int = 256
    variables: int = 200


DEFAULT_LIMITS = Limits()


def validate_stage_dicts(raw: object, path: str = "stages", limits: Limits = DEFAULT_LIMITS) -> dict[str, str]:
    """Every problem in a client's list of stages, keyed by field path. Empty when valid."""
    errors: dict[str, str] = {}
    if not isinstance(raw, list):
        return {path: "must be an array of stages"}
    if len(raw) > limits.stages:
        return {path: f"has {len(raw)} stages; at most {limits.stages} (PIPELINES_MAX_STAGES)"}
    seen: set[str] = set()
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        if not isinstance(item, dict):
            errors[p] = "must be an object"
            continue
        allowed = {"id", "name", "type", "order", "config", "timeout", "retry", "runsOn"}
        for key in item:
            if key not in allowed:
                errors[f"{p}.{key}"] = "unknown field"
        sid = item.get("id")
        if sid is not None:
            if not isinstance(sid, str) or not 1 <= len(sid) <= 100:
                errors[f"{p}.id"] = "must be a string of 1-100 characters"
            elif sid in seen:
                errors[f"{p}.id"] = f'duplicate stage id "{sid}"'
            else:
                seen.add(sid)
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            errors[f"{p}.name"] = "must be a string of at most 200 characters"
        order = item.get("order")
        if order is not None and (not isinstance(order, int) or isinstance(order, bool)):
            errors[f"{p}.order"] = "must be an integer"
        timeout = item.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0):
            errors[f"{p}.timeout"] = "must be a positive number of seconds"
        retry = item.get("retry")
        if retry is not None:
            errors.update(validate_retry(retry, f"{p}.retry"))
        if item.get("runsOn") is not None:
            errors.update(validate_runs_on(item["runsOn"], f"{p}.runsOn"))
        stype = item.get("type")
        if stype not in STAGE_TYPES:
            errors[f"{p}.type"] = f"must be one of {', '.join(STAGE_TYPES)}"
            continue
        config = item.get("config", {})
        if config is None:
            config = {}
        if not isinstance(config, dict):
            errors[f"{p}.config"] = "must be an object"
            continue
        fields = CONFIG_FIELDS[stype]
        for key, required in fields.items():
            value = config.get(key)
            if value is None:
                if required:
                    errors[f"{p}.config.{key}"] = f"is required for a {stype} stage"
            elif not isinstance(value, str) or not value.strip():
                errors[f"{p}.config.{key}"] = "must be a non-empty string"
        for key in config:
            if key not in fields:
                errors[f"{p}.config.{key}"] = f"unknown field for a {stype} stage"
    return errors


def validate_retry(raw: object, path: str) -> dict[str, str]:
    """The problems of a retry policy (`{"maxAttempts": n, "backoff": s}`) by path; none when valid."""
    if not isinstance(raw, dict):
        return {path: "must be an object with maxAttempts and backoff"}
    errors: dict[str, str] = {}
    for key in raw:
        if key not in ("maxAttempts", "backoff"):
            errors[f"{path}.{key}"] = "unknown field"
    attempts = raw.get("maxAttempts", 1)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 20:
        errors[f"{path}.maxAttempts"] = "must be an integer from 1 to 20"
    backoff = raw.get("backoff", 0)
    if not isinstance(backoff, int | float) or isinstance(backoff, bool) or not 0 <= backoff <= 3600:
        errors[f"{path}.backoff"] = "must be a number of seconds from 0 to 3600"
    return errors


def stages_from_dicts(raw: list[dict[str, Any]], new_id: list[str]) -> tuple[Stage, ...]:
    """Build stages from validated client dicts, in the client's order.

    `new_id` supplies ids for stages sent without one (ids arrive from outside the domain).
    """
    taken = {item["id"] for item in raw if item.get("id")}
    spare = iter(x for x in new_id if x not in taken)
    # Clients may send `order`; stages run by it (ties and missing values keep list order).
    ordered = sorted(enumerate(raw), key=lambda p: (p[0] + 1 if p[1].get("order") is None else p[1]["order"], p[0]))
    stages: list[Stage] = []
    for _, item in ordered:
        sid = item.get("id") or next(spare)
        # A sent order is kept as sent (a stage builder may count from 0); a missing one follows
        # the stage before (from 1).
        order = item["order"] if item.get("order") is not None else (stages[-1].order + 1 if stages else 1)
        stages.append(
            Stage(
                id=sid,
                name=item.get("name") or sid,
                type=item["type"],
                order=order,
                config=dict(item.get("config") or {}),
                timeout=item.get("timeout"),
                retry=None if item.get("retry") is None else msgspec.convert(item["retry"], RetryPolicy),
                runs_on=runs_on_of(item.get("runsOn")),
            )
        )
    return tuple(stages)


def stage_to_dict(stage: Stage) -> dict[str, Any]:
    """A typed stage as a client writes it (camelCase, defaults left out)."""
    out: dict[str, Any] = {"id": stage.id, "name": stage.name, "type": stage.type, "config": dict(stage.config)}
    if stage.timeout is not None:
        out["timeout"] = stage.timeout
    if stage.retry is not None:
        out["retry"] = {"maxAttempts": stage.retry.max_attempts, "backoff": stage.retry.backoff}
    if stage.runs_on:
        out["runsOn"] = list(stage.runs_on)
    return out
