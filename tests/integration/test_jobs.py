"""Stages of jobs run for real: a matrix build, parallel test jobs on concurrent processes, a
conditional job, an approval step, a plugin step and a deploy step, saved as YAML through the API;
the run detail shows every job and step. Also: a failed job fails only the jobs that need it, and
stop and pause with several jobs running."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.system import System, eventually
from tests.integration.test_deploy_notify import component, environment

pytestmark = pytest.mark.integration


def rendezvous(me: str, other: str) -> str:
    """Succeeds only if the other job's step runs at the same time as this one."""
    return (
        f"touch {me}.ready; i=0; while [ $i -lt 200 ]; do [ -f {other}.ready ] && echo met {other} && exit 0; "
        "sleep 0.05; i=$((i+1)); done; echo never met; exit 1"
    )


async def save(system: System, spec: dict[str, Any], fmt: str = "yaml") -> dict[str, Any]:
    p = await system.create_pipeline([], name=f"jobs-{uuid.uuid4().hex[:8]}")
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save", json={"spec": spec, "format": fmt}, headers=system.headers("member")
    )
    assert r.status_code == 200, r.text
    return p


def jobs_of(run: dict[str, Any], stage: int = 0) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in run["stageResults"][stage]["jobs"]}


def steps_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in job["steps"]}


async def test_a_pipeline_of_jobs_runs_matrix_parallel_conditional_approval_plugin_and_deploy(system: System) -> None:
    comp = await component(system)
    env = await environment(
        system, {"type": "command", "command": "echo deploying $COMPONENT_ID to $ENVIRONMENT_ID; cat release.txt"}
    )
    spec = {
        "variables": {"PUBLISH": "no"},
        "stages": [
            {
                "id": "build",
                "jobs": [
                    {
                        "name": "image",
                        "matrix": {"arch": ["amd64", "arm64"]},
                        "steps": [{"name": "build", "run": "echo building ${{ matrix.arch }} for $MATRIX_ARCH"}],
                    },
                    {"name": "unit", "needs": ["image"], "steps": [{"name": "test", "run": rendezvous("u", "i")}]},
                    {
                        "name": "integration",
                        "needs": ["image"],
                        "steps": [{"name": "test", "run": rendezvous("i", "u")}],
                    },
                    {
                        "name": "publish",
                        "needs": ["unit", "integration"],
                        "when": "variables.PUBLISH == 'yes'",
                        "steps": [{"name": "push", "run": "echo push"}],
                    },
                    {
                        "name": "release",
                        "needs": ["unit", "integration"],
                        "steps": [
                            {"name": "ok", "approval": {"message": "Ship it?"}},
                            {
                                "name": "mark",
                                "uses": "file",
                                "action": "write",
                                "args": {"path": "release.txt", "content": "release of ${{ run.id }}"},
                            },
                            {"name": "ship", "deploy": {"componentId": comp["id"], "environmentId": env["id"]}},
                        ],
                    },
                ],
            }
        ],
    }
    p = await save(system, spec)
    run = await system.trigger(p["id"])
    waiting = await system.wait_status(p["id"], run["id"], "waiting_approval", "failed")
    assert waiting["status"] == "waiting_approval", waiting["logs"]
    jobs = jobs_of(waiting)
    assert {n: j["status"] for n, j in jobs.items()} == {
        "image (amd64)": "succeeded",
        "image (arm64)": "succeeded",
        "unit": "succeeded",
        "integration": "succeeded",
        "publish": "skipped",
        "release": "running",
    }
    assert jobs["image (arm64)"]["matrix"] == {"arch": "arm64"}
    assert steps_of(jobs["image (arm64)"])["build"]["output"] == "building arm64 for arm64\n"
    assert "met i" in steps_of(jobs["unit"])["test"]["output"]  # the two test jobs ran at once
    assert "met u" in steps_of(jobs["integration"])["test"]["output"]
    assert jobs["publish"]["error"] == "when is false: variables.PUBLISH == 'yes'"
    assert steps_of(jobs["release"])["ok"]["status"] == "waiting_approval"

    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/approve", json={"comment": "go"}, headers=system.headers()
    )
    assert r.status_code == 200, r.text
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done["logs"]
    release = steps_of(jobs_of(done)["release"])
    assert [release[n]["status"] for n in ("ok", "mark", "ship")] == ["succeeded"] * 3
    assert "wrote" in release["mark"]["output"]
    assert f"deploying {comp['id']} to {env['id']}" in release["ship"]["output"]
    assert f"release of {run['id']}" in release["ship"]["output"]
    for job in jobs_of(done).values():
        if job["status"] == "succeeded":
            assert job["startedAt"] and job["finishedAt"] and job["durationMs"] is not None
    assert done["approvals"][0]["job"] == "release" and done["approvals"][0]["step"] == "ok"
    assert done["stageResults"][0]["status"] == "succeeded"
    assert "Job image (amd64), step build started" in done["logs"]


async def test_a_failed_job_fails_only_the_jobs_that_need_it(system: System) -> None:
    spec = {
        "jobs": [
            {"name": "broken", "steps": [{"name": "s", "run": "echo oops; exit 3"}]},
            {"name": "after", "needs": ["broken"], "steps": [{"name": "s", "run": "echo never"}]},
            {"name": "independent", "steps": [{"name": "s", "run": "sleep 0.3; echo fine"}]},
            {"name": "cleanup", "needs": ["broken"], "when": "failure()", "steps": [{"name": "s", "run": "echo tidy"}]},
        ]
    }
    p = await save(system, spec, fmt="json")
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "failed"
    jobs = jobs_of(done)
    assert jobs["broken"]["status"] == "failed" and steps_of(jobs["broken"])["s"]["exitCode"] == 3
    assert jobs["after"]["status"] == "failed" and 'needs "broken"' in jobs["after"]["error"]
    assert steps_of(jobs["after"])["s"]["status"] == "skipped"
    assert jobs["independent"]["status"] == "succeeded"
    assert jobs["cleanup"]["status"] == "succeeded"
    assert '"broken" failed' in (done["statusReason"] or "")


async def test_stop_kills_every_running_job_and_pause_holds_new_steps(system: System) -> None:
    spec = {
        "jobs": [
            {"name": "a", "steps": [{"name": "long", "run": "echo started; sleep 30"}]},
            {"name": "b", "steps": [{"name": "long", "run": "echo started; sleep 30"}]},
        ]
    }
    p = await save(system, spec)
    run = await system.trigger(p["id"])

    def both_running(r: dict[str, Any]) -> bool:
        jobs = r["stageResults"][0]["jobs"]
        return all(
            steps_of(j)["long"]["status"] == "running" and "started" in (steps_of(j)["long"]["output"] or "")
            for j in jobs
        )

    await system.wait_run(p["id"], run["id"], both_running)  # both scripts are under way
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/stop", headers=system.headers())
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    def settled(r: dict[str, Any]) -> bool:
        return r["stageResults"][0]["status"] != "running"

    done = await system.wait_run(p["id"], run["id"], settled, timeout=15)
    assert {n: j["status"] for n, j in jobs_of(done).items()} == {"a": "cancelled", "b": "cancelled"}
    assert done["stageResults"][0]["status"] == "cancelled"

    spec = {
        "jobs": [
            {"name": "a", "steps": [{"name": "one", "run": "sleep 0.5"}, {"name": "two", "run": "echo two"}]},
            {"name": "b", "steps": [{"name": "one", "run": "sleep 0.5"}]},
        ]
    }
    p = await save(system, spec)
    run = await system.trigger(p["id"])
    await system.wait_run(p["id"], run["id"], lambda r: r["status"] == "running" and both_one_running(r))
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/pause", headers=system.headers())
    assert r.status_code == 200 and r.json()["status"] == "paused"
    # Both running steps finish; their completions, decided while paused, start nothing.
    held = await system.wait_run(
        p["id"], run["id"], lambda r: all(steps_of(j)["one"]["status"] == "succeeded" for j in jobs_of(r).values())
    )
    assert held["status"] == "paused"
    assert steps_of(jobs_of(held)["a"])["two"]["status"] == "pending"
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/resume", headers=system.headers())
    assert r.status_code == 200
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded"
    events = (
        await system.client.get(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/events", headers=system.headers())
    ).json()
    order = [(e["type"], e["data"].get("job"), e["data"].get("step")) for e in events]
    assert order.index(("step_started", "a", "two")) > order.index(("run_resumed", None, None))


def both_one_running(r: dict[str, Any]) -> bool:
    return all(steps_of(j)["one"]["status"] == "running" for j in r["stageResults"][0]["jobs"])


async def test_a_plugin_step_that_fails_fails_its_step_with_its_output(system: System) -> None:
    spec = {
        "jobs": [
            {
                "name": "j",
                "steps": [{"name": "check", "uses": "file", "action": "check", "args": {"path": "missing.txt"}}],
            }
        ]
    }
    p = await save(system, spec)
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    step = steps_of(jobs_of(done)["j"])["check"]
    assert step["status"] == "failed" and step["kind"] == "uses:file"
    assert "missing.txt does not exist" in step["output"]


async def test_the_readme_spec_of_jobs_validates_runs_and_deploys(system: System) -> None:
    import yaml

    from tests.e2e.test_readme import README

    text = README.split("<!-- jobs-spec:start -->", 1)[1].split("<!-- jobs-spec:end -->", 1)[0]
    spec = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "echo deploying $COMPONENT_ID"})
    p = await save(system, spec)
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}/spec?format=yaml", headers=system.headers("viewer"))
    assert r.status_code == 200 and yaml.safe_load(r.json()["content"]) == spec
    run = await system.trigger(p["id"], variables={"COMPONENT": comp["id"], "ENVIRONMENT": env["id"]})
    waiting = await system.wait_status(p["id"], run["id"], "waiting_approval", "failed")
    assert waiting["status"] == "waiting_approval", waiting["logs"]
    assert {n: j["status"] for n, j in jobs_of(waiting).items()} == {
        "image (amd64)": "succeeded",
        "image (arm64)": "succeeded",
        "unit": "succeeded",
        "lint": "succeeded",
        "publish": "skipped",
    }
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/approve", headers=system.headers())
    assert r.status_code == 200, r.text
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done["logs"]
    ship = steps_of(jobs_of(done, 1)["ship"])
    assert f"deploying {comp['id']}" in ship["deploy"]["output"]
    assert ship["tell"]["output"] == f"shipped run {run['id']}\n"
    r = await system.client.get("/api/v1/deployments", params={"environmentId": env["id"]}, headers=system.headers())
    assert r.json()["data"][0]["status"] == "succeeded"


async def test_a_deploy_step_naming_an_unknown_environment_is_refused_at_save(system: System) -> None:
    p = await system.create_pipeline([])
    spec = {
        "stages": [
            {
                "id": "ship",
                "jobs": [{"name": "j", "steps": [{"deploy": {"componentId": "c-x", "environmentId": "e-x"}}]}],
            }
        ]
    }
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save", json={"spec": spec}, headers=system.headers("member")
    )
    assert r.status_code == 400
    paths = {e["path"] for e in r.json()["errors"]}
    assert paths == {
        "spec.stages[0].jobs[0].steps[0].deploy.componentId",
        "spec.stages[0].jobs[0].steps[0].deploy.environmentId",
    }


async def test_the_readme_spec_kept_as_yaml_in_git_validates_runs_and_shows_every_job_and_step(
    system: System, git_repos: Path
) -> None:
    import yaml

    from tests.e2e.test_readme import README
    from tests.integration.test_git_pipelines import bare_repo, create_git_pipeline

    block = README.split("<!-- jobs-spec:start -->", 1)[1].split("<!-- jobs-spec:end -->", 1)[0]
    text = block.split("```yaml\n", 1)[1].split("```", 1)[0]
    _, url = bare_repo(git_repos, {".pipelines/ci.yaml": text})
    p = await create_git_pipeline(system, url, pipelineFilePath=".pipelines/ci.yaml")
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/validate", json={"spec": yaml.safe_load(text)}, headers=system.headers()
    )
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "echo deploying $COMPONENT_ID"})
    run = await system.trigger(p["id"], variables={"COMPONENT": comp["id"], "ENVIRONMENT": env["id"]})
    assert run["trigger"]["commitSha"] and run["trigger"]["branch"] == "main"
    await system.wait_status(p["id"], run["id"], "waiting_approval", "failed")
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/approve", headers=system.headers())
    assert r.status_code == 200, r.text
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done["logs"]
    shown = {
        (stage["stageId"], job["name"], step["name"]): step["status"]
        for stage in done["stageResults"]
        for job in stage["jobs"]
        for step in job["steps"]
    }
    assert shown == {
        ("build", "image (amd64)", "build"): "succeeded",
        ("build", "image (arm64)", "build"): "succeeded",
        ("build", "unit", "test"): "succeeded",
        ("build", "lint", "check"): "succeeded",
        ("build", "publish", "push"): "skipped",
        ("release", "ship", "approve"): "succeeded",
        ("release", "ship", "deploy"): "succeeded",
        ("release", "ship", "tell"): "succeeded",
    }


async def test_the_run_list_shows_each_steps_own_output(system: System) -> None:
    spec = {
        "jobs": [
            {"name": "a", "steps": [{"name": "one", "run": "echo from-one"}, {"name": "two", "run": "echo from-two"}]}
        ]
    }
    p = await save(system, spec)
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "succeeded", "failed")

    async def listed() -> dict[str, Any] | None:
        r = await system.client.get(f"/api/v1/pipelines/{p['id']}/runs", headers=system.headers("viewer"))
        found = [x for x in r.json() if x["id"] == run["id"] and x["status"] == "succeeded"]
        return found[0] if found else None

    found: list[dict[str, Any]] = []

    async def is_listed() -> bool:
        view = await listed()
        found[:] = [] if view is None else [view]
        return bool(found)

    await eventually(is_listed, what="the run listed as succeeded")
    view = found[0]
    steps = steps_of(jobs_of(view)["a"])
    assert steps["one"]["output"] == "from-one\n" and steps["two"]["output"] == "from-two\n"
    assert view["stageResults"][0]["output"] == "from-one\nfrom-two\n"


async def test_a_notify_step_renders_matrix_and_run_values_and_sends_them(system: System) -> None:
    from tests.integration.test_deploy_notify import _post, receiver

    async with receiver() as hook:
        name = f"builds-{uuid.uuid4().hex[:6]}"
        await _post(system, "/api/v1/channels", {"name": name, "type": "webhook", "url": hook.url})
        spec = {
            "jobs": [
                {
                    "name": "tell",
                    "matrix": {"os": ["linux"]},
                    "env": {"TOKEN": "${{ secrets.T }}"},
                    "steps": [
                        {
                            "name": "say",
                            "notify": {
                                "channel": name,
                                "message": "${{ matrix.os }} build of ${{ pipeline.id }} "
                                "run ${{ run.id }} ${{ secrets.T }} ${{ env.TOKEN }}",
                            },
                        }
                    ],
                }
            ]
        }
        p = await save(system, spec)
        run = await system.trigger(p["id"], secrets={"T": "hush-hush"})
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done["logs"]
        assert hook.bodies()[0]["message"] == f"linux build of {p['id']} run {run['id']} *** ***"
