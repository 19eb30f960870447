"""Who may publish and subscribe to what on the broker: the least-privileged set of each service, and
the read-only set of a downstream organization's credentials, which live in a NATS account of their own
that imports from the services' account only what their organization may see."""

from __future__ import annotations

from dataclasses import dataclass

from infra.broker.bus import APPENDED_SUBJECT, EVENTS_SUBJECTS, RUN_WAKE_SUBJECT, token
from infra.broker.creds import inbox_prefix

__all__ = [
    "ADMIN",
    "DOWNSTREAM_JS_PREFIX",
    "EXECUTOR_CONSUMER",
    "SERVICES",
    "SERVICE_ACCOUNT",
    "Import",
    "Permissions",
    "agent_permissions",
    "inbox_prefix",
    "org_consumer",
    "org_imports",
    "org_permissions",
    "org_subjects",
    "service_permissions",
]

SERVICES = ("api", "relay", "executor", "gateway", "projector")
# Everything: for operators and the tests' own checks, never given to a service.
ADMIN = "admin"
# The executor's durable consumer (infra/executor/consumer.py binds to it by this name).
EXECUTOR_CONSUMER = "executor"
# The NATS account of the services and `admin`: it holds the events stream.
SERVICE_ACCOUNT = "PIPELINES"
# The JetStream API of a downstream credential's consumer, as its own account names it (nats-py:
# `nc.jetstream(prefix=...)`). Not `$JS.API`: JetStream is off in that account, and there the server
# answers `$JS.API.>` itself ("JetStream not enabled for account") before any import could.
DOWNSTREAM_JS_PREFIX = "PIPELINES.JS.API"
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


@dataclass(frozen=True)
class Import:
    """A subject the services' account exports to one downstream account only, which imports it."""

    # as the services' account names it
    subject: str
    # as the downstream account names it
    to: str
    # request/reply, answered in the services' account; else messages flowing into the downstream account
    service: bool
    # a service whose one request gets many replies (a pull request's messages)
    streamed: bool = False


def org_imports(org: str, stream: str, user: str) -> tuple[Import, ...]:
    """All that downstream credential `user` of organization `org` reaches: its organization's three
    subject trees (flowing in, never out), and the JetStream API of its own durable pull consumer on
    `stream` (which the API creates, filtered to the organization's events): its description, pull
    requests, acks. Nothing it publishes reaches any other subject of the services' account, and what
    the services' account sends back to it (a pull request's messages on its reply subject, whatever that
    subject is) stays in its own account: no other organization's reader can ever receive it."""
    events, logs, notify = org_subjects(org)
    consumer = f"{stream}.{org_consumer(user)}"
    api = "$JS.API.CONSUMER"
    ours = f"{DOWNSTREAM_JS_PREFIX}.CONSUMER"
    return (
        *(Import(subject, subject, service=False) for subject in (events, logs, notify)),
        Import(f"{api}.INFO.{consumer}", f"{ours}.INFO.{consumer}", service=True),
        Import(f"{api}.MSG.NEXT.{consumer}", f"{ours}.MSG.NEXT.{consumer}", service=True, streamed=True),
        # a delivered message's reply subject, which its ack is published to
        Import(f"$JS.ACK.{consumer}.>", f"$JS.ACK.{consumer}.>", service=True),
    )


def org_permissions(org: str, stream: str, user: str) -> Permissions:
    """Within its own account, a downstream credential may publish only the requests its imports answer
    and subscribe only to its organization's subjects and its replies: another line of defence should an
    import ever be wider than meant. No consumer create (none is imported either): NATS does not check a
    push consumer's deliver subject against the creator's permissions."""
    imports = org_imports(org, stream, user)
    return Permissions(
        publish=tuple(i.to for i in imports if i.service),
        subscribe=(*(i.to for i in imports if not i.service), f"{inbox_prefix(user)}.>"),
    )


def agent_permissions(agent: str) -> Permissions:
    """An agent hears only the units handed to it and speaks only as itself: no events, no logs, no
    JetStream, no inbox (it makes no requests). `agent` is its id, which is also its user name."""
    a = token(agent)
    return Permissions(
        publish=(f"{_AGENTS}.{a}.report.*", f"{_AGENTS}.{a}.presence"),
        subscribe=(f"{_AGENTS}.{a}.work",),
    )
