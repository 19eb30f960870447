"""Downstream systems get read-only broker credentials for their own organization
(`POST /api/v1/broker-credentials`), used with nats-py against the embedded NATS, whose users the
supervisor's reconciler (services/dev/broker_users.py) keeps in step with the issued set."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import psycopg
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig

from infra.broker import bus
from services.dev.broker_users import IssuedUsers
from services.dev.nats import RunningNats
from tests import servers
from tests.integration.system import System

URL = "/api/v1/broker-credentials"


@pytest.fixture
def embedded(nats_url: str) -> RunningNats:
    server = servers.embedded_nats(nats_url)
    if server is None:
        pytest.skip("needs the embedded NATS, whose users we configure; PIPELINES_TEST_NATS_URL names another server")
    return server


@pytest.fixture
def reconciler(embedded: RunningNats, system: System) -> Iterator[RunningNats]:
    """What `make up`'s supervisor runs: the embedded server's users follow the issued credentials."""
    stop = threading.Event()
    issued = IssuedUsers(system.settings.database_url)

    def loop() -> None:
        while not stop.wait(0.05):
            issued.sync(embedded)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield embedded
    stop.set()
    thread.join(5)
    issued.close()
    embedded.set_issued_users(())


class Errors:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def record(self, exc: Exception) -> None:
        self.seen.append(str(exc))

    async def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.seen:
                if text.lower() in line.lower():
                    return line
            await asyncio.sleep(0.02)
        raise AssertionError(f"the server never reported {text!r}; it reported {self.seen}")


async def _connect(creds: dict[str, Any], errors: Errors, **options: Any) -> NATS:
    return await nats.connect(
        creds["servers"],
        user=creds["user"],
        password=creds["password"],
        inbox_prefix=creds["inboxPrefix"],
        error_cb=errors.record,
        allow_reconnect=False,
        connect_timeout=2,
        **options,
    )


async def _connect_when_accepted(
    server: RunningNats, creds: dict[str, Any], errors: Errors, timeout: float = 10.0, **options: Any
) -> NATS:
    """The reconciler adds the credential's account within moments of the POST: wait for it."""
    await _applied(server, creds, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await _connect(creds, errors, **options)
        except (NatsError, OSError):  # not a user yet (the refusal may arrive as a reset connection)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _applied(server: RunningNats, *issued: dict[str, Any], timeout: float = 10.0) -> None:
    """Wait until the reconciler has given every credential of `issued` its account and the server has
    reloaded: a connection made while the server reloads may be closed by the reload (it is in no
    account yet when the reload looks)."""
    deadline = time.monotonic() + timeout
    while not {creds["id"] for creds in issued} <= {account.name for account in server.issued}:
        assert time.monotonic() < deadline, "the reconciler never added the credentials"
        await asyncio.sleep(0.02)


async def _until_refused(creds: dict[str, Any], timeout: float) -> None:
    """Connect again and again until the server says `Authorization Violation` (a connection cut by
    the reload in between is no answer)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            other = await _connect(creds, Errors())
        except NatsError as exc:
            if "authorization violation" in str(exc).lower():
                return
        except OSError:
            pass
        else:
            await other.close()
        if time.monotonic() > deadline:
            raise AssertionError("the credential was still accepted")
        await asyncio.sleep(0.05)


async def _issue(system: System, org: str | None = None, **body: Any) -> dict[str, Any]:
    r = await system.client.post(URL, json=body or None, headers=system.headers("admin", org=org or True))
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_only_an_admin_issues_and_bad_fields_are_named(system: System) -> None:
    r = await system.client.post(URL, headers=system.headers("member"))
    assert r.status_code == 403, r.text
    r = await system.client.post(URL, json={"ttlSeconds": "soon", "scope": "all"}, headers=system.headers("admin"))
    assert r.status_code == 400, r.text
    assert "ttlSeconds" in r.text and "scope" in r.text
    r = await system.client.delete(f"{URL}/bc_nothing", headers=system.headers("admin"))
    assert r.status_code == 404, r.text


async def test_an_org_credential_reads_its_org_through_a_filtered_durable_consumer_and_nothing_else(
    system: System, reconciler: RunningNats
) -> None:
    org = system.org
    creds = await _issue(system, ttlSeconds=3600)
    assert creds["servers"] and all("@" not in s for s in creds["servers"])
    assert creds["subjects"]["events"] == f"pipelines.v1.{org}.>" and "expiresAt" in creds
    errors = Errors()
    nc = await _connect_when_accepted(reconciler, creds, errors)
    try:
        live: list[str] = []

        async def on_live(msg: Msg) -> None:
            live.append(msg.subject)

        await nc.subscribe(f"pipelines.v1.{org}.>", cb=on_live)
        js = nc.jetstream(prefix=creds["jsPrefix"])
        stream, consumer = creds["stream"], creds["consumer"]
        # Its durable consumer exists already (the API created it), filtered to its organization.
        created = await js.consumer_info(stream, consumer)
        assert created.config.filter_subject == creds["subjects"]["events"]
        pipeline = await system.create_pipeline([{"id": "s", "type": "script", "config": {"command": "echo hi"}}])
        run = await system.trigger(pipeline["id"])
        await system.wait_status(pipeline["id"], run["id"], "succeeded")

        sub = await js.pull_subscribe_bind(consumer, stream)
        subjects: list[str] = []
        deadline = time.monotonic() + 10
        while not any(s.endswith(".run_succeeded") for s in subjects) and time.monotonic() < deadline:
            try:
                for msg in await sub.fetch(50, timeout=1):
                    subjects.append(msg.subject)
                    await msg.ack_sync()  # acked for good before the consumer's state is read
            except TimeoutError:
                pass
        assert any(f".run.{run['id']}." in s for s in subjects), subjects
        assert all(s.startswith(f"pipelines.v1.{org}.") for s in subjects)
        assert any(s.endswith(".run_succeeded") for s in live), live
        # durable and resumable: its acks are kept for the next connection
        info = await js.consumer_info(stream, consumer)
        assert info.ack_floor is not None and info.ack_floor.stream_seq > 0 and info.num_ack_pending == 0

        # anything else is a permission error
        await nc.subscribe("pipelines.v1.org-other.>")
        await nc.subscribe("pipelines.logs.v1.>")
        await nc.subscribe("_INBOX.>")
        await nc.flush()
        await errors.wait_for('subscription to "pipelines.v1.org-other.>"')
        await errors.wait_for('subscription to "pipelines.logs.v1.>"')
        await errors.wait_for('subscription to "_INBOX.>"')
        for config in (
            # a push consumer delivering its own organization's events onto another organization's subject
            ConsumerConfig(
                name=consumer,
                durable_name=consumer,
                filter_subject=creds["subjects"]["events"],
                deliver_subject="pipelines.logs.v1.org-other.forged",
            ),
            ConsumerConfig(name=consumer, durable_name=consumer),  # unfiltered
            ConsumerConfig(name=consumer, durable_name=consumer, filter_subject="pipelines.v1.>"),
            ConsumerConfig(name=consumer, durable_name=consumer, filter_subject="pipelines.v1.org-other.>"),
            ConsumerConfig(name="mine", durable_name="mine", filter_subject=creds["subjects"]["events"]),
        ):
            with pytest.raises(Exception):  # noqa: B017 - the request is dropped: a timeout
                await js.add_consumer(stream, config, timeout=1)
        create = f"{creds['jsPrefix']}.CONSUMER.CREATE.{stream}.{consumer}"
        await errors.wait_for(f'publish to "{create}.{creds["subjects"]["events"]}"')
        await errors.wait_for(f'publish to "{create}"')
        await errors.wait_for(f'publish to "{create}.pipelines.v1.>"')
        await errors.wait_for(f'publish to "{create}.pipelines.v1.org-other.>"')
        with pytest.raises(Exception):  # noqa: B017 - the executor's consumer sees every organization
            executor = await js.pull_subscribe_bind("executor", stream)
            await executor.fetch(1, timeout=1)
        await errors.wait_for(f'publish to "{creds["jsPrefix"]}.CONSUMER.MSG.NEXT.{stream}.executor"')
        await nc.publish(f"pipelines.v1.{org}.run.{run['id']}.run_stopped", b"{}")
        await nc.publish("pipelines.internal.appended", b"")
        await nc.flush()
        await errors.wait_for(f'publish to "pipelines.v1.{org}.run.{run["id"]}.run_stopped"')
        await errors.wait_for('publish to "pipelines.internal.appended"')
    finally:
        await nc.close()


async def test_a_revoked_credential_is_disconnected_and_refused(system: System, reconciler: RunningNats) -> None:
    creds = await _issue(system)
    assert "expiresAt" not in creds
    errors = Errors()
    closed = asyncio.Event()
    nc = await _connect_when_accepted(reconciler, creds, errors, closed_cb=_setter(closed))
    assert nc.is_connected
    # another organization's admin cannot revoke it
    r = await system.client.delete(f"{URL}/{creds['id']}", headers=system.headers("admin", org="org-other"))
    assert r.status_code == 404, r.text
    r = await system.client.delete(f"{URL}/{creds['id']}", headers=system.headers("admin"))
    assert r.status_code == 204, r.text
    await asyncio.wait_for(closed.wait(), 10)  # the reload closed its open connection
    await _until_refused(creds, 10)
    r = await system.client.delete(f"{URL}/{creds['id']}", headers=system.headers("admin"))
    assert r.status_code == 404, r.text


def _setter(event: asyncio.Event) -> Any:
    async def cb() -> None:
        event.set()

    return cb


async def test_an_expired_credential_is_refused(system: System, reconciler: RunningNats) -> None:
    creds = await _issue(system, ttlSeconds=60)
    nc = await _connect_when_accepted(reconciler, creds, Errors())
    await nc.close()
    # a minute later (the clock moved on, as far as the table is concerned)
    async with await psycopg.AsyncConnection.connect(system.settings.database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE broker_credentials SET expires_at = now() - interval '1 second' WHERE id = %s", (creds["id"],)
        )
    await _until_refused(creds, 15)  # the supervisor re-reads the table every few seconds for expiries


@pytest.fixture
async def watcher(nats_url: str) -> AsyncIterator[NATS]:
    """A connection of the service account (the tests' admin): as the gateway, a notifier or any service
    reading an organization's core subjects would see them."""
    nc = await bus.connect(nats_url, "test-watcher")
    yield nc
    await nc.close()


class Heard:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    async def record(self, msg: Msg) -> None:
        self.messages.append((msg.subject, msg.reply))


async def _marker_arrives(publisher: NATS, subject: str, *listeners: Heard) -> None:
    """Publish a marker after everything else, and wait for it at each listener: what was sent before it
    and has not arrived never will (one server, in order)."""
    await publisher.publish(subject, b"marker")
    await publisher.flush()
    deadline = time.monotonic() + 10
    while not all(any(s == subject for s, _ in listener.messages) for listener in listeners):
        assert time.monotonic() < deadline, f"the marker {subject} never arrived"
        await asyncio.sleep(0.02)


async def test_a_pull_request_cannot_have_events_delivered_onto_another_organizations_subjects(
    system: System, reconciler: RunningNats, watcher: NATS
) -> None:
    org_a, org_b = system.org, f"org-b-{uuid.uuid4().hex[:8]}"
    creds_a = await _issue(system)
    creds_b = await _issue(system, org=org_b)
    stream, consumer = creds_a["stream"], creds_a["consumer"]
    pipeline = await system.create_pipeline([{"id": "s", "type": "script", "config": {"command": "echo hi"}}])
    run = await system.trigger(pipeline["id"])
    await system.wait_status(pipeline["id"], run["id"], "succeeded")
    victim_subjects = (f"pipelines.logs.v1.{org_b}.>", f"pipelines.notify.v1.{org_b}.>")
    # org B's readers: a service-account subscriber and B's own downstream credential
    service_side, downstream_b = Heard(), Heard()
    for subject in victim_subjects:
        await watcher.subscribe(subject, cb=service_side.record)
    await watcher.flush()
    await _applied(reconciler, creds_a, creds_b)
    nc_b = await _connect_when_accepted(reconciler, creds_b, Errors())
    nc_a = await _connect_when_accepted(reconciler, creds_a, Errors())
    try:
        for subject in victim_subjects:
            await nc_b.subscribe(subject, cb=downstream_b.record)
        await nc_b.flush()
        # The attack: raw pull requests for A's own consumer whose reply subject is one of B's core
        # subjects, through the API subjects as the credential was told and as plain JetStream names them.
        for prefix in {creds_a["jsPrefix"], "$JS.API"}:
            for reply in (f"pipelines.logs.v1.{org_b}.{run['id']}", f"pipelines.notify.v1.{org_b}.deploys"):
                await nc_a.publish(f"{prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}", b'{"batch": 1}', reply=reply)
        await nc_a.flush()
        # A's own consumer still serves A (after the forged requests, in order)
        sub = await nc_a.jetstream(prefix=creds_a["jsPrefix"]).pull_subscribe_bind(consumer, stream)
        subjects: list[str] = []
        deadline = time.monotonic() + 10
        while not any(s.endswith(".run_succeeded") for s in subjects) and time.monotonic() < deadline:
            try:
                for msg in await sub.fetch(50, timeout=1):
                    subjects.append(msg.subject)
                    await msg.ack()
            except TimeoutError:
                pass
        assert any(s.endswith(".run_succeeded") for s in subjects), subjects
        assert all(s.startswith(f"pipelines.v1.{org_a}.") for s in subjects), subjects
        # nothing reached B's readers: markers sent after the attack arrive alone
        markers = [(f"pipelines.logs.v1.{org_b}.marker", ""), (f"pipelines.notify.v1.{org_b}.marker", "")]
        for subject, _ in markers:
            await _marker_arrives(watcher, subject, service_side, downstream_b)
        assert service_side.messages == markers, service_side.messages
        assert downstream_b.messages == markers, downstream_b.messages
    finally:
        await nc_a.close()
        await nc_b.close()


async def test_an_org_credential_cannot_read_another_organization_nor_publish_to_the_services(
    system: System, reconciler: RunningNats, watcher: NATS
) -> None:
    org_a, org_b = system.org, f"org-b-{uuid.uuid4().hex[:8]}"
    creds_a = await _issue(system)
    creds_b = await _issue(system, org=org_b)
    stream = creds_a["stream"]
    # B has events of its own in the stream, and a consumer of its own
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": "b-secret", "stages": [{"id": "s", "type": "script", "config": {"command": "echo b"}}]},
        headers=system.headers("member", org=org_b),
    )
    assert r.status_code == 201, r.text
    await _applied(reconciler, creds_a, creds_b)
    errors = Errors()
    nc = await _connect_when_accepted(reconciler, creds_a, errors)
    try:
        # B's subjects: refused, and nothing arrives
        heard = Heard()
        for subject in (f"pipelines.v1.{org_b}.>", f"pipelines.logs.v1.{org_b}.>", f"pipelines.notify.v1.{org_b}.>"):
            await nc.subscribe(subject, cb=heard.record)
        await nc.flush()
        await errors.wait_for(f'subscription to "pipelines.logs.v1.{org_b}.>"')
        await watcher.publish(f"pipelines.logs.v1.{org_b}.r1", b"secret log line")
        await watcher.publish(f"pipelines.notify.v1.{org_b}.deploys", b"{}")
        # B's events through JetStream, with either API prefix: B's consumer, a message by sequence or
        # subject, a consumer of its own, the stream's description
        for prefix in (creds_a["jsPrefix"], "$JS.API"):
            js = nc.jetstream(prefix=prefix, timeout=1)
            with pytest.raises(Exception):  # noqa: B017 - refused: no answer, or "no responders"
                b_sub = await js.pull_subscribe_bind(creds_b["consumer"], stream)
                await b_sub.fetch(1, timeout=1)
            with pytest.raises(Exception):  # noqa: B017
                await js.get_last_msg(stream, f"pipelines.v1.{org_b}.pipeline.{r.json()['id']}.>")
            with pytest.raises(Exception):  # noqa: B017
                await js.get_msg(stream, 1)
            with pytest.raises(Exception):  # noqa: B017
                await js.add_consumer(stream, ConsumerConfig(filter_subject=f"pipelines.v1.{org_b}.>"))
            with pytest.raises(Exception):  # noqa: B017
                await js.stream_info(stream)
            with pytest.raises(Exception):  # noqa: B017
                await nc.request(f"{prefix}.DIRECT.GET.{stream}", b'{"seq": 1}', timeout=1)
        await errors.wait_for(f'publish to "$JS.API.CONSUMER.MSG.NEXT.{stream}.{creds_b["consumer"]}"')
        # Publishing into the service account's subjects: even its own organization's reaches no service
        everything = Heard()
        await watcher.subscribe("pipelines.>", cb=everything.record)
        await watcher.flush()
        for subject in (
            f"pipelines.v1.{org_a}.run.r1.run_stopped",
            f"pipelines.logs.v1.{org_a}.r1",
            f"pipelines.notify.v1.{org_b}.deploys",
            "pipelines.internal.appended",
        ):
            await nc.publish(subject, b"{}")
        await nc.flush()
        await errors.wait_for(f'publish to "pipelines.v1.{org_a}.run.r1.run_stopped"')
        await _marker_arrives(watcher, "pipelines.logs.v1.marker.x", everything)
        assert everything.messages == [("pipelines.logs.v1.marker.x", "")], everything.messages
        assert heard.messages == [], heard.messages
    finally:
        await nc.close()
