"""Run secrets: encrypted at rest (SecretStore on real PostgreSQL), accepted by the trigger
endpoint, given to scripts and masked wherever they would be shown or stored; scripts that run as
an unprivileged user cannot read the data directory nor signal the services."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import stat
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from psycopg_pool import AsyncConnectionPool

from infra.app.commands import Commands
from infra.broker import bus
from infra.config import Settings
from infra.executor.scripts import ScriptRun, clean_env
from infra.secrets import (
    KEY_FILE,
    SecretsKeyError,
    SecretStore,
    SecretsUnavailable,
    load_key_material,
    read_or_create_key_file,
)
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore
from tests.integration.system import System, eventually, make_settings

# async tests run on the session loop (asyncio_default_test_loop_scope); some tests here are sync
pytestmark = [pytest.mark.integration]

KEY = "an-integration-test-key-0123456789abcdef"
VALUE = "pa55-w0rd-that-must-never-show"
GATE = {"id": "gate", "type": "approval", "config": {"message": "ok?"}}
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database_url)
    p = await open_pool(database_url)
    try:
        yield p
    finally:
        await p.close()


async def _raw(pool: AsyncConnectionPool, run_id: str) -> dict[str, bytes]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT name, value FROM run_secrets WHERE run_id = %s", (run_id,))
        return {name: bytes(value) for name, value in await cur.fetchall()}


async def _tables_containing(pool: AsyncConnectionPool, needle: str) -> list[str]:
    """Every table of ours whose rows, as text, contain `needle`."""
    found = []
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE'"
        )
        for (table,) in await cur.fetchall():
            cur = await conn.execute(
                f'SELECT count(*) FROM "{table}" t WHERE position(%s IN t::text) > 0',
                (needle,),
            )
            row = await cur.fetchone()
            if row is not None and row[0]:
                found.append(table)
    return found


# ---- SecretStore -------------------------------------------------------------------------------


async def test_secrets_round_trip_and_are_encrypted_at_rest(pool: AsyncConnectionPool) -> None:
    store = SecretStore(pool, KEY)
    run_id = str(uuid.uuid4())
    values = {"API_TOKEN": VALUE, "EMPTY": "", "UNICODE": "clé-секрет-🔑"}
    await store.put(run_id, values)
    assert await store.get(run_id) == values
    assert await store.names(run_id) == sorted(values)

    raw = await _raw(pool, run_id)
    assert set(raw) == set(values)
    for name, blob in raw.items():
        plain = values[name].encode()
        assert not plain or plain not in blob
        assert len(blob) >= len(plain) + 16 + 12  # tag and nonce
    assert await _tables_containing(pool, VALUE) == []

    # the same value twice is two different ciphertexts (random nonces)
    await store.put(run_id, {"API_TOKEN": VALUE})
    assert (await _raw(pool, run_id))["API_TOKEN"] != raw["API_TOKEN"]
    assert (await store.get(run_id))["API_TOKEN"] == VALUE

    await store.delete(run_id)
    assert await store.get(run_id) == {}
    assert await _raw(pool, run_id) == {}


async def test_a_value_does_not_decrypt_under_another_key_row_or_after_tampering(pool: AsyncConnectionPool) -> None:
    store = SecretStore(pool, KEY)
    run_id, other_run = str(uuid.uuid4()), str(uuid.uuid4())
    await store.put(run_id, {"A": VALUE})
    blob = (await _raw(pool, run_id))["A"]

    with pytest.raises(SecretsUnavailable, match="another key"):
        await SecretStore(pool, KEY + "-rotated").get(run_id)

    async with pool.connection() as conn:  # copied to another run, or another name: refused
        await conn.execute(
            "INSERT INTO run_secrets (run_id, name, value) VALUES (%s, 'A', %s), (%s, 'B', %s)",
            (other_run, blob, run_id, blob),
        )
    with pytest.raises(SecretsUnavailable):
        await store.get(other_run)
    with pytest.raises(SecretsUnavailable):
        await store.get(run_id)

    tampered = bytearray(blob)
    tampered[-1] ^= 1
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM run_secrets WHERE run_id = %s AND name = 'B'", (run_id,))
        await conn.execute("UPDATE run_secrets SET value = %s WHERE run_id = %s", (bytes(tampered), run_id))
    with pytest.raises(SecretsUnavailable, match="does not decrypt"):
        await store.get(run_id)
    await store.delete(run_id)
    await store.delete(other_run)


async def test_purge_removes_secrets_of_ended_and_never_recorded_runs(pool: AsyncConnectionPool) -> None:
    from domain import run as rn

    store = SecretStore(pool, KEY)
    commands = Commands(PostgresEventStore(pool))
    pipeline = await commands.create_pipeline(
        name=f"purge-{uuid.uuid4().hex[:8]}", description=None, stages=[GATE], org=None, by="u"
    )
    live, _ = await commands.trigger(pipeline, by="u")
    ended, _ = await commands.trigger(pipeline, by="u")
    await commands.run_command(ended.run_id, lambda at: rn.Cancel(by="u", at=at))
    orphan, fresh_orphan = str(uuid.uuid4()), str(uuid.uuid4())
    for run_id in (live.run_id, ended.run_id, orphan, fresh_orphan):
        await store.put(run_id, {"S": VALUE})
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE run_secrets SET created_at = now() - interval '2 hours' WHERE run_id = ANY(%s)",
            ([live.run_id, ended.run_id, orphan],),
        )
    assert await store.purge(older_than=3600) == 2
    assert await store.names(live.run_id) == ["S"]  # still running: kept however old
    assert await store.names(fresh_orphan) == ["S"]  # maybe its run is being appended right now
    assert await store.names(ended.run_id) == [] and await store.names(orphan) == []
    for run_id in (live.run_id, fresh_orphan):
        await store.delete(run_id)


# ---- the key -----------------------------------------------------------------------------------


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"PIPELINES_JWT_SECRET": "x" * 40, "PIPELINES_DATA_DIR": str(tmp_path), **env})


def test_the_key_file_is_created_once_0600_and_shared(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    results: list[bytes] = []

    def load() -> None:
        results.append(load_key_material(_settings(data_dir)))

    threads = [threading.Thread(target=load) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and len(set(results)) == 1 and len(results[0]) >= 32
    key_file = data_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE]  # no temporary files left
    assert read_or_create_key_file(key_file) == results[0]

    os.chmod(key_file, 0o644)  # loosened by hand: tightened again
    assert load_key_material(_settings(data_dir)) == results[0]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    key_file.write_text("short\n")
    with pytest.raises(SecretsKeyError, match="no usable key"):
        load_key_material(_settings(data_dir))


def test_the_key_from_the_environment_wins_and_is_not_in_repr(tmp_path: Path) -> None:
    settings = _settings(tmp_path, PIPELINES_SECRETS_KEY=KEY)
    assert load_key_material(settings) == KEY.encode()
    assert not (tmp_path / KEY_FILE).exists()
    assert KEY not in repr(settings)
    with pytest.raises(SecretsKeyError, match="at least 32"):
        load_key_material(_settings(tmp_path, PIPELINES_SECRETS_KEY="too-short"))


def test_script_user_and_work_dir_settings(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.script_user == ("nobody" if os.geteuid() == 0 else None)
    assert settings.work_root == tmp_path / "work"
    assert settings.script_uids == ((200_000, 299_999) if os.geteuid() == 0 else None)
    settings = _settings(tmp_path, PIPELINES_SCRIPT_USER="daemon", PIPELINES_WORK_DIR="/srv/work")
    assert settings.script_user == "daemon" and settings.work_root == Path("/srv/work")
    assert settings.script_uids is None  # an explicit user means that user
    settings = _settings(tmp_path, PIPELINES_SCRIPT_UIDS="300000-300999")
    assert settings.script_uids == (300_000, 300_999)
    assert "postgresql://" not in repr(settings) and settings.jwt_secret not in repr(settings)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_concurrent_runs_scripts_have_their_own_uids_and_cannot_read_each_other(system: System) -> None:
    holder = await system.create_pipeline(
        [{"id": "hold", "type": "script", "config": {"command": "id -u; echo mine > own.txt; sleep 4"}}]
    )
    held = await system.trigger(holder["id"], secrets={"TOKEN": "s3cr3t-of-a"})
    await system.wait_run(
        holder["id"], held["id"], lambda r: "own.txt" not in r["logs"] and r["stageResults"][0]["output"] != ""
    )
    spy = await system.create_pipeline(
        [
            {
                "id": "spy",
                "type": "script",
                "config": {
                    "command": "id -u; echo user=$USER; "
                    "for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null; done "
                    "| tr '\\0' '\\n' | grep -c s3cr3t-of-a; "
                    f"cat ../{held['id']}/own.txt 2>/dev/null || echo denied; "
                    "kill -0 $(pgrep -x sleep | head -1) 2>/dev/null && echo signalled || echo cannot-signal"
                },
            }
        ]
    )
    run = await system.trigger(spy["id"])
    done = await system.wait_status(spy["id"], run["id"], "succeeded", "failed")
    lines = done["stageResults"][0]["output"].split("\n")
    first = (await system.get_run(holder["id"], held["id"]))["stageResults"][0]["output"].split("\n")[0]
    assert lines[0] != first and int(lines[0]) >= 200_000 and int(first) >= 200_000
    assert lines[1] == f"user=run-{lines[0]}"
    assert lines[2:5] == ["0", "denied", "cannot-signal"], done["stageResults"][0]["output"]


# ---- the API -----------------------------------------------------------------------------------


def _trigger_url(pipeline: dict[str, Any]) -> str:
    return f"/api/v1/pipelines/{pipeline['id']}/trigger"


async def test_trigger_with_secrets_reaches_scripts_masked_everywhere(
    system: System, pool: AsyncConnectionPool
) -> None:
    command = (
        'echo "token=$API_TOKEN"; echo "$API_TOKEN" >&2; '
        'printf %s "$API_TOKEN" | sha256sum; printf %s "$API_TOKEN" | base64; '
        'printf \'{"t": "%s"}\\n\' "$API_TOKEN"; echo "plain=$PLAIN"; echo "uid=$(id -u)"'
    )
    p = await system.create_pipeline([{"id": "use", "type": "script", "config": {"command": command}}])
    nc = await bus.connect(system.settings.nats_url, "test-secrets")
    frames: list[bytes] = []

    async def on_frame(msg: Msg) -> None:
        frames.append(msg.data)

    sub = await nc.subscribe(f"pipelines.logs.v1.{system.org}.>", cb=on_frame)
    try:
        r = await system.client.post(
            _trigger_url(p),
            json={"variables": {"PLAIN": "visible"}, "secrets": {"API_TOKEN": VALUE}},
            headers=system.headers("member"),
        )
        assert r.status_code == 201, r.text
        run = r.json()
        assert VALUE not in r.text
        assert run["secretNames"] == ["API_TOKEN"] and run["variables"] == {"PLAIN": "visible"}
        assert run["status"] == "queued"

        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done
        out = done["stageResults"][0]["output"]
        digest = hashlib.sha256(VALUE.encode()).hexdigest()
        assert "token=***\n" in out and "***\n" in out and digest in out  # the script had the real value
        assert '{"t": "***"}' in out and "plain=visible" in out
        assert VALUE not in json.dumps(done)
        if os.geteuid() == 0:
            assert "uid=2" in out  # scripts do not run as root: a uid of the run's own (200000-299999)

        events = await system.client.get(
            f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/events", headers=system.headers()
        )
        assert events.status_code == 200 and VALUE not in events.text
        triggered = events.json()[0]
        assert triggered["type"] == "run_triggered" and triggered["data"]["secret_names"] == ["API_TOKEN"]

        async def rows_gone() -> bool:
            return await _raw(pool, run["id"]) == {}

        await eventually(rows_gone, what="the run's secrets to be deleted when it ended")
        await eventually(lambda: _has_frames(frames), what="live log frames")
        assert not any(VALUE.encode() in f for f in frames)
        assert any(b"token=***" in f for f in frames)
        assert await _tables_containing(pool, VALUE) == []
    finally:
        await sub.unsubscribe()
        await nc.close()


async def _has_frames(frames: list[bytes]) -> bool:
    return bool(frames)


async def test_secrets_of_a_run_cancelled_at_a_gate_are_deleted(system: System, pool: AsyncConnectionPool) -> None:
    p = await system.create_pipeline([GATE, {"id": "s", "type": "script", "config": {"command": "true"}}])
    run = await system.trigger(p["id"], secrets={"DEPLOY_KEY": VALUE})
    await system.wait_status(p["id"], run["id"], "waiting_approval")
    assert set(await _raw(pool, run["id"])) == {"DEPLOY_KEY"}
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/cancel", headers=system.headers())
    assert r.status_code == 200

    async def rows_gone() -> bool:
        return await _raw(pool, run["id"]) == {}

    await eventually(rows_gone, what="the cancelled run's secrets to be deleted")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"secrets": {"1BAD": "x"}}, "secrets.1BAD"),
        ({"secrets": {"HAS-DASH": "x"}}, "secrets.HAS-DASH"),
        ({"secrets": {f"S{i}": "x" for i in range(101)}}, "secrets"),
        ({"secrets": {"BIG": "x" * (32 * 1024 + 1)}}, "secrets.BIG"),
        ({"secrets": {"NUL": "a\u0000b"}}, "secrets.NUL"),
        ({"variables": {"SAME": "a"}, "secrets": {"SAME": "b"}}, "secrets.SAME"),
        ({"variables": {"NUL": "a\u0000b"}}, "variables.NUL"),
    ],
)
async def test_bad_secrets_are_400_naming_the_field(system: System, body: dict[str, Any], path: str) -> None:
    p = await system.create_pipeline([GATE])
    r = await system.client.post(_trigger_url(p), json=body, headers=system.headers("member"))
    assert r.status_code == 400, r.text
    assert [e["path"] for e in r.json()["errors"]] == [path]
    assert "a\u0000b" not in r.text and "\\u0000" not in r.text


async def test_secret_values_must_be_strings(system: System) -> None:
    p = await system.create_pipeline([GATE])
    r = await system.client.post(_trigger_url(p), json={"secrets": {"N": 12345}}, headers=system.headers("member"))
    assert r.status_code == 400 and "12345" not in r.text
    r = await system.client.post(
        _trigger_url(p), json={"secrets": {f"S{i}": "v" for i in range(100)}}, headers=system.headers("member")
    )
    assert r.status_code == 201 and len(r.json()["secretNames"]) == 100


async def test_idempotent_trigger_with_secrets_keeps_no_plain_hash_of_the_body(
    system: System, pool: AsyncConnectionPool
) -> None:
    p = await system.create_pipeline([GATE])
    key = uuid.uuid4().hex
    headers = {**system.headers("member"), "Idempotency-Key": key, "Content-Type": "application/json"}
    body = msgspec.json.encode({"secrets": {"PIN": "1234"}})
    first = await system.client.post(_trigger_url(p), content=body, headers=headers)
    again = await system.client.post(_trigger_url(p), content=body, headers=headers)
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    other = await system.client.post(
        _trigger_url(p), content=msgspec.json.encode({"secrets": {"PIN": "1235"}}), headers=headers
    )
    assert other.status_code == 409
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT request_hash, body FROM idempotency_keys WHERE key = %s", (key,))
        rows = await cur.fetchall()
    assert len(rows) == 1
    request_hash, stored = rows[0]
    assert request_hash.startswith("hmac-sha256:") and hashlib.sha256(body).hexdigest() not in request_hash
    assert b"1234" not in bytes(stored) and b'"secretNames":["PIN"]' in bytes(stored)


async def test_the_api_refuses_secrets_when_it_has_no_secret_store(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    """A server without a store refuses secrets rather than drop them."""
    from litestar.testing import AsyncTestClient

    from infra.auth import issue_token
    from infra.http.app import Deps, create_app
    from services.bootstrap import build_api

    settings = make_settings(database_url, nats_url, tmp_path)

    async def build() -> Deps:
        deps = await build_api(settings)
        deps.secrets = None
        return deps

    token = issue_token(settings, sub="alice", roles=["member"], org=None)
    async with AsyncTestClient(app=create_app(build)) as client:
        r = await client.post(
            f"/api/v1/pipelines/{uuid.uuid4()}/trigger",
            json={"secrets": {"A": "b"}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 400 and "not configured" in r.text


# ---- the script user ---------------------------------------------------------------------------


def _private_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    os.chmod(data_dir, 0o711)  # as services/dev/stack.py makes it when root
    read_or_create_key_file(data_dir / KEY_FILE)
    fd = os.open(data_dir / "postgres.password", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"pg-password\n")
    os.close(fd)
    return data_dir


async def _run(command: str, workdir: Path, user: str | int | None) -> tuple[Any, list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    outcome = await ScriptRun(kill_grace=0.5).run(
        command,
        workdir=workdir,
        env=clean_env(workdir, {"D": str(workdir.parent.parent), "SERVICE_PID": str(os.getpid())}),
        timeout=20,
        on_line=lambda stream, text: lines.append((stream, text)),
        user=user,
    )
    return outcome, lines


@as_root
async def test_scripts_as_nobody_cannot_read_the_data_dir_nor_signal_the_services(tmp_path: Path) -> None:
    data_dir = _private_data_dir(tmp_path)
    workdir = data_dir / "work" / str(uuid.uuid4())
    command = (
        "echo uid=$(id -u); "
        'cat "$D/secrets.key"; echo key=$?; '
        'cat "$D/postgres.password"; echo password=$?; '
        'ls "$D"; echo list=$?; '
        'ls "$D/work"; echo list_work=$?; '
        'kill -0 "$SERVICE_PID"; echo kill=$?; '
        'cat "/proc/$SERVICE_PID/environ" >/dev/null; echo environ=$?; '
        "grep '^Groups:' /proc/self/status; "
        'cd "$HOME" && echo made > "$HOME/file" && echo home_ok'
    )
    outcome, lines = await _run(command, workdir, "nobody")
    assert outcome.succeeded, (outcome, lines)
    out = [text for stream, text in lines if stream == "stdout"]
    nobody = pwd.getpwnam("nobody")
    assert f"uid={nobody.pw_uid}" in out
    for check in ("key", "password", "list", "list_work", "kill", "environ"):
        assert f"{check}=0" not in out, (check, lines)
        assert any(text.startswith(f"{check}=") for text in out), (check, lines)
    assert "pg-password" not in out and not any(len(t) > 30 and " " not in t for t in out[:2])
    groups = next(text for text in out if text.startswith("Groups:"))
    assert groups.split(":", 1)[1].strip() == ""  # none of root's supplementary groups
    assert "home_ok" in out
    st = workdir.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o700)
    assert stat.S_IMODE(workdir.parent.stat().st_mode) == 0o711
    assert (workdir / "file").stat().st_uid == nobody.pw_uid
    # the files of the data dir are untouched
    assert stat.S_IMODE((data_dir / KEY_FILE).stat().st_mode) == 0o600


@as_root
async def test_a_stop_still_kills_a_script_of_another_user(tmp_path: Path) -> None:
    data_dir = _private_data_dir(tmp_path)
    workdir = data_dir / "work" / "r"
    script = ScriptRun(kill_grace=0.2)
    task = asyncio.create_task(
        script.run(
            "sleep 30 & sleep 30; echo never",
            workdir=workdir,
            env=clean_env(workdir, {}),
            timeout=20,
            on_line=lambda stream, text: None,
            user="nobody",
        )
    )
    for _ in range(200):
        if script.pid is not None:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await script.stop()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome.killed and not outcome.succeeded


async def test_an_unknown_script_user_fails_the_script_clearly(tmp_path: Path) -> None:
    outcome, _ = await _run("true", tmp_path / "work" / "r", "no-such-user-here")
    assert not outcome.succeeded and outcome.error is not None and "does not exist" in outcome.error


async def test_no_user_or_our_own_user_runs_as_ourselves(tmp_path: Path) -> None:
    for user in (None, os.geteuid(), pwd.getpwuid(os.geteuid()).pw_name):
        outcome, lines = await _run("id -u", tmp_path / "work" / "r", user)
        assert outcome.succeeded and ("stdout", str(os.geteuid())) in lines
