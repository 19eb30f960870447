"""What an agent process is given: its credential file (the JSON `POST /api/v1/agents` answered:
servers, user, password, id, labels, capacity) and where it runs scripts. Never a database URL."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from infra.config import Settings

__all__ = ["AgentConfig", "AgentConfigError"]


class AgentConfigError(ValueError):
    """The agent cannot start: the message says what is missing (never a password)."""


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    id: str
    servers: tuple[str, ...]
    user: str
    password: str
    labels: tuple[str, ...]
    capacity: int
    work_root: Path
    # The script settings of this host (PIPELINES_SCRIPT_*, PIPELINES_LEASE_TTL, ...): the sandbox
    # is the agent host's own business.
    settings: Settings

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AgentConfig:
        e = dict(os.environ if env is None else env)
        path = e.get("PIPELINES_AGENT_CREDS")
        if not path:
            raise AgentConfigError(
                "PIPELINES_AGENT_CREDS is not set: it names the file with the JSON POST /api/v1/agents "
                "(or `pipelines agents create`) answered"
            )
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            ident, user, password = str(raw["id"]), str(raw["user"]), str(raw["password"])
            servers = tuple(str(s) for s in raw["servers"])
            labels = tuple(str(label) for label in raw.get("labels", []))
            capacity = int(raw.get("capacity", 1))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AgentConfigError(
                f"{path} is not an agent credential file ({exc.__class__.__name__}): expected the JSON "
                "of POST /api/v1/agents"
            ) from None
        if e.get("PIPELINES_AGENT_SERVERS"):
            servers = tuple(s.strip() for s in e["PIPELINES_AGENT_SERVERS"].split(",") if s.strip())
        # The service settings without their servers: an agent reads no `make up` stack file (which
        # names the database) and connects to the broker only, with its own credentials.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no JWT secret: an agent checks no tokens
            settings = replace(
                Settings.from_env({**e, "PIPELINES_DATABASE_URL": "-", "PIPELINES_NATS_URL": "-"}),
                database_url="",
                nats_url="",
            )
        work = e.get("PIPELINES_AGENT_WORK_DIR")
        return cls(
            id=ident,
            servers=servers,
            user=user,
            password=password,
            labels=labels,
            capacity=max(1, capacity),
            work_root=Path(work) if work else settings.data_dir / "agents" / ident,
            settings=settings,
        )
