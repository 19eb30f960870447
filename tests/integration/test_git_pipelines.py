"""Git-backed pipelines over the API, against local bare repositories (file:// URLs) under the
directory that PIPELINES_GIT_ALLOW_LOCAL allows."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.system import System

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "variables": {"GREETING": "hello"},
    "stages": [{"id": "hello", "name": "Say hello", "type": "script", "config": {"command": "echo $GREETING"}}],
}
_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "tester",
    "GIT_AUTHOR_EMAIL": "tester@example.invalid",
    "GIT_COMMITTER_NAME": "tester",
    "GIT_COMMITTER_EMAIL": "tester@example.invalid",
}


@pytest.fixture
def repos(git_repos: Path) -> Path:
    """The directory the system allows local repositories in (see conftest.py)."""
    return git_repos


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, env=_ENV, check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def bare_repo(repos: Path, files: dict[str, str] | None = None) -> tuple[Path, str]:
    """A bare repository (branch main) in `repos`, with `files` committed when given; its path
    and file:// URL. Shared with every user (the git user pushes to it too)."""
    bare = repos / f"{uuid.uuid4().hex[:8]}.git"
    git(repos, "init", "-q", "--bare", "--shared=0666", "-b", "main", str(bare))
    if files:
        push_files(repos, bare, files, "initial")
    return bare, f"file://{bare}"


def push_files(tmp_path: Path, bare: Path, files: dict[str, str], message: str, branch: str = "main") -> str:
    """Commit `files` on top of the branch (as another user would) and push; the new head."""
    work = tmp_path / f"work-{uuid.uuid4().hex[:8]}"
    git(tmp_path, "clone", "-q", str(bare), str(work))
    if git(work, "ls-remote", "--heads", "origin", branch):
        git(work, "checkout", "-q", branch)
    else:
        git(work, "checkout", "-q", "-b", branch)
    for name, content in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(content)
        git(work, "add", name)
    git(work, "commit", "-q", "-m", message)
    git(work, "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
    return git(work, "rev-parse", "HEAD")


def show(bare: Path, rev: str) -> str:
    return git(bare, "show", rev)


async def create_git_pipeline(system: System, url: str, **fields: Any) -> dict[str, Any]:
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": f"git-{uuid.uuid4().hex[:8]}", "repoUrl": url, **fields},
        headers=system.headers("member"),
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


async def save(system: System, pid: str, **body: Any) -> Any:
    return await system.client.post(f"/api/v1/pipelines/{pid}/spec/save", json=body, headers=system.headers("member"))


async def test_a_pipeline_names_its_repository_branch_and_file(system: System, tmp_path: Path, repos: Path) -> None:
    _, url = bare_repo(repos)
    p = await create_git_pipeline(system, url, defaultBranch="trunk", pipelineFilePath="ci/pipeline.yml")
    assert (p["repoUrl"], p["defaultBranch"], p["pipelineFilePath"]) == (url, "trunk", "ci/pipeline.yml")
    r = await system.client.patch(
        f"/api/v1/pipelines/{p['id']}", json={"defaultBranch": "main"}, headers=system.headers("member")
    )
    assert r.status_code == 200, r.text
    assert (r.json()["repoUrl"], r.json()["defaultBranch"], r.json()["pipelineFilePath"]) == (
        url,
        "main",
        "ci/pipeline.yml",
    )
    # an inline pipeline shows the fields as null
    inline = await system.create_pipeline([])
    assert (inline["repoUrl"], inline["defaultBranch"], inline["pipelineFilePath"]) == (None, None, None)
    # PUT replaces the whole pipeline: without repoUrl it is inline again
    r = await system.client.put(f"/api/v1/pipelines/{p['id']}", json={"name": p["name"]}, headers=system.headers())
    assert r.status_code == 200, r.text
    assert r.json()["repoUrl"] is None


@pytest.mark.parametrize(
    "url",
    ["ext::sh -c touch% /tmp/pwned", "http://example.com/repo.git", "relative/path", "-uploadpack=x", "file://x/y"],
)
async def test_a_bad_repo_url_is_400_naming_the_field(system: System, url: str) -> None:
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": f"bad-{uuid.uuid4().hex[:8]}", "repoUrl": url},
        headers=system.headers("member"),
    )
    assert r.status_code == 400, r.text
    assert [e["path"] for e in r.json()["errors"]] == ["repoUrl"]


async def test_bad_branch_and_file_path_are_400(system: System, tmp_path: Path, repos: Path) -> None:
    _, url = bare_repo(repos)
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": "bad-fields", "repoUrl": url, "defaultBranch": "-x", "pipelineFilePath": "../etc/passwd"},
        headers=system.headers("member"),
    )
    assert r.status_code == 400
    assert {e["path"] for e in r.json()["errors"]} == {"defaultBranch", "pipelineFilePath"}


async def test_save_direct_commits_and_pushes_to_the_branch(system: System, tmp_path: Path, repos: Path) -> None:
    bare, url = bare_repo(repos)
    p = await create_git_pipeline(system, url)
    r = await save(system, p["id"], spec=SPEC, format="yaml", commitMessage="first version")
    assert r.status_code == 200, r.text
    body = r.json()
    head = git(bare, "rev-parse", "main")
    assert body["version"] == 2 and body["commitSha"] == head and body["branch"] == "main"
    assert body["prBranch"] is None
    assert yaml.safe_load(show(bare, "main:pipeline.yaml")) == SPEC
    assert git(bare, "log", "-1", "--format=%s", "main") == "first version"
    # the next save in JSON, expecting the head it read
    spec2 = {**SPEC, "variables": {"GREETING": "bonjour"}}
    r = await save(system, p["id"], spec=spec2, format="json", expectedHeadCommitSha=head)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 3
    assert json.loads(show(bare, "main:pipeline.yaml")) == spec2
    assert git(bare, "rev-parse", "main^") == head
    # the spec reads back from the branch head, with its commit
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}/spec", headers=system.headers("viewer"))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["spec"] == spec2 and got["format"] == "json" and got["version"] == 3
    assert got["commitSha"] == git(bare, "rev-parse", "main") and got["branch"] == "main"
    versions = (await system.client.get(f"/api/v1/pipelines/{p['id']}/versions", headers=system.headers())).json()
    assert [v["commitSha"] for v in versions] == [None, head, got["commitSha"]]


async def test_a_stale_expected_head_is_409_and_saves_nothing(system: System, tmp_path: Path, repos: Path) -> None:
    bare, url = bare_repo(repos, {"pipeline.yaml": yaml.safe_dump(SPEC)})
    old = git(bare, "rev-parse", "main")
    p = await create_git_pipeline(system, url)
    new = push_files(tmp_path, bare, {"README": "moved on\n"}, "someone else")
    r = await save(system, p["id"], spec=SPEC, format="yaml", expectedHeadCommitSha=old)
    assert r.status_code == 409, r.text
    assert r.json()["statusCode"] == 409 and r.json()["error"] == "Conflict"
    assert old in r.json()["message"]
    assert git(bare, "rev-parse", "main") == new
    pipeline = (await system.client.get(f"/api/v1/pipelines/{p['id']}", headers=system.headers())).json()
    assert pipeline["definitionVersion"] == 1
    # a malformed sha is bad input
    r = await save(system, p["id"], spec=SPEC, expectedHeadCommitSha="not-a-sha")
    assert r.status_code == 400
    # the current head is accepted
    r = await save(system, p["id"], spec=SPEC, expectedHeadCommitSha=new)
    assert r.status_code == 200, r.text


async def test_a_save_retried_with_its_idempotency_key_commits_once(
    system: System, tmp_path: Path, repos: Path
) -> None:
    bare, url = bare_repo(repos)
    p = await create_git_pipeline(system, url)
    headers = {**system.headers("member"), "Idempotency-Key": f"save-{uuid.uuid4()}"}
    answers = [
        await system.client.post(
            f"/api/v1/pipelines/{p['id']}/spec/save", json={"spec": SPEC, "format": "yaml"}, headers=headers
        )
        for _ in range(2)
    ]
    assert [r.status_code for r in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()
    assert git(bare, "rev-list", "--count", "main") == "1"


async def test_of_two_saves_expecting_the_same_head_one_wins(system: System, tmp_path: Path, repos: Path) -> None:
    bare, url = bare_repo(repos, {"pipeline.yaml": yaml.safe_dump(SPEC)})
    head = git(bare, "rev-parse", "main")
    p = await create_git_pipeline(system, url)
    specs = [{**SPEC, "variables": {"GREETING": g}} for g in ("one", "two")]
    answers = await asyncio.gather(*(save(system, p["id"], spec=s, expectedHeadCommitSha=head) for s in specs))
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    (winner,) = [r.json() for r in answers if r.status_code == 200]
    assert git(bare, "rev-parse", "main") == winner["commitSha"]
    assert git(bare, "rev-parse", "main^") == head


async def test_save_pr_pushes_a_new_branch_and_leaves_the_definition(
    system: System, tmp_path: Path, repos: Path
) -> None:
    bare, url = bare_repo(repos, {"pipeline.yaml": yaml.safe_dump(SPEC)})
    main_before = git(bare, "rev-parse", "main")
    p = await create_git_pipeline(system, url)
    spec2 = {**SPEC, "variables": {"GREETING": "hola"}}
    r = await save(system, p["id"], spec=spec2, format="yaml", saveMode="pr", commitMessage="please review")
    assert r.status_code == 200, r.text
    body = r.json()
    pr = body["prBranch"]
    assert pr.startswith(f"pipelines/{p['id']}/") and body["branch"] == "main"
    assert body["version"] == 1  # unchanged: the branch awaits review
    assert git(bare, "rev-parse", f"refs/heads/{pr}") == body["commitSha"]
    assert git(bare, "rev-parse", f"{pr}^") == main_before
    assert yaml.safe_load(show(bare, f"{pr}:pipeline.yaml")) == spec2
    assert git(bare, "rev-parse", "main") == main_before
    versions = (await system.client.get(f"/api/v1/pipelines/{p['id']}/versions", headers=system.headers())).json()
    assert len(versions) == 1


async def test_a_trigger_reads_the_spec_at_the_head_and_records_the_commit(
    system: System, tmp_path: Path, repos: Path
) -> None:
    bare, url = bare_repo(repos, {"ci/pipeline.yaml": yaml.safe_dump(SPEC)})
    first = git(bare, "rev-parse", "main")
    p = await create_git_pipeline(system, url, pipelineFilePath="ci/pipeline.yaml")
    run = await system.trigger(p["id"])
    assert run["trigger"]["commitSha"] == first and run["trigger"]["branch"] == "main"
    assert run["definitionVersion"] == 2
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done
    assert done["stageResults"][0]["output"] == "hello\n"
    # the same head again: no new version
    run = await system.trigger(p["id"])
    assert run["definitionVersion"] == 2 and run["trigger"]["commitSha"] == first
    await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    # a push made straight to the repository is picked up by the next trigger
    spec2 = {**SPEC, "variables": {"GREETING": "pushed"}}
    second = push_files(tmp_path, bare, {"ci/pipeline.yaml": json.dumps(spec2)}, "push from a laptop")
    run = await system.trigger(p["id"])
    assert run["trigger"]["commitSha"] == second and run["definitionVersion"] == 3
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["stageResults"][0]["output"] == "pushed\n"
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}/versions/3", headers=system.headers())
    assert r.json()["spec"] == spec2 and r.json()["commitSha"] == second and r.json()["format"] == "json"


async def test_an_unreadable_repo_or_invalid_spec_is_400_and_starts_nothing(
    system: System, tmp_path: Path, repos: Path
) -> None:
    # no such repository
    p = await create_git_pipeline(system, f"file://{repos}/missing.git")
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=system.headers("member"))
    assert r.status_code == 400, r.text
    assert "pipeline.yaml" in r.json()["message"]
    # no pipeline file on the branch
    bare, url = bare_repo(repos, {"README": "hi\n"})
    p = await create_git_pipeline(system, url)
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=system.headers("member"))
    assert r.status_code == 400 and "does not exist" in r.json()["message"]
    # an invalid spec, with the path of each error
    push_files(tmp_path, bare, {"pipeline.yaml": "stages:\n  - type: script\n    config: {}\n"}, "broken")
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=system.headers("member"))
    assert r.status_code == 400
    assert "stages[0].config.command" in r.json()["message"]
    # not YAML at all
    push_files(tmp_path, bare, {"pipeline.yaml": "stages: [\n"}, "worse")
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=system.headers("member"))
    assert r.status_code == 400 and "not a valid YAML pipeline spec at pipeline.yaml" in r.json()["message"]
    runs = (await system.client.get(f"/api/v1/pipelines/{p['id']}/runs", headers=system.headers())).json()
    assert runs == []
