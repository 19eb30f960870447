"""Pipeline commands: create, update (rename), delete, and any decision against a live pipeline."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from domain import events as ev
from domain import pipeline as pl
from domain.errors import Invalid, NotFound
from domain.stages import stages_from_dicts, validate_stage_dicts
from infra.app.context import AppContext
from infra.app.ports import EventStore
from infra.app.positions import note
from infra.app.retry import Keys, load_decide_append
from infra.store.records import NewEvent, UniqueKey, UniqueKeyTaken

Visible = Callable[[pl.PipelineState], bool]


class NameTaken(Exception):
    pass


def name_key(org: str | None, name: str) -> UniqueKey:
    return UniqueKey(scope=f"pipeline-name:{org or '_'}", key=name)


def everyone(state: pl.PipelineState) -> bool:
    return True


async def load_pipeline(store: EventStore, pipeline_id: str) -> tuple[pl.PipelineState, int]:
    state, version = pl.initial_state, 0
    for rec in await store.read_stream(ev.pipeline_stream(pipeline_id)):
        e = rec.event
        assert ev.is_pipeline_event(e)
        state, version = pl.evolve(state, e), rec.stream_version
    return state, version


class PipelineCommands:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    async def load(self, pipeline_id: str) -> tuple[pl.PipelineState, int]:
        return await load_pipeline(self.ctx.store, pipeline_id)

    def stages(self, raw: Any) -> tuple[Any, ...]:
        errors = validate_stage_dicts(raw, limits=self.ctx.limits)
        if errors:
            raise Invalid(errors)
        return stages_from_dicts(raw, [self.ctx.new_id() for _ in raw])

    def _records(self, state: pl.PipelineState, pipeline_id: str, new: list[pl.PipelineEvent]) -> list[NewEvent]:
        org = state.organization_id
        return [NewEvent(self.ctx.new_id(), e, org=org, pipeline_id=pipeline_id) for e in new]

    async def create(
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
        ctx = self.ctx
        pipeline_id = pipeline_id or ctx.new_id()
        cmd = pl.CreatePipeline(
            pipeline_id=pipeline_id,
            name=name,
            description=description,
            stages=self.stages(stages),
            organization_id=org,
            by=by,
            at=ctx.now(),
            repo_url=repo_url,
            default_branch=default_branch or pl.DEFAULT_BRANCH,
            pipeline_file_path=pipeline_file_path or pl.DEFAULT_PIPELINE_FILE,
        )
        new = pl.decide(cmd, pl.initial_state)
        try:
            note(
                await ctx.store.append(
                    ev.pipeline_stream(pipeline_id),
                    [NewEvent(ctx.new_id(), e, org=org, pipeline_id=pipeline_id) for e in new],
                    0,
                    claim=[name_key(org, name)],
                )
            )
        except UniqueKeyTaken as exc:
            raise NameTaken(f"a pipeline named {name!r} already exists") from exc
        ctx.appended()
        state = pl.initial_state
        for e in new:
            state = pl.evolve(state, e)
        return state

    async def command(
        self,
        pipeline_id: str,
        make: Callable[[datetime], pl.PipelineCommand],
        *,
        visible: Visible,
        keys: Callable[[pl.PipelineState, list[pl.PipelineEvent]], Keys] | None = None,
    ) -> pl.PipelineState:
        """Decide `make(now)` against the live pipeline's current state and append; on a lost race,
        again. `keys` gives the unique keys (names) the events claim and release."""

        def decide(state: pl.PipelineState) -> list[pl.PipelineEvent]:
            if not state.live or not visible(state):
                raise NotFound("pipeline not found")
            return pl.decide(make(self.ctx.now()), state)

        done = await load_decide_append(
            self.ctx.store,
            ev.pipeline_stream(pipeline_id),
            load=lambda: self.load(pipeline_id),
            decide=decide,
            record=lambda state, new: self._records(state, pipeline_id, new),
            keys=keys,
            retries=self.ctx.retries,
            conflict="pipeline changed concurrently; try again",
        )
        state = done.state
        if done.events:
            self.ctx.appended()
            for e in done.events:
                state = pl.evolve(state, e)
        return state

    async def update(
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
        visible: Visible = everyone,
    ) -> pl.PipelineState:
        parsed = None if stages is None else self.stages(stages)

        def renames(state: pl.PipelineState, new: list[pl.PipelineEvent]) -> Keys:
            updated = new[0]
            if not isinstance(updated, pl.PipelineUpdated) or updated.name == state.name:
                return [], []
            org = state.organization_id
            return [name_key(org, updated.name)], [name_key(org, state.name)]

        try:
            return await self.command(
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

    async def delete(self, pipeline_id: str, *, by: str, visible: Visible = everyone) -> pl.PipelineState:
        return await self.command(
            pipeline_id,
            lambda at: pl.DeletePipeline(by=by, at=at),
            visible=visible,
            keys=lambda state, _: ([], [name_key(state.organization_id, state.name)]),
        )
