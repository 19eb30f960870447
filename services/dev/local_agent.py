"""`make up`'s local agent: one agent on this machine (shared by every organization), so that a
job with `runsOn` naming its labels runs without anyone issuing an agent. Its credentials are made
once and kept (`<data_dir>/nats-users/agent-local.json`, 0600, the same JSON `POST /api/v1/agents`
answers); the supervisor keeps its row in the agents table (which makes it a broker user).

PIPELINES_LOCAL_AGENT_LABELS (comma-separated; default `local,<os>,<machine>`, say
local,linux,x86_64) and PIPELINES_LOCAL_AGENT_CAPACITY (default: the number of CPUs) describe it."""

from __future__ import annotations

import json
import os
import platform
import secrets
from collections.abc import Mapping
from pathlib import Path

import bcrypt
import psycopg

from infra.broker.credentials import CHANGED_CHANNEL
from services.dev.files import write_private

__all__ = ["LOCAL_AGENT", "prepare_local_agent", "upsert_local_agent"]

LOCAL_AGENT = "ag_local"
FILE = "agent-local.json"


def _labels(env: Mapping[str, str]) -> list[str]:
    raw = env.get("PIPELINES_LOCAL_AGENT_LABELS")
    if raw:
        return sorted({label.strip() for label in raw.split(",") if label.strip()})
    return sorted({"local", platform.system().lower() or "unknown", platform.machine().lower() or "unknown"})


def prepare_local_agent(
    data_dir: Path,
    servers: list[str],
    env: Mapping[str, str],
    *,
    agent_id: str = LOCAL_AGENT,
    name: str = "local",
    extra_labels: tuple[str, ...] = (),
) -> Path:
    """Write the local agent's credential file (its password kept across restarts); its path.
    `make up-cluster` runs two (`agent_id`s `ag_local`, `ag_local_2`), told apart by `extra_labels`."""
    path = data_dir / "nats-users" / (FILE if agent_id == LOCAL_AGENT else f"agent-{name}.json")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = ""
    try:
        password = str(json.loads(path.read_text(encoding="utf-8")).get("password", ""))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        capacity = max(1, int(env.get("PIPELINES_LOCAL_AGENT_CAPACITY") or os.cpu_count() or 2))
    except ValueError:
        capacity = os.cpu_count() or 2
    creds = {
        "id": agent_id,
        "name": name,
        "organizationId": None,
        "shared": True,
        "labels": sorted({*_labels(env), *extra_labels}),
        "capacity": capacity,
        "servers": servers,
        "user": agent_id,
        "password": password or secrets.token_urlsafe(32),
    }
    write_private(path, json.dumps(creds, indent=1))
    return path


def upsert_local_agent(conn: psycopg.Connection[tuple[str, str]], path: Path) -> None:
    """Make the agents table say what the file says (raises psycopg.errors.UndefinedTable before the
    API's migrations ran)."""
    creds = json.loads(path.read_text(encoding="utf-8"))
    hashed = bcrypt.hashpw(creds["password"].encode(), bcrypt.gensalt(10)).decode()
    conn.execute(
        "INSERT INTO agents (id, org, name, labels, capacity, password_hash, created_by) "
        "VALUES (%s, NULL, %s, %s, %s, %s, 'make up') ON CONFLICT (id) DO UPDATE SET "
        "labels = EXCLUDED.labels, capacity = EXCLUDED.capacity, password_hash = EXCLUDED.password_hash, "
        "revoked_at = NULL",
        (creds["id"], creds["name"], creds["labels"], creds["capacity"], hashed),
    )
    conn.execute(f"NOTIFY {CHANGED_CHANNEL}")
