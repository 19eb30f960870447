"""Who may publish and subscribe to what on the broker: the least-privileged set of each service, and
the read-only set of a downstream organization's credentials."""

from __future__ import annotations

from dataclasses import dataclass

from infra.broker.bus import APPENDED_SUBJECT, EVENTS_SUBJECTS, RUN_WAKE_SUBJECT, token
from infra.broker.creds import inbox_prefix

__all__ = [
    "ADMIN",
    "EXECUTOR_CONSUMER",
    "SERVICES",
    "Permissions",
    "agent_permissions",
    "inbox_prefix",
    "org_consumer",
    "org_permissions",
    "org_subjects",
    "service_permissions",
]

SERVICES = ("api", "relay", "executor", "gateway", "projector")
# Everything: for operators and the tests' own checks, never given to a service.
ADMIN = "admin"
# The executor's durable consumer (infra/executor/consumer.py binds to it by this name).
EXECUTOR_CONSUMER = "executor"
_LOGS = "pipelines.logs.v1"
_NOTIFY = "pipelines.notify.v1"
_AGENTS = "pipelines.agents.v1"  # infra/agent/protocol.py


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def service_permissions(service: str, stream: str = "*") -> Permissions:
    """What `service` (one of SERVICES, or ADMIN) needs on events stream `stream` (`*`: any stream,
    for a server shared by several systems, as the tests' is)."""
    api = f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}"  # ensure_events_stream
    inbox = f"{inbox_prefix(service)}.>"
    if service == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",))
    if service == "api":
        # It creates and deletes the durable pull consumers of the broker credentials it issues (on
        # the events stream, which it makes sure exists: the relay may not have started yet).
        consumers = f"$JS.API.CONSUMER.CREATE.{stream}.*.>", f"$JS.API.CONSUMER.DELETE.{stream}.*"
        wakes = f"{RUN_WAKE_SUBJECT}.{stream}.*"
        return Permissions(publish=(APPENDED_SUBJECT, wakes, *consumers, *api), subscribe=(inbox,))
    if service == "relay":
        return Permissions(
            publish=(EVENTS_SUBJECTS, *api, f"$JS.API.STREAM.MSG.GET.{stream}"),
            subscribe=(APPENDED_SUBJECT, inbox),
        )
    if service == "executor":
        consumer = f"{stream}.{EXECUTOR_CONSUMER}"
        return Permissions(
            publish=(
                f"{_LOGS}.>",
                f"{_NOTIFY}.>",
                APPENDED_SUBJECT,
                *api,
                f"$JS.API.CONSUMER.INFO.{consumer}",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{consumer}",
                f"$JS.API.CONSUMER.MSG.NEXT.{consumer}",
                f"$JS.ACK.{consumer}.>",
                f"{_AGENTS}.*.work",  # units handed to agents
            ),
            subscribe=(
                "pipelines.v1.*.run.*.run_stopped",
                f"{RUN_WAKE_SUBJECT}.{stream}.*",
                inbox,
                # the agents' reports and presence (infra/agent/protocol.py)
                f"{_AGENTS}.*.report.*",
                f"{_AGENTS}.*.presence",
            ),
        )
    if service == "gateway":
        return Permissions(
            publish=(
                *api,
                f"$JS.API.STREAM.MSG.GET.{stream}",
                # its ordered consumers (ephemeral, recreated after a gap) and their flow control
                f"$JS.API.CONSUMER.CREATE.{stream}",
                f"$JS.API.CONSUMER.CREATE.{stream}.>",
                f"$JS.API.CONSUMER.DELETE.{stream}.*",
                f"$JS.API.CONSUMER.INFO.{stream}.*",
                f"$JS.FC.{stream}.>",
            ),
            subscribe=(inbox,),
        )
    if service == "projector":
        return Permissions(publish=(), subscribe=(APPENDED_SUBJECT, inbox))
    raise ValueError(f"unknown service {service!r}")


def org_subjects(org: str) -> tuple[str, str, str]:
    """The subjects of one organization: its events, its log lines, its notifications."""
    o = token(org)
    return f"pipelines.v1.{o}.>", f"{_LOGS}.{o}.>", f"{_NOTIFY}.{o}.>"


def org_consumer(user: str) -> str:
    """The one durable consumer of a downstream credential (the API creates it, the credential reads
    it): a name of its own, so that it can never pull from another's (the executor's sees every
    organization)."""
    return token(user)


def org_permissions(org: str, stream: str, user: str) -> Permissions:
    """Read-only: subscribe to the organization's subjects, and inspect, read and ack its own durable
    pull consumer, which the API creates (filtered to the organization's events) when it issues the
    credential. No consumer create: NATS does not check a push consumer's deliver subject against the
    creator's permissions, so a credential that could create one could have its events delivered
    onto another organization's subjects."""
    events, logs, notify = org_subjects(org)
    consumer = f"{stream}.{org_consumer(user)}"
    return Permissions(
        publish=(
            f"$JS.API.CONSUMER.INFO.{consumer}",
            f"$JS.API.CONSUMER.MSG.NEXT.{consumer}",
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.ACK.{consumer}.>",
        ),
        subscribe=(events, logs, notify, f"{inbox_prefix(user)}.>"),
    )


def agent_permissions(agent: str) -> Permissions:
    """An agent hears only the units handed to it and speaks only as itself: no events, no logs, no
    JetStream, no inbox (it makes no requests). `agent` is its id, which is also its user name."""
    a = token(agent)
    return Permissions(
        publish=(f"{_AGENTS}.{a}.report.*", f"{_AGENTS}.{a}.presence"),
        subscribe=(f"{_AGENTS}.{a}.work",),
    )
