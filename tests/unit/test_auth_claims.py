"""Token claims: `exp`, `nbf` and `iat` are NumericDates (numbers), never numeric strings."""

from __future__ import annotations

import warnings

import jwt
import pytest

from infra.auth import AuthError, issue_token, verify_token
from infra.config import DEV_JWT_SECRET, Settings


def test_time_claims_must_be_numbers() -> None:
    settings = Settings(database_url="postgresql://x/y", nats_url="nats://x", jwt_secret="k" * 32)
    assert verify_token(settings, issue_token(settings, sub="a", roles=["viewer"])).expires is not None
    for claims in (
        {"exp": "9999999999"},
        {"exp": 9999999999, "nbf": "1"},
        {"exp": 9999999999, "iat": "1"},
        {"exp": True},
    ):
        token = jwt.encode({"sub": "a", "roles": ["admin"], **claims}, settings.jwt_secret, algorithm="HS256")
        with pytest.raises(AuthError):
            verify_token(settings, token)


def test_a_token_of_a_fresh_make_up_is_issued_and_read_without_a_key_length_warning() -> None:
    # PyJWT warns on every HMAC key under 32 bytes; the development secret a fresh clone runs with
    # (no PIPELINES_JWT_SECRET) must not print that on each `pipelines token`.
    settings = Settings(database_url="postgresql://x/y", nats_url="nats://x", jwt_secret=DEV_JWT_SECRET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = issue_token(settings, sub="alice", roles=["admin"])
        assert verify_token(settings, token).sub == "alice"
