"""Git-backed pipelines without Git: the Git fields of the Pipeline decider, their validation, old
events without them, the spec file formats, and the application layer's Git sync and spec save
through its Git port (a fake repository in memory)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain import events as ev
from domain import pipeline
from domain.pipeline import (
    CreatePipeline,
    PipelineCreated,
    PipelineSpecSaved,
    PipelineUpdated,
    SaveSpec,
    UpdatePipeline,
    check_git_source,
    pr_branch_name,
)
from domain.stages import Stage
from infra.app.commands import Commands, ConcurrencyConflict
from infra.app.ports import GitRepository
from infra.git.files import FileAtHead, GitConflict, GitCredential, Pushed
from infra.git.repos import GitError, parse_spec, render_spec
from infra.store.memory import InMemoryEventStore
from tests.unit.decider_dsl import Spec

given = Spec(pipeline).given
T0 = datetime(2026, 3, 16, 12, 0, 0, tzinfo=UTC)
URL = "file:///srv/repos/app.git"
TEST = Stage(id="test", name="test", type="script", order=1, config={"command": "pytest -q"})
SPEC: dict[str, Any] = {"stages": [{"id": "test", "type": "script", "config": {"command": "pytest -q"}}]}


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


CREATED = PipelineCreated(
    pipeline_id="p1",
    name="app",
    description=None,
    stages=(TEST,),
    organization_id="org1",
    created_by="alice",
    at=T0,
    repo_url=URL,
    pipeline_file_path="ci/pipeline.yaml",
)


def test_create_records_the_repository_branch_and_file() -> None:
    command = CreatePipeline(
        pipeline_id="p1",
        name="app",
        description=None,
        stages=(TEST,),
        organization_id="org1",
        by="alice",
        at=T0,
        repo_url=URL,
        pipeline_file_path="ci/pipeline.yaml",
    )
    state = given().when(command).then(CREATED)
    assert state.git_backed
    assert (state.repo_url, state.default_branch, state.pipeline_file_path) == (URL, "main", "ci/pipeline.yaml")


def test_patch_changes_only_the_git_fields_it_names_and_put_can_detach() -> None:
    state = (
        given(CREATED)
        .when(UpdatePipeline(default_branch="trunk", by="bob", at=t(1)))
        .then(
            PipelineUpdated(
                name="app",
                description=None,
                stages=(TEST,),
                updated_by="bob",
                at=t(1),
                definition_version=1,
                repo_url=URL,
                default_branch="trunk",
                pipeline_file_path="ci/pipeline.yaml",
            )
        )
    )
    assert state.default_branch == "trunk" and state.repo_url == URL
    detached = given(CREATED).when(UpdatePipeline(set_repo_url=True, repo_url=None, by="bob", at=t(1))).decide()
    assert isinstance(detached[0], PipelineUpdated) and detached[0].repo_url is None


def test_a_sync_from_git_saves_only_a_changed_spec_and_records_the_commit() -> None:
    save = SaveSpec(
        spec=SPEC, stages=(TEST,), format="yaml", commit_sha="a" * 40, only_if_changed=True, by="x", at=t(1)
    )
    state = (
        given(CREATED)
        .when(save)
        .then(
            PipelineSpecSaved(
                spec=SPEC,
                stages=(TEST,),
                format="yaml",
                saved_by="x",
                at=t(1),
                definition_version=2,
                commit_sha="a" * 40,
            )
        )
    )
    assert state.version(2) is not None and state.version(2).commit_sha == "a" * 40  # type: ignore[union-attr]
    saved = PipelineSpecSaved(spec=SPEC, stages=(TEST,), saved_by="x", at=t(1), definition_version=2)
    again = SaveSpec(spec=SPEC, stages=(TEST,), commit_sha="b" * 40, only_if_changed=True, by="x", at=t(2))
    given(CREATED, saved).when(again).then_nothing()
    # an explicit save is always a new version
    explicit = given(CREATED, saved).when(SaveSpec(spec=SPEC, stages=(TEST,), by="x", at=t(2))).decide()
    assert [e.definition_version for e in explicit] == [3]  # type: ignore[union-attr]


def test_events_stored_before_git_fields_still_decode() -> None:
    old = (
        b'{"type":"pipeline_created","pipeline_id":"p1","name":"app","description":null,"stages":[],'
        b'"organization_id":null,"created_by":"alice","at":"2026-03-16T12:00:00Z","definition_version":1}'
    )
    event = ev.decode(old)
    assert isinstance(event, PipelineCreated)
    state = pipeline.evolve(pipeline.initial_state, event)
    assert state.repo_url is None and not state.git_backed
    assert (state.default_branch, state.pipeline_file_path) == ("main", "pipeline.yaml")
    assert ev.decode(ev.encode(CREATED)) == CREATED


@pytest.mark.parametrize(
    "url",
    [
        "file:///srv/repos/app.git",
        "/srv/repos/app.git",
        "https://github.com/acme/app.git",
        "ssh://git@github.com:22/acme/app.git",
        "git@github.com:acme/app.git",
    ],
)
def test_allowed_repo_urls(url: str) -> None:
    assert check_git_source(url, None, None) == {}


@pytest.mark.parametrize(
    "url",
    [
        "ext::sh -c touch% /tmp/x",
        "http://github.com/acme/app.git",
        "ftp://example.com/app.git",
        "-uploadpack=touch /tmp/x",
        "--upload-pack=x",
        "relative/app.git",
        "file://relative/app.git",
        "file:///srv/../etc",
        "https://user:secret@github.com/acme/app.git",
        "https://ghp_token@github.com/acme/app.git",
        "git@github.com:acme/app.git --upload-pack=x",
        "https://github.com/acme/app.git\n",
        "",
        42,
    ],
)
def test_refused_repo_urls_name_the_field(url: object) -> None:
    assert list(check_git_source(url, None, None)) == ["repoUrl"]


@pytest.mark.parametrize("branch", ["main", "release/1.2", "feature_x-y", "v1+build"])
def test_allowed_branches(branch: str) -> None:
    assert check_git_source(None, branch, None) == {}


@pytest.mark.parametrize("branch", ["", "-f", "/main", "main/", "a..b", "a//b", ".hidden", "x.lock", "a b", "a@{1}"])
def test_refused_branches(branch: str) -> None:
    assert list(check_git_source(None, branch, None)) == ["defaultBranch"]


@pytest.mark.parametrize("path", ["pipeline.yaml", "ci/pipeline.yml", ".ci/p.json", "a b/c.yaml"])
def test_allowed_file_paths(path: str) -> None:
    assert check_git_source(None, None, path) == {}


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x.yaml", "a/../../x", ".git/config", "-x", "a//b", "dir/"])
def test_refused_file_paths(path: str) -> None:
    assert list(check_git_source(None, None, path)) == ["pipelineFilePath"]


def test_pr_branches_are_named_after_the_pipeline() -> None:
    name = pr_branch_name("p1", "abc123")
    assert name == "pipelines/p1/abc123"
    assert check_git_source(None, name, None) == {}


@pytest.mark.parametrize("fmt", ["json", "yaml", "yml"])
def test_a_rendered_spec_parses_back(fmt: str) -> None:
    spec = {"variables": {"A": "1"}, "stages": [{"type": "script", "config": {"command": "echo 'ünï'"}}]}
    text = render_spec(spec, fmt)
    parsed, found = parse_spec(text, "pipeline.yaml")
    assert parsed == spec
    assert found == ("json" if fmt == "json" else "yaml")


def test_a_file_that_is_neither_json_nor_yaml_is_a_git_error() -> None:
    with pytest.raises(GitError, match=r"^not a valid YAML pipeline spec at pipeline.yaml \(line 2\)$"):
        parse_spec("stages: [\n", "pipeline.yaml")
    with pytest.raises(GitError, match=r"^not a valid JSON pipeline spec at pipeline.json \(line 1\)$"):
        parse_spec("{oops", "pipeline.json")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[project]\nname = "hunter2"\n', "pyproject.toml"),
        ("all:\n\techo hunter2\n", "Makefile"),
        ("password: hunter2\nuser: admin\n", "config.yaml"),
        ('{"password": "hunter2"}', "secrets.json"),
        ("hunter2", "token.txt"),
        ("on: push\njobs: {build: {runs-on: hunter2}}\n", ".github/workflows/ci.yml"),
    ],
)
def test_a_file_that_is_not_a_pipeline_spec_is_named_never_quoted(text: str, path: str) -> None:
    with pytest.raises(GitError) as caught:
        parse_spec(text, path)
    message = str(caught.value)
    assert message.startswith("not a valid ") and f"pipeline spec at {path}" in message
    assert "hunter2" not in message and "password" not in message and "name" not in message


# ---- the Git sync and the spec save, through the Git port ---------------------------------


@dataclass
class FakeRepo:
    """A GitRepository in memory: branches of files, a commit per push; `conflict` refuses the next
    push as if the branch had moved."""

    branches: dict[str, dict[str, str]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    reads: int = 0
    commits: int = 0
    conflict: bool = False

    def push(self, branch: str, path: str, content: str) -> str:
        files = dict(self.branches.get(branch, {}))
        files[path] = content
        self.branches[branch] = files
        self.commits += 1
        self.heads[branch] = f"{self.commits:040x}"
        return self.heads[branch]

    async def read_file(
        self, url: str, branch: str, path: str, *, credential: GitCredential | None = None
    ) -> FileAtHead:
        self.reads += 1
        if path not in self.branches.get(branch, {}):
            raise GitError(f"{path} does not exist on branch {branch!r}")
        return FileAtHead(content=self.branches[branch][path], commit_sha=self.heads[branch], branch=branch)

    async def commit_file(
        self,
        url: str,
        branch: str,
        path: str,
        content: str,
        *,
        message: str,
        author: str,
        expected_head: str | None = None,
        push_to: str | None = None,
        credential: GitCredential | None = None,
    ) -> Pushed:
        parent = self.heads.get(branch)
        if self.conflict or (expected_head is not None and expected_head != parent):
            self.conflict = False
            raise GitConflict(f"branch {branch!r} moved")
        target = push_to or branch
        if push_to is not None:
            self.branches[push_to] = dict(self.branches.get(branch, {}))
        return Pushed(commit_sha=self.push(target, path, content), branch=target, parent_sha=parent)


def git_commands(repo: GitRepository) -> Commands:
    return Commands(InMemoryEventStore(), git=repo)


async def git_pipeline(commands: Commands) -> pipeline.PipelineState:
    return await commands.create_pipeline(name="app", description=None, stages=[], org="org1", by="alice", repo_url=URL)


async def test_a_trigger_syncs_the_definition_from_the_branch_head_through_the_port() -> None:
    repo = FakeRepo()
    head = repo.push("main", pipeline.DEFAULT_PIPELINE_FILE, json.dumps(SPEC))
    commands = git_commands(repo)
    created = await git_pipeline(commands)

    run, _ = await commands.trigger(created, by="bob")

    assert (run.trigger["commitSha"], run.trigger["branch"]) == (head, "main")
    synced, _ = await commands.load_pipeline(created.pipeline_id)
    assert synced.definition_version == created.definition_version + 1
    assert [s.id for s in synced.stages] == ["test"] and run.definition_version == synced.definition_version
    # An unchanged head records no new version.
    await commands.trigger(synced, by="bob")
    assert (await commands.load_pipeline(created.pipeline_id))[0].definition_version == synced.definition_version
    assert repo.reads == 2


async def test_a_spec_save_commits_through_the_port_and_records_the_commit() -> None:
    repo = FakeRepo()
    repo.push("main", pipeline.DEFAULT_PIPELINE_FILE, json.dumps(SPEC))
    commands = git_commands(repo)
    created = await git_pipeline(commands)

    saved = await commands.save_spec(created.pipeline_id, spec=SPEC, format="yaml", commit_message=None, by="bob")

    assert saved.commit_sha == repo.heads["main"] and saved.branch == "main"
    assert parse_spec(repo.branches["main"][pipeline.DEFAULT_PIPELINE_FILE], "x.yaml") == (SPEC, "yaml")
    assert saved.state.definition_version == created.definition_version + 1


async def test_a_branch_that_moved_is_a_conflict_and_records_nothing() -> None:
    repo = FakeRepo()
    repo.push("main", pipeline.DEFAULT_PIPELINE_FILE, json.dumps(SPEC))
    commands = git_commands(repo)
    created = await git_pipeline(commands)
    repo.conflict = True

    with pytest.raises(ConcurrencyConflict):
        await commands.save_spec(created.pipeline_id, spec=SPEC, format="json", commit_message=None, by="bob")

    assert (await commands.load_pipeline(created.pipeline_id))[0].definition_version == created.definition_version
