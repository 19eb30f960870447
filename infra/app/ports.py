"""The ports the application layer depends on, as protocols: the event store and the Git repositories.

Adapters satisfy them structurally (infra/store/postgres.py and memory.py; infra/git/repos.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from infra.git.files import FileAtHead, GitCredential, Pushed
from infra.store.records import Alongside, AppendResult, FeedCursor, NewEvent, RecordedEvent, UniqueKey


class EventStore(Protocol):
    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
        alongside: Alongside | None = None,
    ) -> AppendResult:
        """Append under optimistic concurrency.

        expected_version: 0 = the stream must not exist; n = it must be at n; None = any.
        alongside: what else the append writes in its transaction (records.Alongside).
        Raises WrongExpectedVersion or UniqueKeyTaken; nothing is written then.
        """
        ...

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]: ...

    async def read_feed(
        self,
        after: FeedCursor,
        limit: int = 500,
        *,
        run_id: str | None = None,
        pipeline_id: str | None = None,
    ) -> list[RecordedEvent]:
        """Committed events after `after`, in feed order, never skipping a late commit."""
        ...

    async def cursor_of(self, position: int) -> FeedCursor | None:
        """The feed cursor of the event at `position`, None when there is none."""
        ...

    async def streams_of(self, pipeline_id: str, prefix: str) -> list[str]:
        """The streams named `prefix...` whose first event belongs to the pipeline, oldest first:
        every committed one, not only those below the feed's horizon."""
        ...


class GitRepository(Protocol):
    """A Git-backed pipeline's repository: read its file at a branch head, commit a new version.

    Raises `GitError` when the repository cannot be read or written, `GitConflict` (a GitError)
    when the branch head is not `expected_head` or moved while pushing."""

    async def read_file(
        self, url: str, branch: str, path: str, *, credential: GitCredential | None = None
    ) -> FileAtHead: ...

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
    ) -> Pushed: ...


class GitCredentials(Protocol):
    """The credential a pipeline's Git operations use: registered for the pipeline itself, else
    for its organization (stored secrets); None when there is none."""

    async def for_pipeline(self, organization_id: str | None, pipeline_id: str) -> GitCredential | None: ...
