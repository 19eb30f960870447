"""Broker credential files: a NATS `.creds` file (user JWT and seed), an nkey seed file, or one line
`user:password`; read into the options of a NATS connection."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["CredentialsError", "connect_options", "inbox_prefix", "read_user_password"]

_BAD = re.compile(r"[^A-Za-z0-9_-]")


def inbox_prefix(user: str) -> str:
    """Each user's replies (requests, JetStream API, deliveries of its push consumers) come on its own
    inbox prefix, so that no user can subscribe to another's replies (`_INBOX.>` would show it the
    gateway's feed of every organization)."""
    return f"_INBOX_{_BAD.sub('_', user)}"


class CredentialsError(ValueError):
    """A credential file that cannot be read or understood (the message never quotes its contents)."""


def read_user_password(path: Path) -> tuple[str, str] | None:
    """The `user:password` a file holds, or None when it holds something else (a .creds file, a seed)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read the broker credentials in {path}: {exc.__class__.__name__}") from None
    if "BEGIN NATS USER JWT" in text or (text.startswith("SU") and ":" not in text):
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password or "\n" in text:
        raise CredentialsError(
            f"{path} is not a broker credential file (a .creds file, an nkey seed, or one line user:password)"
        )
    return user, password


def connect_options(path: Path | None) -> dict[str, Any]:
    """The nats-py `connect()` options for a credential file (none: an unauthenticated connection)."""
    if path is None:
        return {}
    pair = read_user_password(path)
    if pair is not None:
        user, password = pair
        # Replies on the user's own inbox prefix: its permissions allow that one only.
        return {"user": user, "password": password, "inbox_prefix": inbox_prefix(user)}
    text = path.read_text(encoding="utf-8")
    if "BEGIN NATS USER JWT" in text:
        return {"user_credentials": str(path)}
    return {"nkeys_seed": str(path)}
