"""Run commands: trigger a run (a Git-backed pipeline's definition synced first), decide any run
command against the run's current state, append its log chunks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from domain.errors import NotFound
from infra import trace
from infra.app.context import AppContext
from infra.app.definitions import Definitions
from infra.app.measures import observe_ended
from infra.app.ports import EventStore
from infra.app.positions import note
from infra.app.retry import load_decide_append
from infra.store.records import Alongside, NewEvent

RunHook = Callable[[rn.RunState, list[rn.RunEvent]], Awaitable[None]]
# Told a run's state and the stream version it was folded at.
VersionHook = Callable[[str, rn.RunState, int], None]


async def load_run(
    store: EventStore, run_id: str, since: tuple[rn.RunState, int] = (rn.initial_state, 0)
) -> tuple[rn.RunState, int]:
    """The run folded from its stream, and the stream's version; from `since` (a state and the
    version it was folded at) only the events after it are read."""
    state, version = since
    for rec in await store.read_stream(ev.run_stream(run_id), version):
        e = rec.event
        assert ev.is_run_event(e)
        state, version = rn.evolve(state, e), rec.stream_version
    return state, version


class RunStates:
    """The runs this process read or wrote last, as (state, stream version), least recently used
    first. A stream's events never change, so a cached state is always a true prefix: a load reads
    only the events after it. Loading a run of thousands of stages folds them once, and a command
    that lost a race re-decides in milliseconds instead of folding the whole run again."""

    def __init__(self, size: int = 256, stages: int = 50_000) -> None:
        self._states: OrderedDict[str, tuple[rn.RunState, int]] = OrderedDict()
        self._size = size
        # Bounded by stages too: a run of 10,000 stages weighs as much as hundreds of small ones.
        self._stages = stages
        self._weight = 0

    def get(self, run_id: str) -> tuple[rn.RunState, int] | None:
        hit = self._states.get(run_id)
        if hit is not None:
            self._states.move_to_end(run_id)
        return hit

    def put(self, run_id: str, state: rn.RunState, version: int) -> None:
        known = self._states.get(run_id)
        if known is not None and known[1] > version:
            return  # a slower reader must not take the cache back to an older version
        if known is not None:
            self._weight -= _weight(known[0])
        self._states[run_id] = (state, version)
        self._weight += _weight(state)
        self._states.move_to_end(run_id)
        while len(self._states) > 1 and (len(self._states) > self._size or self._weight > self._stages):
            _, (dropped, _) = self._states.popitem(last=False)
            self._weight -= _weight(dropped)


def _weight(state: rn.RunState) -> int:
    return 1 + len(state.stage_runs)


# Commands people give (the run controls of the API), and how long they keep trying against
# the executor's appends before answering 409.
PEOPLES_COMMANDS = (rn.Approve, rn.Reject, rn.Cancel, rn.Stop, rn.Pause, rn.Resume)
PATIENCE = 10.0


def all_runs(state: rn.RunState) -> bool:
    return True


class RunCommands:
    def __init__(self, ctx: AppContext, definitions: Definitions) -> None:
        self.ctx = ctx
        self.definitions = definitions
        self.states = RunStates()

    async def load(self, run_id: str, on_version: VersionHook | None = None) -> tuple[rn.RunState, int]:
        """The run folded from its stream, and the stream's version (also told to `on_version`)."""
        cached = self.states.get(run_id)
        state, version = await load_run(self.ctx.store, run_id, cached or (rn.initial_state, 0))
        if version and (cached is None or version > cached[1]):
            self.states.put(run_id, state, version)
        if on_version is not None:
            on_version(run_id, state, version)
        return state, version

    async def load_logs(self, run_id: str) -> list[rn.LogAppended]:
        out = []
        for rec in await self.ctx.store.read_stream(ev.run_log_stream(run_id)):
            e = rec.event
            assert isinstance(e, rn.LogAppended)
            out.append(e)
        return out

    def records(self, org: str | None, pipeline_id: str, run_id: str, new: Sequence[ev.Event]) -> list[NewEvent]:
        return [NewEvent(self.ctx.new_id(), e, org=org, pipeline_id=pipeline_id, run_id=run_id) for e in new]

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
        ctx = self.ctx
        trigger = dict(trigger or {"type": "manual"})
        if pipeline.repo_url is not None:
            pipeline, head = await self.definitions.sync_from_git(pipeline, by=by)
            trigger["commitSha"] = head.commit_sha
            if not trigger.get("branch"):
                trigger["branch"] = head.branch
        run_id = run_id or ctx.new_id()
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
            at=ctx.now(),
        )
        new = rn.decide(cmd, rn.initial_state)
        note(
            await ctx.store.append(
                ev.run_stream(run_id), self.records(cmd.organization_id, cmd.pipeline_id, run_id, new), 0
            )
        )
        trace.appended(ev.run_stream(run_id), new)
        ctx.appended()
        ctx.run_appended(run_id)
        state = rn.fold(new)
        self.states.put(run_id, state, len(new))
        return state, new

    async def command(
        self,
        run_id: str,
        make: Callable[[datetime], rn.RunCommand],
        *,
        visible: Callable[[rn.RunState], bool] = all_runs,
        before_append: RunHook | None = None,
        lost_race: RunHook | None = None,
        on_version: VersionHook | None = None,
        known: tuple[rn.RunState, int] | None = None,
        alongside: Callable[[rn.RunState, list[rn.RunEvent]], Alongside | None] | None = None,
    ) -> tuple[rn.RunState, list[rn.RunEvent]]:
        """Decide `make(now)` against the run's current state and append; on a lost race, again.

        `before_append` runs between the decision and the append; `lost_race` undoes it when the
        append loses to another writer. `alongside` gives what the append writes in its own
        transaction (the executor's unit leases and a unit's last log chunk: a started unit
        always has a lease, a completion always follows the unit's whole log). `on_version` is
        told each state and version read or written.
        `known` (a state and its version, from an earlier call) saves the first read: only for
        commands that always append or refuse, so that a stale state shows as a lost race.
        """
        first = [known] if known is not None else []
        # A person's command keeps re-deciding against the executor's appends until it lands (each
        # try reads only the events since the last, so it takes milliseconds): stop and cancel
        # always win, however busy the executor is driving the run.
        patience = PATIENCE if isinstance(make(self.ctx.now()), PEOPLES_COMMANDS) else 0.0

        async def load() -> tuple[rn.RunState, int]:
            return first.pop() if first else await self.load(run_id, on_version)

        def decide(state: rn.RunState) -> list[rn.RunEvent]:
            if not state.exists or not visible(state):
                raise NotFound("run not found")
            return rn.decide(make(self.ctx.now()), state)

        done = await load_decide_append(
            self.ctx.store,
            ev.run_stream(run_id),
            load=load,
            decide=decide,
            record=lambda state, new: self.records(state.organization_id, state.pipeline_id, run_id, new),
            before_append=before_append,
            lost_race=lost_race,
            alongside=alongside,
            retries=self.ctx.retries,
            patience=patience,
            conflict="run changed concurrently; try again",
        )
        state, new = done.state, done.events
        if not new:
            return state, []
        self.ctx.appended()
        self.ctx.run_appended(run_id)
        for e in new:
            state = rn.evolve(state, e)
        # Here, where every command's append lands, so that each end is observed once, by the
        # process that stored it (the executor, or the API for the runs people cancel or stop).
        observe_ended(state, new)
        self.states.put(run_id, state, done.version + len(new))
        if on_version is not None:
            on_version(run_id, state, done.version + len(new))
        return state, new

    def log_records(self, state: rn.RunState, chunks: Sequence[rn.LogAppended]) -> list[NewEvent]:
        return self.records(state.organization_id, state.pipeline_id, state.run_id, chunks)

    async def append_logs(
        self, state: rn.RunState, chunks: Sequence[rn.LogAppended], records: Sequence[NewEvent] | None = None
    ) -> None:
        """Append log chunks to the run's log stream; `records`: the chunks as records made
        earlier (the same event ids: a second append of them is refused, not stored twice)."""
        await self.ctx.store.append(ev.run_log_stream(state.run_id), records or self.log_records(state, chunks), None)
        trace.appended(ev.run_log_stream(state.run_id), chunks)
        self.ctx.appended()
