"""Where outbound requests may go: every spelling of an internal address is refused unless
PIPELINES_OUTBOUND_ALLOW lists it, names are judged by every address they resolve to, URLs
with credentials are refused, and what of a URL or reply may be shown."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from infra.config import Settings, parse_cidrs
from infra.delivery.outbound import OutboundPolicy, OutboundRefused, check_saved
from infra.delivery.redaction import excerpt, is_credential_url, shown_url
from infra.delivery.webhooks import DeliveryOptions

STRICT = OutboundPolicy()
LOOPBACK_OK = OutboundPolicy(parse_cidrs("127.0.0.0/8,::1/128"))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost:8080/", "loopback"),
        ("http://LOCALHOST./", "loopback"),
        ("http://api.localhost/", "loopback"),
        ("http://2130706433/", "127.0.0.1, a loopback"),
        ("http://0x7f.1/", "127.0.0.1, a loopback"),
        ("http://017700000001/", "127.0.0.1, a loopback"),
        ("http://127.1/", "127.0.0.1, a loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "127.0.0.1, a loopback"),
        ("http://[64:ff9b::7f00:1]/", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://10.0.0.8/", "private"),
        ("http://172.16.3.4/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fd00::1]/", "private"),
        ("http://100.64.0.1/", "CGNAT"),
        ("http://224.0.0.251/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://255.255.255.255/", "broadcast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://999.1.1.1/", "not a valid"),
        ("http://1.2.3.4.5/", "not a valid IP address"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://token@example.com/", "credentials"),
        ("ftp://example.com/", "http or https"),
        ("http://example.com:99999/", "invalid port"),
        ("http://exa mple.com/", "whitespace"),
    ],
)
def test_internal_addresses_in_any_spelling_and_credentials_are_refused(url: str, why: str) -> None:
    with pytest.raises(OutboundRefused, match=why):
        STRICT.check_url(url)


def test_public_addresses_and_names_pass_and_the_allow_list_opens_exceptions() -> None:
    assert STRICT.check_url("https://8.8.8.8/x").ip == ipaddress.ip_address("8.8.8.8")
    assert STRICT.check_url("https://hooks.slack.com/services/T/B/X").ip is None
    assert LOOPBACK_OK.check_url("http://127.0.0.1:9/").port == 9
    assert LOOPBACK_OK.check_url("http://[::ffff:127.0.0.1]/").ip == ipaddress.ip_address("127.0.0.1")
    assert LOOPBACK_OK.check_url("http://localhost:9/").host == "localhost"
    with pytest.raises(OutboundRefused, match="private"):
        LOOPBACK_OK.check_url("http://10.1.1.1/")


def _resolver(answers: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(-2, "Name or service not known")
        return answers[host]

    return resolve


def test_a_name_is_refused_when_any_address_it_resolves_to_is_internal() -> None:
    policy = OutboundPolicy(resolver=_resolver({"evil.test": ["93.184.216.34", "127.0.0.1"], "ok.test": ["8.8.4.4"]}))
    with pytest.raises(OutboundRefused, match=r"evil.test resolves to 127.0.0.1, a loopback address"):
        asyncio.run(policy.resolve(policy.check_url("http://evil.test/")))
    assert asyncio.run(policy.resolve(policy.check_url("http://ok.test/"))) == [ipaddress.ip_address("8.8.4.4")]
    with pytest.raises(OutboundRefused, match="does not resolve"):
        asyncio.run(policy.resolve(policy.check_url("http://nowhere.test/")))
    # At save time a name that does not resolve yet is accepted (checked again at connect time) ...
    asyncio.run(check_saved(policy, "http://nowhere.test/"))
    # ... and one that resolves to an internal address is not.
    with pytest.raises(OutboundRefused, match="loopback"):
        asyncio.run(check_saved(policy, "http://evil.test/"))


def test_outbound_allow_is_read_from_its_variable_and_reaches_the_delivery_options() -> None:
    env = {"PIPELINES_JWT_SECRET": "x" * 32}
    assert Settings.from_env(env).outbound_allow == ()
    s = Settings.from_env({**env, "PIPELINES_OUTBOUND_ALLOW": " 127.0.0.0/8, ::1 ,10.1.2.3"})
    assert [str(n) for n in s.outbound_allow] == ["127.0.0.0/8", "::1/128", "10.1.2.3/32"]
    assert DeliveryOptions.from_settings(s).outbound == OutboundPolicy(s.outbound_allow)
    with pytest.raises(ValueError, match="PIPELINES_OUTBOUND_ALLOW"):
        Settings.from_env({**env, "PIPELINES_OUTBOUND_ALLOW": "127.0.0.0/33"})


def test_credential_urls_are_shown_as_scheme_and_host_and_replies_as_short_masked_excerpts() -> None:
    slack = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
    assert shown_url(slack) == "https://hooks.slack.com/…"
    assert shown_url("http://[::1]:8080/a?b=c") == "http://[::1]:8080/…"
    assert is_credential_url(slack) and is_credential_url("https://x.example/any", "slack")
    assert is_credential_url("https://x.example/hook?token=abc")
    assert not is_credential_url("https://deploy.example/x", "webhook")
    text = excerpt("oops: s3cret\n" + "y" * 1000, "s3cret")
    assert "s3cret" not in text and text.startswith("oops: *** yyy") and len(text) <= 201
