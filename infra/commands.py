"""The application's command side: load a stream, decide, append under optimistic concurrency.

API handlers and the executor both go through here, so a decision is always made against the
stream's current version; a writer that lost a race reloads and decides again, which turns a
stale command into a clear refusal (approve after cancel: "already cancelled") instead of an
overwrite.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from domain.errors import Invalid, NotFound
from domain.stages import stages_from_dicts, validate_stage_dicts
from infra.store import EventStore, NewEvent, UniqueKey, UniqueKeyTaken, WrongExpectedVersion

RunHook = Callable[[rn.RunState, list[rn.RunEvent]], Awaitable[None]]


class NameTaken(Exception):
    pass


class ConcurrencyConflict(Exception):
    """Still losing optimistic-concurrency races after retries (HTTP 409)."""


def name_key(org: str | None, name: str) -> UniqueKey:
    return UniqueKey(scope=f"pipeline-name:{org or '_'}", key=name)


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
        retries: int = 8,
    ) -> None:
        self.store = store
        self.now = now
        self.new_id = new_id
        self._on_append = on_append
        self._retries = retries

    def _appended(self) -> None:
        if self._on_append is not None:
            self._on_append()

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

    async def load_run(self, run_id: str) -> tuple[rn.RunState, int]:
        state, version = rn.initial_state, 0
        for rec in await self.store.read_stream(ev.run_stream(run_id)):
            e = rec.event
            assert ev.is_run_event(e)
            state, version = rn.evolve(state, e), rec.stream_version
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
                    name=name, description=description, set_description=set_description, stages=parsed, by=by, at=at
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
    ) -> pl.PipelineState:
        """Validate a spec and save it as the pipeline's next definition version."""
        from domain.spec import stages_from_spec, validate_spec

        errors, _ = validate_spec(spec, plugins=plugins)
        if errors:
            raise Invalid({f"spec.{e.path}" if e.path != "spec" else "spec": e.message for e in errors})
        # Stages of jobs validate, but the executor cannot run them yet: refuse them here rather
        # than save a definition whose runs would fail.
        if "jobs" in spec:
            raise Invalid({"spec.jobs": "stages of jobs validate but cannot run yet; save typed stages only"})
        for i, stage in enumerate(spec.get("stages", [])):
            if isinstance(stage, dict) and "jobs" in stage:
                raise Invalid(
                    {f"spec.stages[{i}].jobs": "stages of jobs validate but cannot run yet; save typed stages only"}
                )
        typed = [s for s in spec.get("stages", []) if isinstance(s, dict) and "jobs" not in s]
        stages = stages_from_spec(spec, [self.new_id() for _ in typed])
        return await self._pipeline_command(
            pipeline_id,
            lambda at: pl.SaveSpec(
                spec=spec, stages=stages, format=format, commit_message=commit_message, by=by, at=at
            ),
            visible=visible,
        )

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
        pipeline's (from its spec) overridden by the trigger's."""
        run_id = run_id or self.new_id()
        cmd = rn.TriggerRun(
            run_id=run_id,
            pipeline_id=pipeline.pipeline_id,
            organization_id=pipeline.organization_id,
            definition_version=pipeline.definition_version,
            stages=pipeline.stages,
            variables={**pipeline.variables, **(variables or {})},
            secret_names=tuple(secret_names),
            trigger=trigger or {"type": "manual"},
            by=by,
            at=self.now(),
        )
        new = rn.decide(cmd, rn.initial_state)
        await self.store.append(
            ev.run_stream(run_id), self._run_events(cmd.organization_id, cmd.pipeline_id, run_id, new), 0
        )
        self._appended()
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
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        """Decide `make(now)` against the run's current state and append; on a lost race, again.

        `before_append` runs between the decision and the append (the executor takes its stage
        lease there, so a started stage always has one); `lost_race` undoes it when the append
        loses to another writer.
        """
        for _ in range(self._retries):
            state, version = await self.load_run(run_id)
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
            for e in new:
                state = rn.evolve(state, e)
            return state, new
        raise ConcurrencyConflict("run changed concurrently; try again")

    async def append_logs(self, state: rn.RunState, chunks: Sequence[rn.LogAppended]) -> None:
        await self.store.append(
            ev.run_log_stream(state.run_id),
            self._run_events(state.organization_id, state.pipeline_id, state.run_id, chunks),
            None,
        )
        self._appended()
