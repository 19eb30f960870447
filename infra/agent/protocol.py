"""What the control plane (the executor, which has the database) and an agent (which has not) say
to each other over NATS, and on which subjects.

An agent subscribes to its own work subject only, and publishes on its own report and presence
subjects only (its broker permissions say so: infra/broker/permissions.py): the agent id in the
subject of a report is the broker's word for who sent it, never the payload's.

    pipelines.agents.v1.<agent>.work                 executor -> agent: Assign, Cancel, Renewed, RunEnded
    pipelines.agents.v1.<agent>.report.<executor>    agent -> that executor: Accepted, Refused, Lines,
                                                     Finished, Renew
    pipelines.agents.v1.<agent>.presence             agent -> every executor: Presence (each second)
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "AGENTS",
    "Accepted",
    "Assign",
    "Cancel",
    "Finished",
    "Lines",
    "Presence",
    "Refused",
    "Renew",
    "Renewed",
    "Report",
    "RunEnded",
    "Work",
    "decode_report",
    "decode_work",
    "encode",
    "presence_subject",
    "report_subject",
    "work_subject",
]

AGENTS = "pipelines.agents.v1"

Stream = Literal["stdout", "stderr", "system"]


def work_subject(agent: str) -> str:
    return f"{AGENTS}.{agent}.work"


def report_subject(agent: str, executor: str) -> str:
    return f"{AGENTS}.{agent}.report.{executor}"


def presence_subject(agent: str) -> str:
    return f"{AGENTS}.{agent}.presence"


# ---- executor -> agent ---------------------------------------------------------------------


class Assign(msgspec.Struct, frozen=True, kw_only=True, tag="assign"):
    """A unit of work with everything needed to run it: the command with its expressions already
    rendered, its environment with the run's secrets already resolved, its timeout."""

    unit: str  # the dispatch id: names this attempt of this unit on this agent, never reused
    executor: str
    run_id: str
    org: str | None
    key: str
    attempt: int
    command: str
    env: dict[str, str]
    timeout: float
    kill_grace: float


class Cancel(msgspec.Struct, frozen=True, kw_only=True, tag="cancel"):
    unit: str


class Renewed(msgspec.Struct, frozen=True, kw_only=True, tag="renewed"):
    """The answer to a Renew: the units the executor still gives this agent; any other the agent
    runs for it is an orphan, which the agent kills."""

    asked: list[str]
    valid: list[str]


class RunEnded(msgspec.Struct, frozen=True, kw_only=True, tag="run_ended"):
    run_id: str


Work = Assign | Cancel | Renewed | RunEnded

# ---- agent -> executor ---------------------------------------------------------------------


class Accepted(msgspec.Struct, frozen=True, kw_only=True, tag="accepted"):
    unit: str


class Refused(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    unit: str
    reason: str


class Lines(msgspec.Struct, frozen=True, kw_only=True, tag="lines"):
    unit: str
    attempt: int
    lines: list[tuple[Stream, str]]


class Finished(msgspec.Struct, frozen=True, kw_only=True, tag="finished"):
    unit: str
    attempt: int
    exit_code: int | None
    timed_out: bool = False
    killed: bool = False
    error: str | None = None


class Renew(msgspec.Struct, frozen=True, kw_only=True, tag="renew"):
    units: list[str]


Report = Accepted | Refused | Lines | Finished | Renew


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    labels: list[str]
    capacity: int
    running: int


_work = msgspec.json.Decoder(Work)
_report = msgspec.json.Decoder(Report)
encode = msgspec.json.Encoder().encode


def decode_work(data: bytes) -> Work:
    return _work.decode(data)


def decode_report(data: bytes) -> Report:
    return _report.decode(data)


def decode_presence(data: bytes) -> Presence:
    return msgspec.json.decode(data, type=Presence)
