"""Broker credential files and settings: what each service connects with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.broker.creds import CredentialsError, connect_options
from infra.broker.natsconf import BrokerUser, DownstreamAccount, render_config
from infra.broker.permissions import (
    DOWNSTREAM_JS_PREFIX,
    SERVICE_ACCOUNT,
    SERVICES,
    org_imports,
    org_permissions,
    service_permissions,
)
from infra.config import Settings, without_userinfo
from services.dev.stack import Stack


def test_a_user_password_file_gives_user_password_and_its_own_inbox(tmp_path: Path) -> None:
    path = tmp_path / "relay"
    path.write_text("relay:s3cr3t:with-colon\n")
    assert connect_options(path) == {"user": "relay", "password": "s3cr3t:with-colon", "inbox_prefix": "_INBOX_relay"}


def test_creds_and_seed_files_are_handed_to_nats_py_by_path(tmp_path: Path) -> None:
    creds = tmp_path / "u.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ...\n------END NATS USER JWT------\n")
    seed = tmp_path / "u.nk"
    seed.write_text("SUAM4VWX5RRFAKESEED\n")
    assert connect_options(creds) == {"user_credentials": str(creds)}
    assert connect_options(seed) == {"nkeys_seed": str(seed)}
    assert connect_options(None) == {}


def test_a_file_of_something_else_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text("[project]\nname = 'secret-looking'\n")
    with pytest.raises(CredentialsError) as info:
        connect_options(path)
    assert "secret-looking" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CredentialsError):
        connect_options(tmp_path / "missing")


def test_each_service_reads_its_own_file_over_the_shared_one() -> None:
    settings = Settings.from_env(
        {
            "PIPELINES_JWT_SECRET": "x" * 32,
            "PIPELINES_NATS_URL": "nats://u:p@127.0.0.1:4222",
            "PIPELINES_NATS_CREDS": "/etc/pipelines/all.creds",
            "PIPELINES_NATS_CREDS_RELAY": "/etc/pipelines/relay.creds",
        }
    )
    assert settings.nats_creds_for("relay") == Path("/etc/pipelines/relay.creds")
    assert settings.nats_creds_for("gateway") == Path("/etc/pipelines/all.creds")
    assert settings.public_broker_urls == ("nats://127.0.0.1:4222",)
    assert "u:p" not in repr(settings)
    assert without_userinfo("nats://a:b@h1:1,nats://h2:2") == "nats://h1:1,nats://h2:2"


def test_no_service_may_publish_events_but_the_relay_nor_read_every_inbox() -> None:
    for service in SERVICES:
        p = service_permissions(service, "S")
        assert ("pipelines.v1.>" in p.publish) == (service == "relay"), service
        assert not any(s in (">", "_INBOX.>", "pipelines.v1.>") for s in p.subscribe), service
    org = org_permissions("acme", "S", "bc_1")
    # It reads its own consumer and creates none (the API creates it: a push consumer's deliver subject
    # is not checked by NATS).
    assert f"{DOWNSTREAM_JS_PREFIX}.CONSUMER.MSG.NEXT.S.bc_1" in org.publish
    assert not any(".CONSUMER.CREATE" in s or ".CONSUMER.DURABLE" in s for s in org.publish)
    assert not any(s.startswith("pipelines.") for s in org.publish)


def test_each_downstream_credential_has_an_account_that_imports_only_its_organization_and_consumer() -> None:
    def account(user: str, org: str) -> DownstreamAccount:
        return DownstreamAccount(BrokerUser(user, "hash", org_permissions(org, "S", user)), org_imports(org, "S", user))

    config = json.loads(
        render_config(
            [BrokerUser("relay", "pw", service_permissions("relay", "S"))],
            [account("bc_1", "acme"), account("bc_2", "acme"), account("bc_3", "other")],
        )
    )
    accounts = config["accounts"]
    assert "authorization" not in config and set(accounts) == {SERVICE_ACCOUNT, "bc_1", "bc_2", "bc_3"}
    services = accounts[SERVICE_ACCOUNT]
    assert services["jetstream"] == "enabled" and [u["user"] for u in services["users"]] == ["relay"]
    assert all("jetstream" not in accounts[name] for name in ("bc_1", "bc_2", "bc_3"))
    exports = {e.get("stream") or e["service"]: e for e in services["exports"]}
    # every export names the accounts that may import it, and no other
    assert exports["pipelines.logs.v1.acme.>"]["accounts"] == ["bc_1", "bc_2"]
    assert exports["pipelines.notify.v1.other.>"]["accounts"] == ["bc_3"]
    assert exports["$JS.API.CONSUMER.MSG.NEXT.S.bc_1"] == {
        "service": "$JS.API.CONSUMER.MSG.NEXT.S.bc_1",
        "accounts": ["bc_1"],
        "response_type": "stream",
    }
    assert exports["$JS.ACK.S.bc_3.>"]["accounts"] == ["bc_3"]
    imported = {(i.get("stream") or i["service"])["subject"] for i in accounts["bc_3"]["imports"]}
    assert imported == {
        "pipelines.v1.other.>",
        "pipelines.logs.v1.other.>",
        "pipelines.notify.v1.other.>",
        "$JS.API.CONSUMER.INFO.S.bc_3",
        "$JS.API.CONSUMER.MSG.NEXT.S.bc_3",
        "$JS.ACK.S.bc_3.>",
    }
    assert not any(s.startswith("$JS.API.") and "CONSUMER" not in s for s in exports)


def test_the_banner_never_shows_a_brokers_password(tmp_path: Path) -> None:
    stack = Stack(
        {"PIPELINES_JWT_SECRET": "x" * 32},
        database_url="postgresql://u@127.0.0.1:1/db",
        nats_url="nats://relay:hunter2@127.0.0.1:4222",
        data_dir=tmp_path,
        embedded=False,
    )
    banner = "\n".join(stack.banner())
    assert "hunter2" not in banner and "nats://relay:***@127.0.0.1:4222" in banner
