"""Pipeline specs as code: validation that reports every problem with its path, and conversion
to the stages a run executes (matrix jobs expanded).

A spec is a JSON object:

    {"stages": [<typed stage> | <stage of jobs>, ...], "variables": {...}, "triggers": [...]}
    {"jobs": [...], ...}                      # shorthand: the jobs in one default stage

A typed stage is the API reference's (`type` script/approval/deploy/notify with `config`); a
stage of jobs has `jobs`. A job has `steps`, and optionally `needs`, `when`, `matrix`, `env`,
`timeout`, `retry`, `continueOnError`, `runsOn` (the labels its agent must have). A step is `run`
(the builtin shell), `approval`, `deploy`
or `notify` (each with its config object), or a plugin: `uses`, `action`, `args`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from datetime import tzinfo
from typing import Any

import msgspec

from domain import expressions
from domain.cron import CronError, CronSchedule
from domain.stages import (
    DEFAULT_LIMITS,
    Job,
    Limits,
    RetryPolicy,
    Stage,
    Step,
    runs_on_of,
    stages_from_dicts,
    validate_retry,
    validate_runs_on,
    validate_stage_dicts,
)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
EXPRESSION_ROOTS = frozenset({"variables", "secrets", "matrix", "trigger", "jobs", "steps", "run", "pipeline", "env"})
TOP_FIELDS = {"stages", "jobs", "variables", "triggers"}
JOB_FIELDS = {"name", "steps", "needs", "when", "matrix", "env", "timeout", "retry", "continueOnError", "runsOn"}
STEP_FIELDS = {
    "name",
    "run",
    "uses",
    "action",
    "args",
    "approval",
    "deploy",
    "notify",
    "when",
    "timeout",
    "continueOnError",
}
BUILTIN_STEP_CONFIG = {
    "approval": {"message": False},
    "deploy": {"componentId": True, "environmentId": True},
    "notify": {"channel": True, "message": True},
}

# Checks an expression (or a template with ${{ }}); returns an error message or None.
ExpressionCheck = Callable[[str], str | None]
# The time zone of a name, which raises KeyError or ValueError for an unknown one (as
# `zoneinfo.ZoneInfo` does; it reads the zone database, which the caller may do, `domain` not).
ZoneLookup = Callable[[str], tzinfo]


class SpecError(msgspec.Struct, frozen=True):
    path: str
    message: str


def _default_check(text: str) -> str | None:
    return expressions.check(text, roots=EXPRESSION_ROOTS)


def _default_template_check(text: str) -> str | None:
    errors = expressions.template_errors(text, roots=EXPRESSION_ROOTS)
    return errors[0] if errors else None


def validate_spec(
    raw: object,
    *,
    zone: ZoneLookup,
    plugins: frozenset[str] | None = None,
    check_expression: ExpressionCheck = _default_check,
    check_template: ExpressionCheck = _default_template_check,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[list[SpecError], list[SpecError]]:
    """(errors, warnings) of a spec; both empty when it is valid. Every error carries its path."""
    errors: list[SpecError] = []
    warnings: list[SpecError] = []

    def err(path: str, message: str) -> None:
        errors.append(SpecError(path, message))

    if not isinstance(raw, dict):
        err("spec", "must be an object with `stages` or `jobs`")
        return errors, warnings
    # Sizes first: a spec over a limit is refused without walking all of it.
    _check_sizes(raw, limits, err)
    if errors:
        return errors, warnings
    for key in raw:
        if key not in TOP_FIELDS:
            err(key, "unknown field")
    has_stages, has_jobs = "stages" in raw, "jobs" in raw
    if has_stages == has_jobs:
        err("spec", "needs exactly one of `stages` or `jobs`")
    variables = raw.get("variables")
    if variables is not None:
        if not isinstance(variables, dict):
            err("variables", "must be an object of strings")
        else:
            for name, value in variables.items():
                if not _VAR.match(name):
                    err(f"variables.{name}", "names are letters, digits and _, not starting with a digit")
                elif not isinstance(value, str):
                    err(f"variables.{name}", "must be a string")
    _validate_triggers(raw.get("triggers"), err, zone)
    if has_jobs and not has_stages:
        _validate_jobs(raw["jobs"], "jobs", err, warnings, plugins, check_expression, check_template)
    elif has_stages:
        stages = raw["stages"]
        if not isinstance(stages, list):
            err("stages", "must be an array")
        else:
            typed: list[tuple[int, Any]] = []
            seen: set[str] = set()
            for i, stage in enumerate(stages):
                path = f"stages[{i}]"
                if isinstance(stage, dict) and "jobs" in stage:
                    for key in stage:
                        if key not in ("id", "name", "jobs", "when"):
                            err(f"{path}.{key}", "unknown field for a stage of jobs")
                    sid = stage.get("id")
                    if sid is not None and (not isinstance(sid, str) or not sid):
                        err(f"{path}.id", "must be a non-empty string")
                    elif sid in seen:
                        err(f"{path}.id", f'duplicate stage id "{sid}"')
                    elif sid:
                        seen.add(sid)
                    if stage.get("when") is not None:
                        _check_when(stage["when"], f"{path}.when", err, check_expression)
                    _validate_jobs(
                        stage["jobs"], f"{path}.jobs", err, warnings, plugins, check_expression, check_template
                    )
                else:
                    typed.append((i, stage))
                    if isinstance(stage, dict) and isinstance(stage.get("id"), str):
                        if stage["id"] in seen:
                            err(f"{path}.id", f'duplicate stage id "{stage["id"]}"')
                        seen.add(stage["id"])
            for i, stage in typed:
                for path, message in validate_stage_dicts([stage]).items():
                    if "duplicate stage id" in message:
                        continue
                    err(path.replace("stages[0]", f"stages[{i}]", 1), message)
    return errors, warnings


def _validate_triggers(raw: object, err: Callable[[str, str], None], zone: ZoneLookup) -> None:
    if raw is None:
        return
    if not isinstance(raw, list):
        err("triggers", "must be an array")
        return
    for i, trig in enumerate(raw):
        path = f"triggers[{i}]"
        if not isinstance(trig, dict):
            err(path, "must be an object")
            continue
        kind = trig.get("type")
        allowed = {
            "manual": {"type"},
            "cron": {"type", "schedule", "timezone"},
            "event": {"type", "events", "branches"},
        }
        if kind not in allowed:
            err(f"{path}.type", "must be one of manual, cron, event")
            continue
        for key in trig:
            if key not in allowed[kind]:
                err(f"{path}.{key}", f"unknown field for a {kind} trigger")
        if kind == "cron":
            schedule = trig.get("schedule")
            if not isinstance(schedule, str):
                err(f"{path}.schedule", "is required: a five-field cron expression")
            else:
                try:
                    CronSchedule.parse(schedule)
                except CronError as exc:
                    err(f"{path}.schedule", str(exc))
            tz = trig.get("timezone", "UTC")
            if not isinstance(tz, str) or not _known_zone(tz, zone):
                err(f"{path}.timezone", f"unknown time zone {tz!r}")
        if kind == "event":
            for key in ("events", "branches"):
                value = trig.get(key)
                if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                    err(f"{path}.{key}", "must be an array of strings")


def _known_zone(name: str, zone: ZoneLookup) -> bool:
    try:
        zone(name)
    except (KeyError, ValueError):  # zoneinfo.ZoneInfoNotFoundError is a KeyError
        return False
    return True


def _check_when(value: object, path: str, err: Callable[[str, str], None], check: ExpressionCheck) -> None:
    if not isinstance(value, str) or not value.strip():
        err(path, "must be an expression string")
        return
    problem = check(value)
    if problem:
        err(path, f"bad expression: {problem}")


def _validate_jobs(
    raw: object,
    path: str,
    err: Callable[[str, str], None],
    warnings: list[SpecError],
    plugins: frozenset[str] | None,
    check_expression: ExpressionCheck,
    check_template: ExpressionCheck,
) -> None:
    if not isinstance(raw, list) or not raw:
        err(path, "must be a non-empty array of jobs")
        return
    names: dict[str, int] = {}
    needs: dict[str, list[str]] = {}
    by_index: dict[int, list[str]] = {}
    for i, job in enumerate(raw):
        jp = f"{path}[{i}]"
        if not isinstance(job, dict):
            err(jp, "must be an object")
            continue
        for key in job:
            if key not in JOB_FIELDS:
                err(f"{jp}.{key}", "unknown field")
        name = job.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            err(f"{jp}.name", "is required: letters, digits, _ . - (at most 100)")
        elif name in names:
            err(f"{jp}.name", f'duplicate job name "{name}"')
        else:
            names[name] = i
        job_needs = job.get("needs", [])
        if isinstance(job_needs, str):
            job_needs = [job_needs]
        if not isinstance(job_needs, list) or not all(isinstance(n, str) for n in job_needs):
            err(f"{jp}.needs", "must be an array of job names")
            job_needs = []
        if isinstance(name, str) and name not in needs:
            needs[name] = job_needs
        by_index[i] = job_needs
        if job.get("when") is not None:
            _check_when(job["when"], f"{jp}.when", err, check_expression)
        _validate_matrix(job.get("matrix"), f"{jp}.matrix", err)
        env = job.get("env")
        if env is not None:
            if not isinstance(env, dict):
                err(f"{jp}.env", "must be an object of strings")
            else:
                for k, v in env.items():
                    if not _VAR.match(k):
                        err(f"{jp}.env.{k}", "names are letters, digits and _, not starting with a digit")
                    elif not isinstance(v, str):
                        err(f"{jp}.env.{k}", "must be a string")
                    else:
                        problem = check_template(v)
                        if problem:
                            err(f"{jp}.env.{k}", f"bad expression: {problem}")
        _check_positive(job.get("timeout"), f"{jp}.timeout", err)
        if job.get("retry") is not None:
            for p, m in validate_retry(job["retry"], f"{jp}.retry").items():
                err(p, m)
        if "continueOnError" in job and not isinstance(job["continueOnError"], bool):
            err(f"{jp}.continueOnError", "must be true or false")
        if job.get("runsOn") is not None:
            for p, m in validate_runs_on(job["runsOn"], f"{jp}.runsOn").items():
                err(p, m)
        _validate_steps(job.get("steps"), f"{jp}.steps", err, plugins, check_expression, check_template)
    for i, job in enumerate(raw):
        if not isinstance(job, dict) or not isinstance(job.get("name"), str):
            continue
        for n in by_index.get(i, []):
            if n not in names:
                err(f"{path}[{i}].needs", f'unknown job "{n}"')
            elif n == job["name"]:
                err(f"{path}[{i}].needs", "a job cannot need itself")
    cycle = _find_cycle({k: [n for n in v if n in names and n != k] for k, v in needs.items()})
    if cycle:
        err(f"{path}[{names[cycle[0]]}].needs", "cycle in needs: " + " -> ".join([*cycle, cycle[0]]))


def _find_cycle(graph: Mapping[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _check_positive(value: object, path: str, err: Callable[[str, str], None]) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        err(path, "must be a positive number of seconds")


def size_errors(raw: object, limits: Limits) -> list[SpecError]:
    """Only the size limits of a spec (cheap: nothing else is walked)."""
    errors: list[SpecError] = []
    if isinstance(raw, dict):
        _check_sizes(raw, limits, lambda path, message: errors.append(SpecError(path, message)))
    return errors


def _sized(raw: object) -> list[Any]:
    return raw if isinstance(raw, list) else []


def _check_sizes(raw: dict[str, Any], limits: Limits, err: Callable[[str, str], None]) -> None:
    stages = _sized(raw.get("stages"))
    if len(stages) > limits.stages:
        err("stages", f"has {len(stages)} stages; at most {limits.stages} (PIPELINES_MAX_STAGES)")
        return
    variables = raw.get("variables")
    if isinstance(variables, dict) and len(variables) > limits.variables:
        err("variables", f"has {len(variables)} variables; at most {limits.variables} (PIPELINES_MAX_VARIABLES)")
    lists = [("jobs", _sized(raw.get("jobs")))]
    lists += [(f"stages[{i}].jobs", _sized(s.get("jobs"))) for i, s in enumerate(stages) if isinstance(s, dict)]
    total = 0
    for path, jobs in lists:
        for i, job in enumerate(jobs):
            if not isinstance(job, dict):
                continue
            size = 1
            matrix = job.get("matrix")
            if isinstance(matrix, dict):
                for values in matrix.values():
                    size *= len(values) if isinstance(values, list) else 1
                if size > limits.matrix:
                    err(
                        f"{path}[{i}].matrix", f"expands to {size} jobs; at most {limits.matrix} (PIPELINES_MAX_MATRIX)"
                    )
            total += size
            steps = _sized(job.get("steps"))
            if len(steps) > limits.steps:
                err(f"{path}[{i}].steps", f"has {len(steps)} steps; at most {limits.steps} (PIPELINES_MAX_STEPS)")
    if total > limits.jobs:
        err("jobs", f"has {total} jobs (matrices expanded); at most {limits.jobs} (PIPELINES_MAX_JOBS)")


def _validate_matrix(raw: object, path: str, err: Callable[[str, str], None]) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict) or not raw:
        err(path, "must be an object of non-empty arrays")
        return
    for key, values in raw.items():
        if not _VAR.match(key):
            err(f"{path}.{key}", "keys are letters, digits and _, not starting with a digit")
        if not isinstance(values, list) or not values:
            err(f"{path}.{key}", "must be a non-empty array")
            continue
        if not all(isinstance(v, str | int | float | bool) for v in values):
            err(f"{path}.{key}", "values must be strings, numbers or booleans")
        # Distinct as they appear in job names (`true` and "true" would name the same job).
        if len({_render(v) for v in values}) != len(values):
            err(f"{path}.{key}", "values must be distinct")


def _validate_steps(
    raw: object,
    path: str,
    err: Callable[[str, str], None],
    plugins: frozenset[str] | None,
    check_expression: ExpressionCheck,
    check_template: ExpressionCheck,
) -> None:
    if not isinstance(raw, list) or not raw:
        err(path, "must be a non-empty array of steps")
        return
    seen: set[str] = set()
    for i, step in enumerate(raw):
        sp = f"{path}[{i}]"
        if not isinstance(step, dict):
            err(sp, "must be an object")
            continue
        for key in step:
            if key not in STEP_FIELDS:
                err(f"{sp}.{key}", "unknown field")
        name = step.get("name")
        if name is not None:
            if not isinstance(name, str) or not _NAME.match(name):
                err(f"{sp}.name", "letters, digits, _ . - (at most 100)")
            elif name in seen:
                err(f"{sp}.name", f'duplicate step name "{name}"')
            else:
                seen.add(name)
        kinds = [k for k in ("run", "uses", "approval", "deploy", "notify") if k in step]
        if len(kinds) != 1:
            err(sp, "needs exactly one of run, uses, approval, deploy, notify")
            continue
        kind = kinds[0]
        if kind == "run":
            if not isinstance(step["run"], str) or not step["run"].strip():
                err(f"{sp}.run", "must be a non-empty command")
            else:
                problem = check_template(step["run"])
                if problem:
                    err(f"{sp}.run", f"bad expression: {problem}")
        elif kind == "uses":
            uses = step["uses"]
            if not isinstance(uses, str) or not uses:
                err(f"{sp}.uses", "must name a step plugin")
            elif plugins is not None and uses not in plugins and uses != "shell":
                err(f"{sp}.uses", f'unknown step kind "{uses}" (installed: {", ".join(sorted(plugins)) or "none"})')
            if "args" in step and not isinstance(step["args"], dict):
                err(f"{sp}.args", "must be an object")
            if "action" in step and not isinstance(step["action"], str):
                err(f"{sp}.action", "must be a string")
        else:
            config = step[kind]
            if config is None:
                config = {}
            if not isinstance(config, dict):
                err(f"{sp}.{kind}", "must be an object")
                continue
            for key, required in BUILTIN_STEP_CONFIG[kind].items():
                value = config.get(key)
                if value is None:
                    if required:
                        err(f"{sp}.{kind}.{key}", f"is required for a {kind} step")
                elif not isinstance(value, str) or not value.strip():
                    err(f"{sp}.{kind}.{key}", "must be a non-empty string")
            for key in config:
                if key not in BUILTIN_STEP_CONFIG[kind]:
                    err(f"{sp}.{kind}.{key}", f"unknown field for a {kind} step")
        if kind != "run" and kind != "uses" and "args" in step:
            err(f"{sp}.args", "only plugin steps take args")
        if step.get("when") is not None:
            _check_when(step["when"], f"{sp}.when", err, check_expression)
        _check_positive(step.get("timeout"), f"{sp}.timeout", err)
        if "continueOnError" in step and not isinstance(step["continueOnError"], bool):
            err(f"{sp}.continueOnError", "must be true or false")


# ---- conversion ------------------------------------------------------------------------------


def _step(raw: dict[str, Any], index: int) -> Step:
    kind = next(k for k in ("run", "uses", "approval", "deploy", "notify") if k in raw)
    name = raw.get("name") or f"step-{index + 1}"
    common: dict[str, Any] = {
        "name": name,
        "when": raw.get("when"),
        "timeout": raw.get("timeout"),
        "continue_on_error": bool(raw.get("continueOnError", False)),
    }
    if kind == "run":
        return Step(kind="shell", run=raw["run"], **common)
    if kind == "uses":
        if raw["uses"] == "shell":
            return Step(kind="shell", run=str(raw.get("args", {}).get("run", "")), **common)
        return Step(
            kind="plugin", uses=raw["uses"], action=raw.get("action"), args=dict(raw.get("args") or {}), **common
        )
    return Step(kind=kind, config=dict(raw[kind] or {}), **common)


def matrix_combinations(matrix: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(matrix)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(matrix[k] for k in keys))]


def matrix_job_name(base: str, values: Mapping[str, Any]) -> str:
    """`build` with {arch: amd64, os: linux} -> `build (amd64, linux)`."""
    return f"{base} ({', '.join(_render(v) for v in values.values())})"


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _jobs(raw: list[dict[str, Any]]) -> tuple[Job, ...]:
    """Jobs with every matrix expanded; a `needs` on a matrix job waits for all its expansions."""
    expanded: dict[str, list[str]] = {}
    for job in raw:
        if job.get("matrix"):
            expanded[job["name"]] = [matrix_job_name(job["name"], c) for c in matrix_combinations(job["matrix"])]
        else:
            expanded[job["name"]] = [job["name"]]
    out: list[Job] = []
    for job in raw:
        needs = job.get("needs", [])
        if isinstance(needs, str):
            needs = [needs]
        deps = tuple(n for need in needs for n in expanded.get(need, [need]))
        retry = None if job.get("retry") is None else msgspec.convert(job["retry"], RetryPolicy)
        steps = tuple(_step(s, i) for i, s in enumerate(job["steps"]))
        base: dict[str, Any] = {
            "steps": steps,
            "needs": deps,
            "when": job.get("when"),
            "env": dict(job.get("env") or {}),
            "timeout": job.get("timeout"),
            "retry": retry,
            "continue_on_error": bool(job.get("continueOnError", False)),
            "runs_on": runs_on_of(job.get("runsOn")),
        }
        if job.get("matrix"):
            for combo in matrix_combinations(job["matrix"]):
                out.append(
                    Job(
                        name=matrix_job_name(job["name"], combo),
                        base_name=job["name"],
                        matrix=job["matrix"],
                        matrix_values=combo,
                        **base,
                    )
                )
        else:
            out.append(Job(name=job["name"], **base))
    return tuple(out)


def stages_from_spec(raw: dict[str, Any], new_ids: list[str]) -> tuple[Stage, ...]:
    """The stages of a valid spec (check with `validate_spec` first), typed and of jobs, in order."""
    if "jobs" in raw and "stages" not in raw:
        return (Stage(id="default", name="default", type="jobs", order=1, jobs=_jobs(raw["jobs"])),)
    typed_ids = iter(new_ids)
    stages: list[Stage] = []
    for i, item in enumerate(raw["stages"]):
        if "jobs" in item:
            sid = item.get("id") or f"stage-{i + 1}"
            stages.append(
                Stage(
                    id=sid,
                    name=item.get("name") or sid,
                    type="jobs",
                    order=i + 1,
                    jobs=_jobs(item["jobs"]),
                    when=item.get("when"),
                )
            )
        else:
            (typed,) = stages_from_dicts([item], [next(typed_ids)])
            stages.append(msgspec.structs.replace(typed, order=i + 1))
    return tuple(stages)
