"""Token claims: `exp`, `nbf` and `iat` are NumericDates (numbers), never numeric strings."""

from __future__ import annotations

import jwt
import pytest

from infra.auth import AuthError, issue_token, verify_token
from infra.config import Settings


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
