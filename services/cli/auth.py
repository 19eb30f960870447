"""`pipelines login` (keep a profile) and `pipelines whoami` (who the API says you are)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from services.cli.client import Api
from services.cli.profiles import Profile, remember
from services.cli.render import Output, OutputOption, emit_json, err, fields
from services.cli.session import session


def _expiry(token: str | None) -> str | None:
    """The token's `exp` claim, read without checking the signature (the API checked it)."""
    try:
        payload = (token or "").split(".")[1]
        claims: Any = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), UTC).isoformat()
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return None


def login(
    ctx: typer.Context,
    api: Annotated[str, typer.Option("--api", help="the API's address, e.g. http://127.0.0.1:8080")],
    token: Annotated[str, typer.Option("--token", help="a bearer token (JWT)", envvar="PIPELINES_TOKEN")],
) -> None:
    """Check the address and token with the API, then keep them as a profile (file mode 0600)."""
    name = session(ctx).profile_name
    client = Api(Profile(name=name or "", api=api, token=token))
    try:
        info = client.info()
    finally:
        client.close()
    chosen, path = remember(name, api, token)
    err.print(f"logged in to {api} as {info['subject']}; profile {chosen!r} in {path}", markup=False)


def whoami(ctx: typer.Context, output: OutputOption = Output.text) -> None:
    """Show the subject, organization, roles and expiry of the token in use."""
    s = session(ctx)
    info = s.api.info()
    expires = _expiry(s.profile.token)
    if output is Output.json:
        emit_json({**info, "expiresAt": expires, "api": s.api.base, "profile": s.profile.name})
        return
    fields(
        [
            ("subject", info["subject"]),
            ("organization", info.get("organization") or "-"),
            ("roles", ", ".join(info.get("roles") or []) or "-"),
            ("expires", expires or "-"),
            ("api", s.api.base),
            ("gateway", info.get("gatewayUrl")),
            ("profile", s.profile.name),
        ]
    )


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Example: pipelines login --api http://127.0.0.1:8080 --token $(pipelines token --sub al --role member)"
    )(login)
    app.command(epilog="Example: pipelines whoami --output json")(whoami)
