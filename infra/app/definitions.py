"""A pipeline's definition: save a spec as its next version (committed to its Git repository first
when it has one), and sync the definition from the repository's branch head, through the Git port."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

from domain import pipeline as pl
from domain.errors import Invalid, NotFound
from domain.spec import stages_from_spec, validate_spec
from infra.app.context import AppContext
from infra.app.pipelines import PipelineCommands, Visible, everyone
from infra.app.ports import GitCredentials, GitRepository
from infra.app.retry import ConcurrencyConflict
from infra.app.specs import installed_plugins
from infra.git.files import FileAtHead, GitConflict, GitCredential, GitError, parse_spec, render_spec


@dataclass(frozen=True)
class SavedSpec:
    """What a spec save did: the pipeline after it, and for a Git-backed pipeline the commit
    (`branch` is the pipeline's branch; `pr_branch` the new branch of a `pr` save, whose
    definition is unchanged until the branch is merged and the pipeline triggered)."""

    state: pl.PipelineState
    commit_sha: str | None = None
    branch: str | None = None
    pr_branch: str | None = None


def _typed_stages(spec: dict[str, Any], new_id: Callable[[], str]) -> tuple[Any, ...]:
    typed = [s for s in spec.get("stages", []) if isinstance(s, dict) and "jobs" not in s]
    return stages_from_spec(spec, [new_id() for _ in typed])


class Definitions:
    def __init__(
        self,
        ctx: AppContext,
        pipelines: PipelineCommands,
        git: GitRepository,
        credentials: GitCredentials | None = None,
    ) -> None:
        self.ctx = ctx
        self.pipelines = pipelines
        self.git = git
        self.credentials = credentials

    async def _credential(self, state: pl.PipelineState) -> GitCredential | None:
        """The credential registered for the pipeline or its organization: Git never falls back
        on the service's own keys or agent."""
        if self.credentials is None:
            return None
        return await self.credentials.for_pipeline(state.organization_id, state.pipeline_id)

    async def save_spec(
        self,
        pipeline_id: str,
        *,
        spec: dict[str, Any],
        format: pl.SpecFormat,
        commit_message: str | None,
        by: str,
        plugins: frozenset[str] | None = None,
        visible: Visible = everyone,
        save_mode: Literal["direct", "pr"] = "direct",
        expected_head_commit_sha: str | None = None,
    ) -> SavedSpec:
        """Validate a spec and save it as the pipeline's next definition version.

        A Git-backed pipeline's spec is first committed (as `format`) to its file: pushed to its
        branch (`direct`; then recorded as the next version with the commit), or to a new branch
        awaiting review (`pr`; the definition is unchanged). A branch head that is not
        `expected_head_commit_sha`, or that moves while we push, is a ConcurrencyConflict."""
        errors, _ = validate_spec(spec, zone=ZoneInfo, plugins=plugins, limits=self.ctx.limits)
        if errors:
            raise Invalid({f"spec.{e.path}" if e.path != "spec" else "spec": e.message for e in errors})
        stages = _typed_stages(spec, self.ctx.new_id)
        state, _ = await self.pipelines.load(pipeline_id)
        if not state.live or not visible(state):
            raise NotFound("pipeline not found")
        pushed = None
        if state.repo_url is not None:
            path = state.pipeline_file_path
            short = self.ctx.new_id().replace("-", "")[:12]
            pr_branch = pl.pr_branch_name(pipeline_id, short) if save_mode == "pr" else None
            try:
                pushed = await self.git.commit_file(
                    state.repo_url,
                    state.default_branch,
                    path,
                    render_spec(spec, format),
                    message=commit_message or f"Update {path}",
                    author=by,
                    expected_head=expected_head_commit_sha,
                    push_to=pr_branch,
                    credential=await self._credential(state),
                )
            except GitConflict as exc:
                raise ConcurrencyConflict(str(exc)) from exc
            except GitError as exc:
                raise Invalid({"repoUrl": str(exc)}) from exc
            if pr_branch is not None:
                return SavedSpec(state, commit_sha=pushed.commit_sha, branch=state.default_branch, pr_branch=pr_branch)
        elif save_mode == "pr" or expected_head_commit_sha is not None:
            raise Invalid({"saveMode": "this pipeline is not backed by a Git repository; use saveMode direct"})
        commit_sha = pushed.commit_sha if pushed is not None else None
        saved = await self.pipelines.command(
            pipeline_id,
            lambda at: pl.SaveSpec(
                spec=spec,
                stages=stages,
                format=format,
                commit_message=commit_message,
                commit_sha=commit_sha,
                by=by,
                at=at,
            ),
            visible=visible,
        )
        return SavedSpec(saved, commit_sha=commit_sha, branch=state.default_branch if pushed is not None else None)

    async def read_git_spec(self, pipeline: pl.PipelineState) -> tuple[dict[str, Any], pl.SpecFormat, FileAtHead]:
        """The spec in a Git-backed pipeline's file at its branch head (validated), its format,
        and the file with its commit. Invalid (400) when it cannot be read or is not valid."""
        assert pipeline.repo_url is not None
        path = pipeline.pipeline_file_path
        try:
            head = await self.git.read_file(
                pipeline.repo_url, pipeline.default_branch, path, credential=await self._credential(pipeline)
            )
        except GitError as exc:
            raise Invalid({"repoUrl": f"cannot read {path} from branch {pipeline.default_branch!r}: {exc}"}) from exc
        try:
            spec, fmt = parse_spec(head.content, path)
        except GitError as exc:
            raise Invalid({"pipelineFilePath": str(exc)}) from exc
        where = f"{path}@{head.commit_sha[:12]}"
        errors, _ = validate_spec(spec, zone=ZoneInfo, plugins=installed_plugins(), limits=self.ctx.limits)
        if errors:
            raise Invalid({f"{where}: {e.path}": e.message for e in errors})
        assert isinstance(spec, dict)
        return spec, fmt, head

    async def sync_from_git(self, pipeline: pl.PipelineState, *, by: str) -> tuple[pl.PipelineState, FileAtHead]:
        """Read a Git-backed pipeline's spec at its branch head; when it differs from the current
        definition, record it as the next definition version (with its commit) first."""
        spec, fmt, head = await self.read_git_spec(pipeline)
        stages = _typed_stages(spec, self.ctx.new_id)
        state = await self.pipelines.command(
            pipeline.pipeline_id,
            lambda at: pl.SaveSpec(
                spec=spec,
                stages=stages,
                format=fmt,
                commit_sha=head.commit_sha,
                only_if_changed=True,
                by=by,
                at=at,
            ),
            visible=lambda s: s.organization_id == pipeline.organization_id,
        )
        return state, head
