"""Every broker connection is authenticated and least-privileged: attacks from a script of a real run
and from a service's stolen credentials, against the embedded NATS (its users: services/dev/nats_auth.py)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from infra.broker import bus
from infra.broker.creds import connect_options
from services.dev.nats import RunningNats
from tests import servers
from tests.integration.system import System


@pytest.fixture
def embedded(nats_url: str) -> RunningNats:
    server = servers.embedded_nats(nats_url)
    if server is None:
        pytest.skip("needs the embedded NATS (its users); PIPELINES_TEST_NATS_URL names another server")
    return server


class Errors:
    """What the server reported to a connection (permission violations arrive asynchronously)."""

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


async def _connect_as(server: RunningNats, user: str, errors: Errors) -> NATS:
    return await nats.connect(
        server.url,
        name=f"attacker-as-{user}",
        error_cb=errors.record,
        allow_reconnect=False,
        **connect_options(server.credentials[user]),
    )


@pytest.fixture
async def watcher(nats_url: str) -> AsyncIterator[NATS]:
    nc = await bus.connect(nats_url, "test-watcher")  # the tests' admin
    yield nc
    await nc.close()


async def test_a_connection_without_credentials_is_refused(embedded: RunningNats) -> None:
    with pytest.raises(NatsError, match=r"(?i)authorization violation"):
        await nats.connect(embedded.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_gateway_credentials_cannot_stop_another_organizations_run(embedded: RunningNats, watcher: NATS) -> None:
    subject = f"pipelines.v1.org-victim.run.{uuid.uuid4().hex}.run_stopped"
    heard: list[str] = []
    marker_heard = asyncio.Event()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        heard.append(msg.subject)
        if msg.subject.endswith(".marker"):
            marker_heard.set()

    await watcher.subscribe("pipelines.v1.org-victim.>", cb=on_msg)
    await watcher.flush()
    errors = Errors()
    nc = await _connect_as(embedded, "gateway", errors)
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        line = await errors.wait_for("permissions violation for publish")
        assert subject in line
        # A subject it may publish to, sent after the refused one, arrives: the refused one never did.
        await watcher.publish("pipelines.v1.org-victim.marker", b"")
        await watcher.flush()
        await asyncio.wait_for(marker_heard.wait(), 5)
        assert heard == ["pipelines.v1.org-victim.marker"]
    finally:
        await nc.close()


async def test_executor_credentials_cannot_publish_events_or_read_the_event_stream(
    embedded: RunningNats,
) -> None:
    errors = Errors()
    nc = await _connect_as(embedded, "executor", errors)
    try:
        # a forged log line into the events stream (it stopped the relay for everyone)
        await nc.publish("pipelines.v1.org-victim.run.r1.runlog", b"{}", headers={"Pipelines-Position": "999999999"})
        await nc.flush()
        await errors.wait_for('permissions violation for publish to "pipelines.v1.org-victim.run.r1.runlog"')
        # every organization's events, through a consumer of its own
        await nc.publish("$JS.API.CONSUMER.CREATE.PIPELINES_EVENTS", b"{}")
        await nc.flush()
        await errors.wait_for('permissions violation for publish to "$JS.API.CONSUMER.CREATE.PIPELINES_EVENTS"')
        await nc.subscribe("pipelines.v1.>")
        await nc.flush()
        await errors.wait_for('permissions violation for subscription to "pipelines.v1.>"')
    finally:
        await nc.close()


async def test_relay_and_projector_credentials_cannot_read_log_lines(embedded: RunningNats) -> None:
    for user in ("relay", "projector", "api", "gateway"):
        errors = Errors()
        nc = await _connect_as(embedded, user, errors)
        try:
            await nc.subscribe("pipelines.logs.v1.>")
            await nc.subscribe("_INBOX.>")  # other users' replies (the gateway's feed of every organization)
            await nc.flush()
            await errors.wait_for('permissions violation for subscription to "pipelines.logs.v1.>"')
            await errors.wait_for('permissions violation for subscription to "_INBOX.>"')
        finally:
            await nc.close()


def _attack_script(port: int, credential_files: list[Path]) -> str:
    files = " ".join(str(p) for p in credential_files)
    return f"""python3 - <<'EOF'
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
s.recv(65536)  # INFO
s.sendall(b'CONNECT {{"verbose":false,"pedantic":false}}\\r\\nSUB pipelines.v1.> 1\\r\\nPING\\r\\n')
reply = b""
try:
    while b"Authorization" not in reply and b"PONG" not in reply:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
except OSError:
    pass
print("broker said:", reply.decode(errors="replace").strip().replace("\\r\\n", " | "))
EOF
for f in {files}; do cat "$f" >/dev/null 2>&1 && echo "read $f" || echo "cannot read $f"; done
"""


async def test_a_script_of_a_run_cannot_use_the_broker_or_read_its_credentials(
    system: System, embedded: RunningNats
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts run as a uid of their own (not the services') only when the executor is root")
    files = [embedded.credentials[name] for name in ("executor", "relay", "admin")]
    pipeline = await system.create_pipeline(
        [{"id": "attack", "type": "script", "config": {"command": _attack_script(embedded.port, files)}}]
    )
    run = await system.trigger(pipeline["id"])
    done = await system.wait_status(pipeline["id"], run["id"], "succeeded", "failed")
    out = done["stageResults"][0]["output"]
    assert "Authorization Violation" in out, out
    assert "PONG" not in out and "MSG" not in out, out
    for f in files:
        assert f"cannot read {f}" in out, out
