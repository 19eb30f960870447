"""The application layer's entry point: `Commands`, one object the HTTP layer, the executor, the
gateway and the scheduler hold, delegating to the commands of each aggregate (pipelines.py,
definitions.py, runs.py, deployments.py, deletion.py), all of which go through retry.load_decide_append."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from domain.stages import DEFAULT_LIMITS, Limits
from infra.app.context import AppContext, new_uuid, utc_now
from infra.app.definitions import Definitions, SavedSpec
from infra.app.deletion import PipelineDeletion
from infra.app.deployments import DeploymentCommands
from infra.app.pipelines import NameTaken, PipelineCommands, name_key
from infra.app.ports import EventStore, GitCredentials, GitRepository
from infra.app.retry import ConcurrencyConflict
from infra.app.runs import RunCommands, RunHook, VersionHook
from infra.git.repos import GitRepos

# Importable from here as they always were (the HTTP layer, the executor and the scheduler use them).
__all__ = [
    "Commands",
    "ConcurrencyConflict",
    "NameTaken",
    "RunHook",
    "SavedSpec",
    "VersionHook",
    "name_key",
    "new_uuid",
    "utc_now",
]


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
        git: GitRepository | None = None,
        git_credentials: GitCredentials | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.store = store
        self.git: GitRepository = git or GitRepos()
        self.now = now
        self.new_id = new_id
        self._ctx = AppContext(store, now, new_id, retries, on_append, on_run_appended, limits)
        self.pipelines = PipelineCommands(self._ctx)
        self.definitions = Definitions(self._ctx, self.pipelines, self.git, git_credentials)
        self.runs = RunCommands(self._ctx, self.definitions)
        self.deployments = DeploymentCommands(self._ctx)
        self.deletion = PipelineDeletion(store, self.pipelines, self.runs)

        # The commands by their long-standing names.
        self.load_pipeline = self.pipelines.load
        self.create_pipeline = self.pipelines.create
        self.update_pipeline = self.pipelines.update
        self.delete_pipeline = self.deletion.delete
        self.save_spec = self.definitions.save_spec
        self.read_git_spec = self.definitions.read_git_spec
        self.sync_from_git = self.definitions.sync_from_git
        self.load_run = self.runs.load
        self.load_logs = self.runs.load_logs
        self.trigger = self.runs.trigger
        self.run_command = self.runs.command
        self.append_logs = self.runs.append_logs
        self.log_records = self.runs.log_records

    def notify_appended(self) -> None:
        """Wake the followers after an append made directly on the store."""
        self._ctx.appended()
