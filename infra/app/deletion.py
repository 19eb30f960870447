"""Deleting a pipeline: the pipeline first (no new run starts), then every run of it still going is
cancelled, found in the event store's streams rather than a read model, which may lag."""

from __future__ import annotations

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from domain.errors import NotFound, Refused
from infra.app.pipelines import PipelineCommands, Visible, everyone
from infra.app.ports import EventStore
from infra.app.runs import RunCommands

REASON = "pipeline deleted"


class PipelineDeletion:
    def __init__(self, store: EventStore, pipelines: PipelineCommands, runs: RunCommands) -> None:
        self.store = store
        self.pipelines = pipelines
        self.runs = runs

    async def delete(self, pipeline_id: str, *, by: str, visible: Visible = everyone) -> pl.PipelineState:
        """Delete the pipeline and cancel its runs. A store error is raised, never swallowed; the
        retry finds the pipeline deleted, cancels the runs left, and then answers NotFound as any
        delete of a deleted pipeline does."""
        try:
            state = await self.pipelines.delete(pipeline_id, by=by, visible=visible)
        except NotFound:
            gone, _ = await self.pipelines.load(pipeline_id)
            if gone.exists and gone.deleted and visible(gone):
                await self.cancel_runs(pipeline_id, by=by)
            raise
        await self.cancel_runs(pipeline_id, by=by)
        return state

    async def cancel_runs(self, pipeline_id: str, *, by: str) -> list[str]:
        """Cancel every run of the pipeline that has not ended; the ids of those cancelled."""
        prefix = ev.run_stream("")
        cancelled = []
        for stream_id in await self.store.streams_of(pipeline_id, prefix):
            run_id = stream_id.removeprefix(prefix)
            known = await self.runs.load(run_id)
            if known[0].terminal:
                continue
            try:
                await self.runs.command(run_id, lambda at: rn.Cancel(by=by, reason=REASON, at=at), known=known)
            except Refused:
                continue  # it ended meanwhile
            cancelled.append(run_id)
        return cancelled
