"""The Pipeline aggregate as a Decider: pure `decide` and `evolve`."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

import msgspec

from domain.errors import NotFound, Refused
from domain.stages import Stage, stage_to_dict

SpecFormat = Literal["json", "yaml", "yml"]
DEFAULT_BRANCH = "main"
DEFAULT_PIPELINE_FILE = "pipeline.yaml"


def stages_spec(stages: tuple[Stage, ...]) -> dict[str, Any]:
    """The spec of a pipeline whose stages came from the API reference's `stages` field."""
    return {"stages": [stage_to_dict(s) for s in stages]}


# ---- Git-backed pipelines ------------------------------------------------------------------

_SCP_LIKE = re.compile(r"^git@[A-Za-z0-9.-]+:[A-Za-z0-9._~/-]+$")
_URL_HOST = re.compile(r"^(https|ssh)://([^/@\s]+@)?[A-Za-z0-9.-]+(:[0-9]{1,5})?/[^\s]*$")
_REF_CHARS = re.compile(r"^[A-Za-z0-9._/+-]+$")
_PATH_CHARS = re.compile(r"^[A-Za-z0-9._/+ -]+$")


def check_git_source(repo_url: object, branch: object, path: object) -> dict[str, str]:
    """What is wrong with a pipeline's Git fields, by field name (empty when they are fine).
    None skips a field. Repository URLs are `file://` URLs or absolute paths (local
    repositories), `https://`, `ssh://` or `git@host:path`; never other transports (`ext::`
    runs commands), options (`-...`) or credentials inside the URL."""
    errors: dict[str, str] = {}
    if repo_url is not None:
        problem = _url_problem(repo_url)
        if problem:
            errors["repoUrl"] = problem
    if branch is not None and not _valid_ref(branch):
        errors["defaultBranch"] = (
            "must be a valid branch name (letters, digits, `._/+-`; no `..`, not starting with `-`)"
        )
    if path is not None and not _valid_path(path):
        errors["pipelineFilePath"] = (
            "must be a relative path inside the repository (no `..`, no leading `/` or `-`, not under .git)"
        )
    return errors


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str) or not url or len(url) > 2000:
        return "must be a string of 1-2000 characters"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "must not contain whitespace or control characters"
    if url.startswith("file://"):
        rest = url.removeprefix("file://")
        if not rest.startswith("/") or ".." in rest.split("/"):
            return "a file:// URL needs an absolute path (file:///srv/repos/app.git)"
        return None
    if url.startswith("/"):
        return None if ".." not in url.split("/") else "an absolute path without `..`"
    if url.startswith(("https://", "ssh://")):
        match = _URL_HOST.match(url)
        if match is None:
            return "is not a valid https:// or ssh:// repository URL"
        if url.startswith("https://") and match.group(2):
            return "must not carry credentials; give the server access to the repository instead"
        return None
    if url.startswith("git@"):
        return None if _SCP_LIKE.match(url) else "is not a valid git@host:path repository URL"
    return "must be a file://, https:// or ssh:// URL, git@host:path, or an absolute path"


def _valid_ref(name: object) -> bool:
    if not isinstance(name, str) or not 1 <= len(name) <= 200 or not _REF_CHARS.match(name):
        return False
    if name.startswith(("-", "/")) or name.endswith(("/", ".", ".lock")) or ".." in name or "//" in name:
        return False
    return not any(part.startswith(".") for part in name.split("/"))


def _valid_path(path: object) -> bool:
    if not isinstance(path, str) or not 1 <= len(path) <= 500 or not _PATH_CHARS.match(path):
        return False
    if path.startswith(("/", "-")) or path.endswith("/"):
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..", ".git") for p in parts)


def pr_branch_name(pipeline_id: str, short_id: str) -> str:
    """The branch a save in `pr` mode pushes, awaiting review."""
    return f"pipelines/{pipeline_id}/{short_id}"


# ---- commands ------------------------------------------------------------------------------


class CreatePipeline(msgspec.Struct, frozen=True, kw_only=True, tag="create_pipeline"):
    pipeline_id: str
    name: str
    description: str | None
    stages: tuple[Stage, ...]
    organization_id: str | None
    by: str
    at: datetime
    repo_url: str | None = None
    default_branch: str = DEFAULT_BRANCH
    pipeline_file_path: str = DEFAULT_PIPELINE_FILE


class UpdatePipeline(msgspec.Struct, frozen=True, kw_only=True, tag="update_pipeline"):
    """PATCH sends only some fields (None = unchanged); PUT sends all of them."""

    name: str | None = None
    description: str | None = None
    set_description: bool = False
    stages: tuple[Stage, ...] | None = None
    repo_url: str | None = None
    set_repo_url: bool = False
    default_branch: str | None = None
    pipeline_file_path: str | None = None
    by: str
    at: datetime


class DeletePipeline(msgspec.Struct, frozen=True, kw_only=True, tag="delete_pipeline"):
    by: str
    at: datetime


class SaveSpec(msgspec.Struct, frozen=True, kw_only=True, tag="save_spec"):
    """Save a validated spec as the pipeline's next definition version."""

    spec: dict[str, Any]
    stages: tuple[Stage, ...]
    format: SpecFormat = "json"
    commit_message: str | None = None
    # Git-backed: the commit that holds this spec.
    commit_sha: str | None = None
    # Save only when the spec differs from the current definition's (a trigger syncing from Git).
    only_if_changed: bool = False
    by: str
    at: datetime


PipelineCommand = CreatePipeline | UpdatePipeline | DeletePipeline | SaveSpec

# ---- events --------------------------------------------------------------------------------


class PipelineCreated(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_created"):
    pipeline_id: str
    name: str
    description: str | None
    stages: tuple[Stage, ...]
    organization_id: str | None
    created_by: str
    at: datetime
    definition_version: int = 1
    repo_url: str | None = None
    default_branch: str = DEFAULT_BRANCH
    pipeline_file_path: str = DEFAULT_PIPELINE_FILE


class PipelineUpdated(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_updated"):
    """Carries the pipeline's new values in full, so a fold needs no merging."""

    name: str
    description: str | None
    stages: tuple[Stage, ...]
    updated_by: str
    at: datetime
    definition_version: int
    repo_url: str | None = None
    default_branch: str = DEFAULT_BRANCH
    pipeline_file_path: str = DEFAULT_PIPELINE_FILE


class PipelineDeleted(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_deleted"):
    deleted_by: str
    at: datetime


class PipelineSpecSaved(msgspec.Struct, frozen=True, kw_only=True, tag="pipeline_spec_saved"):
    spec: dict[str, Any]
    stages: tuple[Stage, ...]
    format: SpecFormat = "json"
    commit_message: str | None = None
    saved_by: str
    at: datetime
    definition_version: int
    commit_sha: str | None = None


PipelineEvent = PipelineCreated | PipelineUpdated | PipelineDeleted | PipelineSpecSaved

# ---- state ---------------------------------------------------------------------------------


class DefinitionVersion(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    spec: dict[str, Any]
    format: SpecFormat
    saved_by: str
    saved_at: datetime
    commit_message: str | None = None
    commit_sha: str | None = None


class PipelineState(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool = False
    deleted: bool = False
    pipeline_id: str = ""
    name: str = ""
    description: str | None = None
    stages: tuple[Stage, ...] = ()
    organization_id: str | None = None
    created_by: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    definition_version: int = 0
    variables: dict[str, str] = msgspec.field(default_factory=dict)
    triggers: tuple[dict[str, Any], ...] = ()
    spec_format: SpecFormat = "json"
    # Every definition version, kept forever.
    versions: tuple[DefinitionVersion, ...] = ()
    # Git-backed when repo_url is set: the spec lives in pipeline_file_path on default_branch.
    repo_url: str | None = None
    default_branch: str = DEFAULT_BRANCH
    pipeline_file_path: str = DEFAULT_PIPELINE_FILE

    @property
    def live(self) -> bool:
        return self.exists and not self.deleted

    def version(self, number: int) -> DefinitionVersion | None:
        return next((v for v in self.versions if v.version == number), None)

    @property
    def git_backed(self) -> bool:
        return self.repo_url is not None

    @property
    def current_spec(self) -> dict[str, Any] | None:
        current = self.version(self.definition_version)
        return None if current is None else current.spec


initial_state = PipelineState()


def decide(command: PipelineCommand, state: PipelineState) -> list[PipelineEvent]:
    match command:
        case CreatePipeline():
            if state.exists:
                raise Refused(f"pipeline {command.pipeline_id} already exists")
            return [
                PipelineCreated(
                    pipeline_id=command.pipeline_id,
                    name=command.name,
                    description=command.description,
                    stages=command.stages,
                    organization_id=command.organization_id,
                    created_by=command.by,
                    at=command.at,
                    repo_url=command.repo_url,
                    default_branch=command.default_branch,
                    pipeline_file_path=command.pipeline_file_path,
                )
            ]
        case UpdatePipeline():
            if not state.live:
                raise NotFound("pipeline not found")
            stages = state.stages if command.stages is None else command.stages
            description = command.description if command.set_description else state.description
            name = state.name if command.name is None else command.name
            version = state.definition_version + (1 if stages != state.stages else 0)
            return [
                PipelineUpdated(
                    name=name,
                    description=description,
                    stages=stages,
                    updated_by=command.by,
                    at=command.at,
                    definition_version=version,
                    repo_url=command.repo_url if command.set_repo_url else state.repo_url,
                    default_branch=command.default_branch or state.default_branch,
                    pipeline_file_path=command.pipeline_file_path or state.pipeline_file_path,
                )
            ]
        case DeletePipeline():
            if not state.live:
                raise NotFound("pipeline not found")
            return [PipelineDeleted(deleted_by=command.by, at=command.at)]
        case SaveSpec():
            if not state.live:
                raise NotFound("pipeline not found")
            if command.only_if_changed and command.spec == state.current_spec:
                return []
            return [
                PipelineSpecSaved(
                    spec=command.spec,
                    stages=command.stages,
                    format=command.format,
                    commit_message=command.commit_message,
                    saved_by=command.by,
                    at=command.at,
                    definition_version=state.definition_version + 1,
                    commit_sha=command.commit_sha,
                )
            ]


def evolve(state: PipelineState, event: PipelineEvent) -> PipelineState:
    match event:
        case PipelineCreated():
            first = DefinitionVersion(
                version=event.definition_version,
                spec=stages_spec(event.stages),
                format="json",
                saved_by=event.created_by,
                saved_at=event.at,
            )
            return PipelineState(
                versions=(first,),
                exists=True,
                pipeline_id=event.pipeline_id,
                name=event.name,
                description=event.description,
                stages=event.stages,
                organization_id=event.organization_id,
                created_by=event.created_by,
                created_at=event.at,
                updated_at=event.at,
                definition_version=event.definition_version,
                repo_url=event.repo_url,
                default_branch=event.default_branch,
                pipeline_file_path=event.pipeline_file_path,
            )
        case PipelineUpdated():
            versions = state.versions
            if event.definition_version != state.definition_version:
                spec = {**(versions[-1].spec if versions else {}), **stages_spec(event.stages)}
                spec.pop("jobs", None)
                versions = (
                    *versions,
                    DefinitionVersion(
                        version=event.definition_version,
                        spec=spec,
                        format=state.spec_format,
                        saved_by=event.updated_by,
                        saved_at=event.at,
                    ),
                )
            return msgspec.structs.replace(
                state,
                name=event.name,
                description=event.description,
                stages=event.stages,
                updated_at=event.at,
                definition_version=event.definition_version,
                versions=versions,
                repo_url=event.repo_url,
                default_branch=event.default_branch,
                pipeline_file_path=event.pipeline_file_path,
            )
        case PipelineSpecSaved():
            variables = event.spec.get("variables") or {}
            return msgspec.structs.replace(
                state,
                stages=event.stages,
                variables=dict(variables),
                triggers=tuple(event.spec.get("triggers") or ()),
                spec_format=event.format,
                updated_at=event.at,
                definition_version=event.definition_version,
                versions=(
                    *state.versions,
                    DefinitionVersion(
                        version=event.definition_version,
                        spec=event.spec,
                        format=event.format,
                        saved_by=event.saved_by,
                        saved_at=event.at,
                        commit_message=event.commit_message,
                        commit_sha=event.commit_sha,
                    ),
                ),
            )
        case PipelineDeleted():
            return msgspec.structs.replace(state, deleted=True, updated_at=event.at)
