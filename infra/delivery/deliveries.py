"""Deploy and notify stages: the registry of environments, components and notification channels
(org-scoped rows), and the executor's side of deploying and notifying.

- `deploy`: the environment's deployer runs the deployment. `command`: a shell template run like a
  script stage (clean environment: the run's variables and secrets, COMPONENT_ID, ENVIRONMENT_ID,
  RUN_ID, PIPELINE_ID, DEPLOYMENT_ID). `webhook`: a POST of a JSON deployment request, signed with
  HMAC-SHA256 (`X-Pipelines-Signature-256: sha256=<hex>`) when the environment has a secret; 2xx
  is success. One deployment at a time per environment: a session-level advisory lock, taken on a
  dedicated connection outside any transaction; PostgreSQL grants waiters in arrival order.
  Every deployment is a `deployment-<id>` stream: queued, started, succeeded or failed.
  A deployment whose executor died is closed as failed by `Deliveries.abandon` (called when the
  stage's lease is recovered) or `Deliveries.close_orphans` (a sweep): the dead executor's lock
  went with its database session (PostgreSQL ends a session whose client vanished; the lock
  session sets TCP keepalives so that a lost host is noticed in about half a minute too).
- `notify`: `message` (with `${{ run.* }}` and `${{ pipeline.* }}`) goes to the channel's notifier
  (`slack`: `{"text": ...}`; `webhook`: a generic JSON document), retried with a growing backoff,
  and is always published on NATS under `pipelines.notify.v1.<org>.<channel>`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
import msgspec
import psycopg
from nats.aio.client import Client as NATS
from psycopg_pool import AsyncConnectionPool

from domain import deployment as dp
from domain import events as ev
from domain import run as rn
from domain.deployment import DeploymentFailed, DeploymentQueued, DeploymentStarted, DeploymentSucceeded
from domain.errors import Refused
from domain.expressions import ExpressionError, interpolate
from domain.stages import Stage
from infra.app.commands import Commands
from infra.broker.bus import notify_subject
from infra.config import Settings
from infra.executor.scripts import ScriptOutcome
from infra.secrets import SecretStore
from infra.store.records import NewEvent, WrongExpectedVersion
from projections.views import iso

Kind = Literal["environment", "component", "channel"]
SIGNATURE_HEADER = "X-Pipelines-Signature-256"
_enc = msgspec.json.Encoder()

Log = Callable[[Literal["stdout", "stderr", "system"], str], None]
RunCommand = Callable[[str, dict[str, str]], Awaitable[ScriptOutcome]]


class NameInUse(Exception):
    pass


@dataclass(frozen=True)
class Item:
    kind: str
    id: str
    org: str | None
    name: str
    doc: dict[str, Any]
    secret: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime


_COLUMNS = "kind, id, org, name, doc::text, secret, created_by, created_at, updated_at"


_SEALED = "sealed:v1:"


class Registry:
    """Environments, components and channels, each scoped to an organization (None: none).

    A webhook's HMAC secret is sealed with the secrets key (`SecretStore`, AES-GCM bound to the
    item) before it is stored, and opened only when the executor signs with it."""

    def __init__(self, pool: AsyncConnectionPool, sealer: SecretStore | None = None) -> None:
        self._pool = pool
        self._sealer = sealer

    def _seal(self, kind: str, item_id: str, secret: str | None) -> str | None:
        if secret is None or self._sealer is None:
            return secret
        blob = self._sealer.encrypt(f"{kind}:{item_id}", "webhook-secret", secret)
        return _SEALED + base64.b64encode(blob).decode()

    def _item(self, row: tuple[Any, ...]) -> Item:
        secret: str | None = row[5]
        if secret is not None and secret.startswith(_SEALED):
            if self._sealer is None:
                raise RuntimeError("this secret is sealed, and this process has no secrets key to open it")
            secret = self._sealer.decrypt(
                f"{row[0]}:{row[1]}", "webhook-secret", base64.b64decode(secret[len(_SEALED) :])
            )
        return Item(row[0], row[1], row[2], row[3], json.loads(row[4]), secret, row[6], row[7], row[8])

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    async def create(
        self, kind: Kind, org: str | None, name: str, doc: dict[str, Any], secret: str | None, by: str, at: datetime
    ) -> Item:
        item_id = str(uuid.uuid4())
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    f"INSERT INTO delivery_config ({_COLUMNS.replace('::text', '')}) "
                    f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                    (kind, item_id, org, name, json.dumps(doc), self._seal(kind, item_id, secret), by, at, at),
                )
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise NameInUse(f"a {kind} named {name!r} already exists") from exc
        assert row is not None
        return self._item(row)

    async def get(self, kind: Kind, org: str | None, item_id: str) -> Item | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM delivery_config WHERE kind = %s AND id = %s AND org IS NOT DISTINCT FROM %s",
                (kind, item_id, org),
            )
            row = await cur.fetchone()
        return self._item(row) if row else None

    async def list_all(self, kind: Kind, org: str | None) -> list[Item]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM delivery_config WHERE kind = %s AND org IS NOT DISTINCT FROM %s "
                "ORDER BY name, id",
                (kind, org),
            )
            rows = await cur.fetchall()
        return [self._item(r) for r in rows]

    async def update(
        self,
        kind: Kind,
        org: str | None,
        item_id: str,
        name: str,
        doc: dict[str, Any],
        secret: str | None,
        at: datetime,
    ) -> Item | None:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "UPDATE delivery_config SET name = %s, doc = %s, secret = %s, updated_at = %s "
                    f"WHERE kind = %s AND id = %s AND org IS NOT DISTINCT FROM %s RETURNING {_COLUMNS}",
                    (name, json.dumps(doc), self._seal(kind, item_id, secret), at, kind, item_id, org),
                )
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise NameInUse(f"a {kind} named {name!r} already exists") from exc
        return self._item(row) if row else None

    async def delete(self, kind: Kind, org: str | None, item_id: str) -> bool:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM delivery_config WHERE kind = %s AND id = %s AND org IS NOT DISTINCT FROM %s RETURNING 1",
                (kind, item_id, org),
            )
            return await cur.fetchone() is not None

    async def existing(self, kind: Kind, org: str | None, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id FROM delivery_config WHERE kind = %s AND id = ANY(%s) AND org IS NOT DISTINCT FROM %s",
                (kind, ids, org),
            )
            return {r[0] for r in await cur.fetchall()}

    async def used_by(self, kind: Kind, org: str | None, item_id: str) -> list[tuple[str, str]]:
        """(id, name) of the live pipelines of `org` whose current definition deploys with this
        environment or component: a typed `deploy` stage's config, or a `deploy` step's config in
        a stage of jobs. From the pipelines read model (deleted pipelines have no row there)."""
        key = {"environment": "environmentId", "component": "componentId"}.get(kind)
        if key is None:
            return []
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT p.id, p.name FROM rm_pipelines p WHERE p.org IS NOT DISTINCT FROM %(org)s AND EXISTS ("
                "  SELECT 1 FROM jsonb_array_elements(coalesce(p.state::jsonb -> 'stages', '[]')) s"
                "  WHERE (s ->> 'type' = 'deploy' AND s -> 'config' ->> %(key)s = %(id)s) OR EXISTS ("
                "    SELECT 1 FROM jsonb_array_elements(coalesce(s -> 'jobs', '[]')) j,"
                "                  jsonb_array_elements(coalesce(j -> 'steps', '[]')) st"
                "    WHERE st ->> 'kind' = 'deploy' AND st -> 'config' ->> %(key)s = %(id)s)"
                ") ORDER BY p.name, p.id",
                {"org": org, "key": key, "id": item_id},
            )
            return [(r[0], r[1]) for r in await cur.fetchall()]

    async def channel(self, org: str | None, name: str) -> Item | None:
        """The channel called `name` (`#deploys` and `deploys` are the same), or with that id."""
        bare = name.removeprefix("#")
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM delivery_config WHERE kind = 'channel' AND org IS NOT DISTINCT FROM %s "
                "AND (name = %s OR ltrim(name, '#') = %s OR id = %s) ORDER BY (name = %s) DESC LIMIT 1",
                (org, name, bare, name, name),
            )
            row = await cur.fetchone()
        return self._item(row) if row else None


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def env_lock_key(environment_id: str) -> int:
    digest = hashlib.sha256(f"pipelines-environment:{environment_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass
class DeliveryOptions:
    notify_attempts: int = 4
    # Seconds before the second delivery attempt; each later wait doubles.
    notify_backoff: float = 1.0
    http_timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryOptions:
        """PIPELINES_NOTIFY_MAX_ATTEMPTS, PIPELINES_NOTIFY_BACKOFF and PIPELINES_NOTIFY_TIMEOUT."""
        return cls(
            notify_attempts=settings.notify_max_attempts,
            notify_backoff=settings.notify_backoff,
            http_timeout=settings.notify_timeout,
        )


async def post_json(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        response = await client.post(url, content=body, headers={"Content-Type": "application/json", **headers})
        return response.status_code, response.text[:500]


def _approval(state: rn.RunState) -> tuple[str | None, datetime | None]:
    approved = [a for a in state.approvals if a.decision == "approved"]
    return (approved[-1].by, approved[-1].at) if approved else (None, None)


class Deliveries:
    """The executor's deploy and notify stages."""

    def __init__(
        self,
        commands: Commands,
        pool: AsyncConnectionPool,
        database_url: str,
        nc: NATS | None,
        options: DeliveryOptions | None = None,
        sealer: SecretStore | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        """`options` wins; else `settings` (the PIPELINES_NOTIFY_* variables); else the defaults."""
        self.commands = commands
        self.registry = Registry(pool, sealer)
        self.database_url = database_url
        self.nc = nc
        if options is None:
            options = DeliveryOptions.from_settings(settings) if settings is not None else DeliveryOptions()
        self.options = options

    async def _append(
        self,
        deployment_id: str,
        events: list[dp.DeploymentEvent],
        expected: int | None,
        org: str | None,
        pipeline_id: str,
        run_id: str,
    ) -> None:
        await self.commands.store.append(
            ev.deployment_stream(deployment_id),
            [NewEvent(self.commands.new_id(), e, org=org, pipeline_id=pipeline_id, run_id=run_id) for e in events],
            expected,
        )
        self.commands.notify_appended()

    async def _record(
        self, state: rn.RunState, deployment_id: str, event: dp.DeploymentEvent, expected: int | None
    ) -> None:
        await self._append(deployment_id, [event], expected, state.organization_id, state.pipeline_id, state.run_id)

    async def load_deployment(self, deployment_id: str) -> tuple[dp.DeploymentState, int]:
        state, version = dp.initial_state, 0
        for rec in await self.commands.store.read_stream(ev.deployment_stream(deployment_id)):
            e = rec.event
            if ev.is_deployment_event(e):
                state = dp.evolve(state, e)
            version = rec.stream_version
        return state, version

    # ---- closing deployments whose executor is gone -------------------------------------------

    async def _close(self, deployment_id: str, reason: str) -> bool:
        """Record the deployment as failed with `reason` unless it has finished (the deployment
        decider); True when this call closed it. A lost race re-reads and decides again."""
        for _ in range(10):
            state, version = await self.load_deployment(deployment_id)
            new = dp.decide(
                dp.AbandonDeployment(deployment_id=deployment_id, reason=reason, at=self.commands.now()), state
            )
            if not new:
                return False
            try:
                await self._append(deployment_id, new, version, state.organization_id, state.pipeline_id, state.run_id)
                return True
            except WrongExpectedVersion:
                continue
        raise RuntimeError(f"deployment {deployment_id}: too many concurrent writers")

    async def _deployments_of(self, run_id: str, stage_id: str, attempt: int | None) -> list[str]:
        """The deployments a stage of a run has queued (from the event store, not the read model,
        which may lag); the decider then skips those that have finished."""
        async with self.registry.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT stream_id FROM events WHERE run_id = %s AND event_type = 'deployment_queued' "
                "AND data->>'stage_id' = %s AND (%s::int IS NULL OR (data->>'attempt')::int = %s::int) "
                "ORDER BY position",
                (run_id, stage_id, attempt, attempt),
            )
            rows = await cur.fetchall()
        return [str(r[0]).removeprefix("deployment-") for r in rows]

    async def abandon(self, run_id: str, stage_id: str, reason: str, *, attempt: int | None = None) -> list[str]:
        """Record every unfinished deployment of this run's stage (of that attempt, when given) as
        failed with `reason`: its executor died. Nothing to release: a dead executor's environment
        lock, and its place in the environment's queue, went with its database session. Safe to
        call again, and when the stage never deployed. Returns the ids of the deployments it closed."""
        return [d for d in await self._deployments_of(run_id, stage_id, attempt) if await self._close(d, reason)]

    async def close_orphans(self, older_than: float = 0.0, limit: int = 100) -> list[str]:
        """A sweep: close the deployments still queued or running (per the read model, then checked
        on the event store) whose run stage is no longer running that attempt: the stage finished,
        failed or moved on to a retry without them. `older_than`: seconds since queued. Returns the
        ids closed."""
        since = self.commands.now() - timedelta(seconds=older_than)
        async with self.registry.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, doc->>'runId', doc->>'stageId', (doc->>'attempt')::int FROM rm_deployments "
                "WHERE status IN ('queued', 'running') AND queued_at <= %s ORDER BY queued_at LIMIT %s",
                (since, limit),
            )
            rows = await cur.fetchall()
        closed: list[str] = []
        runs: dict[str, rn.RunState] = {}
        for deployment_id, run_id, stage_id, attempt in rows:
            if run_id not in runs:
                runs[run_id], _ = await self.commands.load_run(run_id)
            state = runs[run_id]
            try:
                sr = state.stage_runs[state.stage_index(stage_id)] if state.exists else None
            except Refused:
                sr = None
            if sr is not None and sr.status == "running" and (sr.attempt == attempt or sr.jobs):
                continue  # its executor is (as far as we know) still at it (a step's attempts are its own)
            where = f"stage {stage_id} of run {run_id}"
            reason = (
                f"executor lost: {where} is {sr.status} (attempt {sr.attempt}) but this deployment never finished"
                if sr is not None
                else f"executor lost: {where} does not exist"
            )
            if await self._close(deployment_id, reason):
                closed.append(deployment_id)
        return closed

    # ---- deploy ------------------------------------------------------------------------------

    async def deploy(
        self, state: rn.RunState, stage: Stage, attempt: int, log: Log, run_command: RunCommand
    ) -> ScriptOutcome:
        org = state.organization_id
        env_id = str(stage.config.get("environmentId", ""))
        component_id = str(stage.config.get("componentId", ""))
        environment = await self.registry.get("environment", org, env_id)
        if environment is None:
            return ScriptOutcome(exit_code=None, error=f"environment {env_id} not found in this organization")
        component = await self.registry.get("component", org, component_id)
        if component is None:
            return ScriptOutcome(exit_code=None, error=f"component {component_id} not found in this organization")
        deployer = environment.doc.get("deployer") or {}
        kind = str(deployer.get("type", ""))
        deployment_id = self.commands.new_id()
        approved_by, approved_at = _approval(state)
        await self._record(
            state,
            deployment_id,
            DeploymentQueued(
                deployment_id=deployment_id,
                organization_id=org,
                environment_id=environment.id,
                environment_name=environment.name,
                component_id=component.id,
                component_name=component.name,
                run_id=state.run_id,
                pipeline_id=state.pipeline_id,
                stage_id=stage.id,
                attempt=attempt,
                definition_version=state.definition_version,
                version=state.variables.get("VERSION"),
                deployer=kind,
                triggered_by=state.triggered_by,
                approved_by=approved_by,
                approved_at=approved_at,
                at=self.commands.now(),
            ),
            0,
        )
        target = f"{component.name} to {environment.name}"
        log("stdout", f"deployment {deployment_id}: {target} through the {kind} deployer")
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True, application_name=f"pipelines-deploy {deployment_id}"[:63]
        ) as lock:
            key = env_lock_key(environment.id)
            try:
                # The server notices a vanished client (its host lost) within about half a minute,
                # and ends the session, which frees the lock (ignored on a Unix socket).
                await lock.execute(
                    "SELECT set_config('tcp_keepalives_idle', '15', false), "
                    "set_config('tcp_keepalives_interval', '5', false), set_config('tcp_keepalives_count', '3', false)"
                )
                cur = await lock.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                row = await cur.fetchone()
                if not (row and row[0]):
                    log("stdout", f"queued: another deployment to {environment.name} is in progress")
                    await lock.execute("SELECT pg_advisory_lock(%s)", (key,))
                try:
                    await self._record(
                        state, deployment_id, DeploymentStarted(deployment_id=deployment_id, at=self.commands.now()), 1
                    )
                except WrongExpectedVersion:
                    closed, _ = await self.load_deployment(deployment_id)
                    error = f"deployment {deployment_id} was closed while it waited: {closed.error or closed.status}"
                    log("system", error)
                    return ScriptOutcome(exit_code=None, error=error)
                outcome, detail = await self._run_deployer(
                    kind, deployer, environment, deployment_id, component.id, state, log, run_command
                )
                if outcome.succeeded:
                    log("stdout", f"deployment {deployment_id} succeeded: {target}")
                    done: dp.DeploymentEvent = DeploymentSucceeded(
                        deployment_id=deployment_id, detail=detail, at=self.commands.now()
                    )
                else:
                    error = outcome.error or (
                        "the deploy command timed out"
                        if outcome.timed_out
                        else "the deploy command was stopped"
                        if outcome.killed
                        else f"the deploy command exited with code {outcome.exit_code}"
                    )
                    log("stdout", f"deployment {deployment_id} failed: {error}")
                    done = DeploymentFailed(deployment_id=deployment_id, error=error, at=self.commands.now())
                    outcome = ScriptOutcome(
                        exit_code=outcome.exit_code,
                        timed_out=outcome.timed_out,
                        killed=outcome.killed,
                        error=f"deployment of {target} failed: {error}",
                    )
                try:
                    await asyncio.shield(self._record(state, deployment_id, done, 2))
                except WrongExpectedVersion:
                    # Closed meanwhile (this executor was taken for lost): the history keeps that.
                    closed, _ = await self.load_deployment(deployment_id)
                    error = f"deployment {deployment_id} was closed meanwhile: {closed.error or closed.status}"
                    log("system", error)
                    outcome = ScriptOutcome(exit_code=outcome.exit_code, error=error)
            except asyncio.CancelledError:
                # Queued or running: either way it is closed as failed (once, by the decider).
                await asyncio.shield(self._close(deployment_id, "the executor stopped"))
                raise
            finally:
                with contextlib.suppress(Exception):  # closing the connection releases it anyway
                    await lock.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return outcome

    async def _run_deployer(
        self,
        kind: str,
        deployer: dict[str, Any],
        environment: Item,
        deployment_id: str,
        component_id: str,
        state: rn.RunState,
        log: Log,
        run_command: RunCommand,
    ) -> tuple[ScriptOutcome, str | None]:
        if kind == "command":
            extra = {
                "COMPONENT_ID": component_id,
                "ENVIRONMENT_ID": environment.id,
                "DEPLOYMENT_ID": deployment_id,
                "RUN_ID": state.run_id,
                "PIPELINE_ID": state.pipeline_id,
            }
            outcome = await run_command(str(deployer.get("command", "")), extra)
            return outcome, None if outcome.exit_code is None else f"exit code {outcome.exit_code}"
        if kind == "webhook":
            url = str(deployer.get("url", ""))
            body = _enc.encode(
                {
                    "deploymentId": deployment_id,
                    "componentId": component_id,
                    "environmentId": environment.id,
                    "runId": state.run_id,
                    "pipelineId": state.pipeline_id,
                    "organizationId": state.organization_id,
                    "definitionVersion": state.definition_version,
                    "variables": state.variables,
                }
            )
            headers = {SIGNATURE_HEADER: sign(environment.secret, body)} if environment.secret else {}
            try:
                status, text = await post_json(url, body, headers, self.options.http_timeout)
            except httpx.HTTPError as exc:
                return ScriptOutcome(exit_code=None, error=f"POST {url} failed: {exc!r}"), None
            log("stdout", f"POST {url}: HTTP {status}" + (f": {text}" if text else ""))
            if 200 <= status < 300:
                return ScriptOutcome(exit_code=0), f"HTTP {status}"
            return ScriptOutcome(exit_code=None, error=f"POST {url} answered HTTP {status}"), f"HTTP {status}"
        return ScriptOutcome(exit_code=None, error=f"environment {environment.name} has no usable deployer"), None

    # ---- notify ------------------------------------------------------------------------------

    async def notify(
        self, state: rn.RunState, stage: Stage, log: Log, extra: dict[str, Any] | None = None
    ) -> ScriptOutcome:
        """`extra`: more of the expression context (a step of a job: its matrix, jobs, steps...)."""
        org = state.organization_id
        channel_name = str(stage.config.get("channel", ""))
        pipeline, _ = await self.commands.load_pipeline(state.pipeline_id)
        context = {
            **(extra or {}),
            "run": {
                "id": state.run_id,
                "status": state.status,
                "pipelineId": state.pipeline_id,
                "organizationId": org,
                "definitionVersion": state.definition_version,
                "triggeredBy": state.triggered_by,
                "trigger": state.trigger,
                "variables": state.variables,
                "createdAt": iso(state.created_at),
                "startedAt": iso(state.started_at),
            },
            "pipeline": {
                "id": pipeline.pipeline_id,
                "name": pipeline.name,
                "description": pipeline.description,
                "organizationId": pipeline.organization_id,
                "definitionVersion": pipeline.definition_version,
            },
        }
        try:
            message = interpolate(str(stage.config.get("message", "")), context)
        except ExpressionError as exc:
            return ScriptOutcome(exit_code=None, error=f"config.message: {exc}")
        payload = {
            "channel": channel_name,
            "message": message,
            "runId": state.run_id,
            "pipelineId": state.pipeline_id,
            "pipelineName": pipeline.name,
            "organizationId": org,
            "status": state.status,
            "sentAt": iso(self.commands.now()),
        }
        body = _enc.encode(payload)
        if self.nc is not None:
            subject = notify_subject(org, channel_name)
            try:
                await self.nc.publish(subject, body)
                log("stdout", f"published on {subject}")
            except Exception as exc:
                log("system", f"publishing on {subject} failed: {exc}")
        channel = await self.registry.channel(org, channel_name)
        if channel is None:
            return ScriptOutcome(
                exit_code=None,
                error=f"no notifier is configured for channel {channel_name!r}: create one with POST /api/v1/channels",
            )
        kind = channel.doc.get("type")
        url = str(channel.doc.get("url", ""))
        out = _enc.encode({"text": message}) if kind == "slack" else body
        headers = {SIGNATURE_HEADER: sign(channel.secret, out)} if channel.secret else {}
        attempts = max(1, self.options.notify_attempts)
        problem = ""
        for i in range(attempts):
            try:
                status, text = await post_json(url, out, headers, self.options.http_timeout)
                if 200 <= status < 300:
                    log("stdout", f"notification sent to {channel.name} ({kind}): HTTP {status} (attempt {i + 1})")
                    return ScriptOutcome(exit_code=0)
                problem = f"HTTP {status}" + (f": {text[:200]}" if text else "")
            except httpx.HTTPError as exc:
                problem = repr(exc)
            log("stdout", f"delivery to {channel.name} failed (attempt {i + 1} of {attempts}): {problem}")
            if i + 1 < attempts:
                await asyncio.sleep(self.options.notify_backoff * (2**i))
        return ScriptOutcome(
            exit_code=None, error=f"notification to {channel.name} failed after {attempts} attempts: {problem}"
        )
