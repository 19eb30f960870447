"""Idempotency keys against real PostgreSQL: old keys are purged, and a slow command keeps its key
(its lease is renewed while it runs), so a retry never runs it a second time."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
from litestar import Litestar
from psycopg_pool import AsyncConnectionPool

from infra.app.commands import Commands
from infra.auth import issue_token
from infra.git.files import GitCredential
from infra.git.repos import FileAtHead, GitRepos
from infra.http.app import create_app
from infra.http.deps import Deps
from infra.http.idempotency import IdempotencyKeys, request_hash
from services.bootstrap import build_api, open_store
from tests.integration.system import make_settings

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(loop_scope="session")
async def pool(database_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[AsyncConnectionPool]:
    pool, _ = await open_store(make_settings(database_url, nats_url, tmp_path))
    try:
        yield pool
    finally:
        await pool.close()


async def _keys(pool: AsyncConnectionPool, scope: str) -> set[str]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT key FROM idempotency_keys WHERE scope = %s", (scope,))
        return {row[0] for row in await cur.fetchall()}


async def test_keys_older_than_the_retention_are_purged_and_fresh_ones_stay(pool: AsyncConnectionPool) -> None:
    scope = f"test|{uuid.uuid4()}"
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO idempotency_keys (scope, key, request_hash, status_code, body, created_at) "
            "VALUES (%s, 'old', 'h', 200, %s, now() - interval '25 hours')",
            (scope, b"x" * 1000),
        )
    keys = IdempotencyKeys(pool)
    assert await keys.begin(scope, "fresh", request_hash(b"{}")) is None
    await keys.finish(scope, "fresh", 201, b"{}")
    # Another caller's write purges what is past the retention, whatever its scope.
    assert await keys.begin(f"other|{uuid.uuid4()}", "k", request_hash(b"{}")) is None
    assert await _keys(pool, scope) == {"fresh"}


# ---- a slow command and its lease ------------------------------------------------------------

SPEC = "stages:\n  - id: build\n    type: script\n    config:\n      command: echo hi\n"


class GatedGit(GitRepos):
    """A Git repository whose reads wait until the test opens the gate; counts the reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.gate = asyncio.Event()

    async def read_file(
        self, url: str, branch: str, path: str, *, credential: GitCredential | None = None
    ) -> FileAtHead:
        self.reads += 1
        await self.gate.wait()
        return FileAtHead(content=SPEC, commit_sha="a" * 40, branch=branch)


@contextlib.asynccontextmanager
async def _serving(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """The app on the test's event loop, so that two requests really run at once."""
    started, stop = asyncio.Event(), asyncio.Event()

    async def lifespan() -> None:
        async with app.lifespan():  # entered and left in one task
            started.set()
            await stop.wait()

    task = asyncio.create_task(lifespan())
    await started.wait()
    try:
        transport = httpx.ASGITransport(app=cast(Any, app))
        async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as client:
            yield client
    finally:
        stop.set()
        await task


async def _locked_until(pool: AsyncConnectionPool, key: str) -> datetime:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT locked_until FROM idempotency_keys WHERE key = %s", (key,))
        row = await cur.fetchone()
    assert row is not None
    return cast(datetime, row[0])


async def _past(pool: AsyncConnectionPool, moment: datetime) -> bool:
    """The database's clock (the one leases run on) is past `moment`."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT now() > %s + interval '0.1 s'", (moment,))
        row = await cur.fetchone()
    return bool(row and row[0])


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_slow_keyed_command_keeps_its_key_past_the_lease_and_runs_once(
    database_url: str, nats_url: str, tmp_path: Path, pool: AsyncConnectionPool
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path, git_allow_local=(Path("/srv/repos"),))
    git = GatedGit()
    lease = 0.5

    async def build() -> Deps:
        deps = await build_api(settings)
        deps.commands = Commands(deps.commands.store, git=git)
        # A short lease; a waiting retry gives up (409) after a second rather than 30.
        deps.idempotency = IdempotencyKeys(pool, lease_seconds=lease, wait_seconds=1.0)
        return deps

    headers = {"Authorization": f"Bearer {issue_token(settings, sub='alice', roles=['member'], org='o')}"}
    async with _serving(create_app(build)) as client:
        r = await client.post(
            "/api/v1/pipelines",
            json={"name": f"slow-{uuid.uuid4().hex[:8]}", "repoUrl": "file:///srv/repos/app.git"},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        url = f"/api/v1/pipelines/{r.json()['id']}/trigger"
        keyed = {**headers, "Idempotency-Key": f"slow-{uuid.uuid4()}"}
        key = keyed["Idempotency-Key"]

        async def reading() -> bool:
            return git.reads == 1

        first = asyncio.create_task(client.post(url, headers=keyed))
        second: asyncio.Task[httpx.Response] | None = None

        async def second_decided() -> bool:
            assert second is not None
            return second.done() or git.reads > 1

        try:
            await _until(reading, "the first trigger to read the repository")
            first_lease_end = await _locked_until(pool, key)
            await _until(lambda: _past(pool, first_lease_end), "the first lease to end")
            second = asyncio.create_task(client.post(url, headers=keyed))
            await _until(second_decided, "the retry to answer or to run the command")
            assert git.reads == 1, "the retry took over a key whose command was still running"
            r2 = await second
            assert r2.status_code == 409 and "in progress" in r2.json()["message"]
        finally:
            git.gate.set()  # whatever happened, let the requests end
        r1 = await first
        assert r1.status_code == 201, r1.text
        again = await client.post(url, headers=keyed)
        assert again.status_code == 201 and again.json()["id"] == r1.json()["id"]
        assert git.reads == 1
