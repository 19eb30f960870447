"""Saving a pipeline's spec: check it, commit it to the pipeline's Git repository when it has one,
and record it as the next definition version (load, decide, append; again on a lost race)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

from domain import events as ev
from domain import pipeline as pl
from domain.errors import Invalid, NotFound
from domain.spec import stages_from_spec, validate_spec
from infra.app.commands import ConcurrencyConflict
from infra.git.repos import GitConflict, GitError, Pushed, render_spec
from infra.store.records import EventStore, NewEvent, WrongExpectedVersion

PLUGIN_GROUP = "pipelines.steps"
SaveMode = Literal["direct", "pr"]
_COMMIT_SHA = re.compile(r"^[0-9a-fA-F]{7,64}$")


def installed_plugins() -> frozenset[str]:
    """Step kinds that `uses` may name: entry points of the group `pipelines.steps`."""
    return frozenset(e.name for e in entry_points(group=PLUGIN_GROUP))


class SpecRepos(Protocol):
    """The Git side of a save (infra.git.repos.GitRepos, or a fake)."""

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
    ) -> Pushed: ...


@dataclass(frozen=True)
class SavedSpec:
    """What a spec save did: the pipeline after it, and for a Git-backed pipeline the commit
    (`branch` is the pipeline's branch; `pr_branch` the new branch of a `pr` save, whose
    definition is unchanged until the branch is merged and the pipeline triggered)."""

    state: pl.PipelineState
    commit_sha: str | None = None
    branch: str | None = None
    pr_branch: str | None = None


def check_save(state: pl.PipelineState, spec: Any, save_mode: SaveMode, expected_head_commit_sha: str | None) -> None:
    """What a save request must satisfy before anything else is looked at (Invalid otherwise)."""
    if state.repo_url is None and (save_mode == "pr" or expected_head_commit_sha is not None):
        raise Invalid({"saveMode": "this pipeline is not backed by a Git repository; use saveMode direct"})
    if expected_head_commit_sha is not None and not _COMMIT_SHA.match(expected_head_commit_sha):
        raise Invalid({"expectedHeadCommitSha": "must be a commit sha (7-64 hex digits)"})
    if not isinstance(spec, dict):
        raise Invalid({"spec": "must be an object with `stages` or `jobs`"})


class SpecSaver:
    def __init__(
        self,
        store: EventStore,
        git: SpecRepos,
        *,
        now: Callable[[], datetime],
        new_id: Callable[[], str],
        on_append: Callable[[], None] = lambda: None,
        retries: int = 8,
    ) -> None:
        self._store = store
        self._git = git
        self._now = now
        self._new_id = new_id
        self._on_append = on_append
        self._retries = retries

    async def _load(self, pipeline_id: str) -> tuple[pl.PipelineState, int]:
        state, version = pl.initial_state, 0
        for rec in await self._store.read_stream(ev.pipeline_stream(pipeline_id)):
            e = rec.event
            assert ev.is_pipeline_event(e)
            state, version = pl.evolve(state, e), rec.stream_version
        return state, version

    async def save(
        self,
        pipeline_id: str,
        *,
        spec: dict[str, Any],
        format: pl.SpecFormat,
        commit_message: str | None,
        by: str,
        visible: Callable[[pl.PipelineState], bool],
        save_mode: SaveMode = "direct",
        expected_head_commit_sha: str | None = None,
    ) -> SavedSpec:
        """Validate a spec and save it as the pipeline's next definition version.

        A Git-backed pipeline's spec is first committed (as `format`) to its file: pushed to its
        branch (`direct`; then recorded as the next version with the commit), or to a new branch
        awaiting review (`pr`; the definition is unchanged). A branch head that is not
        `expected_head_commit_sha`, or that moves while we push, is a ConcurrencyConflict."""
        errors, _ = validate_spec(spec, plugins=installed_plugins())
        if errors:
            raise Invalid({f"spec.{e.path}" if e.path != "spec" else "spec": e.message for e in errors})
        typed = [s for s in spec.get("stages", []) if isinstance(s, dict) and "jobs" not in s]
        stages = stages_from_spec(spec, [self._new_id() for _ in typed])
        state, _ = await self._load(pipeline_id)
        if not state.live or not visible(state):
            raise NotFound("pipeline not found")
        check_save(state, spec, save_mode, expected_head_commit_sha)
        pushed = None
        if state.repo_url is not None:
            pr_branch = None
            if save_mode == "pr":
                pr_branch = pl.pr_branch_name(pipeline_id, self._new_id().replace("-", "")[:12])
            pushed = await self._commit(state, spec, format, commit_message, by, expected_head_commit_sha, pr_branch)
            if pr_branch is not None:
                return SavedSpec(state, commit_sha=pushed.commit_sha, branch=state.default_branch, pr_branch=pr_branch)
        commit_sha = pushed.commit_sha if pushed is not None else None
        for _ in range(self._retries):
            state, version = await self._load(pipeline_id)
            if not state.live or not visible(state):
                raise NotFound("pipeline not found")
            cmd = pl.SaveSpec(
                spec=spec,
                stages=stages,
                format=format,
                commit_message=commit_message,
                commit_sha=commit_sha,
                by=by,
                at=self._now(),
            )
            new = pl.decide(cmd, state)
            if not new:
                break
            try:
                await self._store.append(
                    ev.pipeline_stream(pipeline_id),
                    [NewEvent(self._new_id(), e, org=state.organization_id, pipeline_id=pipeline_id) for e in new],
                    version,
                )
            except WrongExpectedVersion:
                continue
            self._on_append()
            for e in new:
                state = pl.evolve(state, e)
            break
        else:
            raise ConcurrencyConflict("pipeline changed concurrently; try again")
        return SavedSpec(state, commit_sha=commit_sha, branch=state.default_branch if pushed else None)

    async def _commit(
        self,
        state: pl.PipelineState,
        spec: dict[str, Any],
        format: pl.SpecFormat,
        commit_message: str | None,
        by: str,
        expected_head: str | None,
        pr_branch: str | None,
    ) -> Pushed:
        assert state.repo_url is not None
        path = state.pipeline_file_path
        try:
            return await self._git.commit_file(
                state.repo_url,
                state.default_branch,
                path,
                render_spec(spec, format),
                message=commit_message or f"Update {path}",
                author=by,
                expected_head=expected_head,
                push_to=pr_branch,
            )
        except GitConflict as exc:
            raise ConcurrencyConflict(str(exc)) from exc
        except GitError as exc:
            raise Invalid({"repoUrl": str(exc)}) from exc
