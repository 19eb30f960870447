"""The application's command side: load a stream, decide, append under optimistic concurrency.

API handlers and the executor both go through here, so a decision is always made against the
stream's current version; a writer that lost a race reloads and decides again, which turns a
stale command into a clear refusal (approve after cancel: "already cancelled") instead of an
overwrite.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any, Literal
from zoneinfo import ZoneInfo

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from domain.errors import Invalid, NotFound
from domain.stages import stages_from_dicts, validate_stage_dicts
from infra.git.repos import FileAtHead, GitConflict, GitError, GitRepos, parse_spec, render_spec
from infra.store.records import EventStore, NewEvent, UniqueKey, UniqueKeyTaken, WrongExpectedVersion

RunHook = Callable[[rn.RunState, list[rn.RunEvent]], Awaitable[None]]


class NameTaken(Exception):
    pass


class ConcurrencyConflict(Exception):
    """Still losing optimistic-concurrency races after retries (HTTP 409)."""


@dataclass(frozen=True)
class SavedSpec:
    """What a spec save did: the pipeline after it, and for a Git-backed pipeline the commit
    (`branch` is the pipeline's branch; `pr_branch` the new branch of a `pr` save, whose
    definition is unchanged until the branch is merged and the pipeline triggered)."""

    state: pl.PipelineState
    commit_sha: str | None = None
    branch: str | None = None
    pr_branch: str | None = None


def name_key(org: str | None, name: str) -> UniqueKey:
    return UniqueKey(scope=f"pipeline-name:{org or '_'}", key=name)


# Told a run's state and the stream version it was folded at.
VersionHook = Callable[[str, rn.RunState, int], None]


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


class Commands:
    def __init__(
        self,
        store: EventStore,
        *,
        now: Callable[[], datetime] = utc_now,
        new_id: Callable[[], str] = new_uuid,
        on_append: Callable[[], None] | None = None,
        on_run_appended: Callable[[str], None] | None = None,
        retries: int = 8,
        git: GitRepos | None = None,
    ) -> None:
        self.store = store
        self.git = git or GitRepos()
        self.now = now
        self.new_id = new_id
        self._on_append = on_append
        # Told the id of every run this process appended to (the API wakes the executors with it).
        self._on_run_appended = on_run_appended
        self._retries = retries

    def _appended(self) -> None:
        if self._on_append is not None:
            self._on_append()

    def _run_appended(self, run_id: str) -> None:
        if self._on_run_appended is not None:
            self._on_run_appended(run_id)

    def notify_appended(self) -> None:
        """Wake the followers after an append made directly on the store."""
        self._appended()

    # ---- loading ---------------------------------------------------------------------------

    async def load_pipeline(self, pipeline_id: str) -> tuple[pl.PipelineState, int]:
        state, version = pl.initial_state, 0
        for rec in await self.store.read_stream(ev.pipeline_stream(pipeline_id)):
            e = rec.event
            assert ev.is_pipeline_event(e)
            state, version = pl.evolve(state, e), rec.stream_version
        return state, version

    async def load_run(
        self, run_id: str, on_version: VersionHook | None = None
    ) -> tuple[rn.RunState, int]:
        """The run folded from its stream, and the stream's version (also told to `on_version`)."""
        state, version = rn.initial_state, 0
        for rec in await self.store.read_stream(ev.run_stream(run_id)):
            e = rec.event
            assert ev.is_run_event(e)
            state, version = rn.evolve(state, e), rec.stream_version
        if on_version is not None:
            on_version(run_id, state, version)
        return state, version

    async def load_logs(self, run_id: str) -> list[rn.LogAppended]:
        out = []
        for rec in await self.store.read_stream(ev.run_log_stream(run_id)):
            e = rec.event
            assert isinstance(e, rn.LogAppended)
            out.append(e)
        return out

    # ---- pipelines -------------------------------------------------------------------------

    def _stages(self, raw: Any) -> tuple[Any, ...]:
        errors = validate_stage_dicts(raw)
        if errors:
            raise Invalid(errors)
        return stages_from_dicts(raw, [self.new_id() for _ in raw])

    async def create_pipeline(
        self,
        *,
        name: str,
        description: str | None,
        stages: list[Any],
        org: str | None,
        by: str,
        pipeline_id: str | None = None,
        repo_url: str | None = None,
        default_branch: str | None = None,
        pipeline_file_path: str | None = None,
    ) -> pl.PipelineState:
        pipeline_id = pipeline_id or self.new_id()
        cmd = pl.CreatePipeline(
            pipeline_id=pipeline_id,
            name=name,
            description=description,
            stages=self._stages(stages),
            organization_id=org,
            by=by,
            at=self.now(),
            repo_url=repo_url,
            default_branch=default_branch or pl.DEFAULT_BRANCH,
            pipeline_file_path=pipeline_file_path or pl.DEFAULT_PIPELINE_FILE,
        )
        new = pl.decide(cmd, pl.initial_state)
        try:
            await self.store.append(
                ev.pipeline_stream(pipeline_id),
                [NewEvent(self.new_id(), e, org=org, pipeline_id=pipeline_id) for e in new],
                0,
                claim=[name_key(org, name)],
            )
        except UniqueKeyTaken as exc:
            raise NameTaken(f"a pipeline named {name!r} already exists") from exc
        self._appended()
        state = pl.initial_state
        for e in new:
            state = pl.evolve(state, e)
        return state

    async def _pipeline_command(
        self,
        pipeline_id: str,
        make: Callable[[datetime], pl.PipelineCommand],
        *,
        visible: Callable[[pl.PipelineState], bool],
        keys: Callable[[pl.PipelineState, list[pl.PipelineEvent]], tuple[list[UniqueKey], list[UniqueKey]]]
        | None = None,
    ) -> pl.PipelineState:
        """Decide `make(now)` against the live pipeline's current state and append; on a lost race,
        again. `keys` gives the unique keys (names) the events claim and release."""
        for _ in range(self._retries):
            state, version = await self.load_pipeline(pipeline_id)
            if not state.live or not visible(state):
                raise NotFound("pipeline not found")
            new = pl.decide(make(self.now()), state)
            if not new:
                return state
            claim, release = keys(state, new) if keys is not None else ([], [])
            try:
                await self.store.append(
                    ev.pipeline_stream(pipeline_id),
                    [NewEvent(self.new_id(), e, org=state.organization_id, pipeline_id=pipeline_id) for e in new],
                    version,
                    claim=claim,
                    release=release,
                )
            except WrongExpectedVersion:
                continue
            self._appended()
            for e in new:
                state = pl.evolve(state, e)
            return state
        raise ConcurrencyConflict("pipeline changed concurrently; try again")

    async def update_pipeline(
        self,
        pipeline_id: str,
        *,
        by: str,
        name: str | None = None,
        description: str | None = None,
        set_description: bool = False,
        stages: list[Any] | None = None,
        repo_url: str | None = None,
        set_repo_url: bool = False,
        default_branch: str | None = None,
        pipeline_file_path: str | None = None,
        visible: Callable[[pl.PipelineState], bool] = lambda s: True,
    ) -> pl.PipelineState:
        parsed = None if stages is None else self._stages(stages)

        def renames(state: pl.PipelineState, new: list[pl.PipelineEvent]) -> tuple[list[UniqueKey], list[UniqueKey]]:
            updated = new[0]
            if not isinstance(updated, pl.PipelineUpdated) or updated.name == state.name:
                return [], []
            org = state.organization_id
            return [name_key(org, updated.name)], [name_key(org, state.name)]

        try:
            return await self._pipeline_command(
                pipeline_id,
                lambda at: pl.UpdatePipeline(
                    name=name,
                    description=description,
                    set_description=set_description,
                    stages=parsed,
                    repo_url=repo_url,
                    set_repo_url=set_repo_url,
                    default_branch=default_branch,
                    pipeline_file_path=pipeline_file_path,
                    by=by,
                    at=at,
                ),
                visible=visible,
                keys=renames,
            )
        except UniqueKeyTaken as exc:
            raise NameTaken(f"a pipeline named {name!r} already exists") from exc

    async def delete_pipeline(
        self, pipeline_id: str, *, by: str, visible: Callable[[pl.PipelineState], bool] = lambda s: True
    ) -> pl.PipelineState:
        return await self._pipeline_command(
            pipeline_id,
            lambda at: pl.DeletePipeline(by=by, at=at),
            visible=visible,
            keys=lambda state, _: ([], [name_key(state.organization_id, state.name)]),
        )

    async def save_spec(
        self,
        pipeline_id: str,
        *,
        spec: dict[str, Any],
        format: pl.SpecFormat,
        commit_message: str | None,
        by: str,
        plugins: frozenset[str] | None = None,
        visible: Callable[[pl.PipelineState], bool] = lambda s: True,
        save_mode: Literal["direct", "pr"] = "direct",
        expected_head_commit_sha: str | None = None,
    ) -> SavedSpec:
        """Validate a spec and save it as the pipeline's next definition version.

        A Git-backed pipeline's spec is first committed (as `format`) to its file: pushed to its
        branch (`direct`; then recorded as the next version with the commit), or to a new branch
        awaiting review (`pr`; the definition is unchanged). A branch head that is not
        `expected_head_commit_sha`, or that moves while we push, is a ConcurrencyConflict."""
        from domain.spec import stages_from_spec, validate_spec

        errors, _ = validate_spec(spec, zone=ZoneInfo, plugins=plugins)
        if errors:
            raise Invalid({f"spec.{e.path}" if e.path != "spec" else "spec": e.message for e in errors})
        typed = [s for s in spec.get("stages", []) if isinstance(s, dict) and "jobs" not in s]
        stages = stages_from_spec(spec, [self.new_id() for _ in typed])
        state, _ = await self.load_pipeline(pipeline_id)
        if not state.live or not visible(state):
            raise NotFound("pipeline not found")
        pushed = None
        if state.repo_url is not None:
            path = state.pipeline_file_path
            short = self.new_id().replace("-", "")[:12]
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
        saved = await self._pipeline_command(
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
        from domain.spec import validate_spec

        assert pipeline.repo_url is not None
        path = pipeline.pipeline_file_path
        try:
            head = await self.git.read_file(pipeline.repo_url, pipeline.default_branch, path)
            spec, fmt = parse_spec(head.content, path)
        except GitError as exc:
            raise Invalid({"repoUrl": f"cannot read {path} from branch {pipeline.default_branch!r}: {exc}"}) from exc
        where = f"{path}@{head.commit_sha[:12]}"
        errors, _ = validate_spec(
            spec, zone=ZoneInfo, plugins=frozenset(e.name for e in entry_points(group="pipelines.steps"))
        )
        if errors:
            raise Invalid({f"{where}: {e.path}": e.message for e in errors})
        assert isinstance(spec, dict)
        return spec, fmt, head

    async def sync_from_git(self, pipeline: pl.PipelineState, *, by: str) -> tuple[pl.PipelineState, FileAtHead]:
        """Read a Git-backed pipeline's spec at its branch head; when it differs from the current
        definition, record it as the next definition version (with its commit) first."""
        from domain.spec import stages_from_spec

        spec, fmt, head = await self.read_git_spec(pipeline)
        typed = [s for s in spec.get("stages", []) if isinstance(s, dict) and "jobs" not in s]
        stages = stages_from_spec(spec, [self.new_id() for _ in typed])
        state = await self._pipeline_command(
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

    # ---- runs ------------------------------------------------------------------------------

    async def trigger(
        self,
        pipeline: pl.PipelineState,
        *,
        by: str,
        variables: dict[str, str] | None = None,
        secret_names: Sequence[str] = (),
        run_id: str | None = None,
        trigger: dict[str, Any] | None = None,
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        """Start a run of the pipeline's current definition. The run's variables are the
        pipeline's (from its spec) overridden by the trigger's. A Git-backed pipeline's definition
        is first read from its branch head (a new version when it changed); the run's trigger
        records the commit (`commitSha`, `branch`)."""
        trigger = dict(trigger or {"type": "manual"})
        if pipeline.repo_url is not None:
            pipeline, head = await self.sync_from_git(pipeline, by=by)
            trigger["commitSha"] = head.commit_sha
            if not trigger.get("branch"):
                trigger["branch"] = head.branch
        run_id = run_id or self.new_id()
        cmd = rn.TriggerRun(
            run_id=run_id,
            pipeline_id=pipeline.pipeline_id,
            organization_id=pipeline.organization_id,
            definition_version=pipeline.definition_version,
            stages=pipeline.stages,
            variables={**pipeline.variables, **(variables or {})},
            secret_names=tuple(secret_names),
            trigger=trigger,
            by=by,
            at=self.now(),
        )
        new = rn.decide(cmd, rn.initial_state)
        await self.store.append(
            ev.run_stream(run_id), self._run_events(cmd.organization_id, cmd.pipeline_id, run_id, new), 0
        )
        self._appended()
        self._run_appended(run_id)
        return rn.fold(new), new

    def _run_events(self, org: str | None, pipeline_id: str, run_id: str, new: Sequence[ev.Event]) -> list[NewEvent]:
        return [NewEvent(self.new_id(), e, org=org, pipeline_id=pipeline_id, run_id=run_id) for e in new]

    async def run_command(
        self,
        run_id: str,
        make: Callable[[datetime], rn.RunCommand],
        *,
        visible: Callable[[rn.RunState], bool] = lambda s: True,
        before_append: RunHook | None = None,
        lost_race: RunHook | None = None,
        on_version: VersionHook | None = None,
        known: tuple[rn.RunState, int] | None = None,
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        """Decide `make(now)` against the run's current state and append; on a lost race, again.

        `before_append` runs between the decision and the append (the executor takes its stage
        lease there, so a started stage always has one); `lost_race` undoes it when the append
        loses to another writer. `on_version` is told each state and version read or written.
        `known` (a state and its version, from an earlier call) saves the first read: only for
        commands that always append or refuse, so that a stale state shows as a lost race.
        """
        for _ in range(self._retries):
            if known is not None:
                (state, version), known = known, None
            else:
                state, version = await self.load_run(run_id, on_version)
            if not state.exists or not visible(state):
                raise NotFound("run not found")
            new = rn.decide(make(self.now()), state)
            if not new:
                return state, []
            if before_append is not None:
                await before_append(state, new)
            try:
                await self.store.append(
                    ev.run_stream(run_id),
                    self._run_events(state.organization_id, state.pipeline_id, run_id, new),
                    version,
                )
            except WrongExpectedVersion:
                if lost_race is not None:
                    await lost_race(state, new)
                continue
            self._appended()
            self._run_appended(run_id)
            for e in new:
                state = rn.evolve(state, e)
            if on_version is not None:
                on_version(run_id, state, version + len(new))
            return state, new
        raise ConcurrencyConflict("run changed concurrently; try again")

    async def append_logs(self, state: rn.RunState, chunks: Sequence[rn.LogAppended]) -> None:
        await self.store.append(
            ev.run_log_stream(state.run_id),
            self._run_events(state.organization_id, state.pipeline_id, state.run_id, chunks),
            None,
        )
        self._appended()
