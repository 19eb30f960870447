"""What of an outbound URL or a reply may be shown: URLs as scheme and host only (a webhook URL
may be a credential itself), reply bodies as a short excerpt with secrets masked."""

from __future__ import annotations

from urllib.parse import urlsplit

EXCERPT_CHARS = 200
# Hosts whose webhook URLs carry their own credential in the path or query.
_CREDENTIAL_HOSTS = ("hooks.slack.com", "discord.com", "discordapp.com", "webhook.office.com", "chat.googleapis.com")


def shown_url(url: str) -> str:
    """`https://hooks.slack.com/…`: the scheme and host (and port) only."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    rest = "/…" if (parts.path not in ("", "/") or parts.query or parts.fragment) else "/"
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{rest}"


def is_credential_url(url: str, kind: str | None = None) -> bool:
    """A Slack channel's URL, a known chat webhook host's, or any URL with a query string (where
    tokens usually go) is a secret: whoever holds it can post."""
    if kind == "slack":
        return True
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return True
    return bool(parts.query) or any(host == h or host.endswith("." + h) for h in _CREDENTIAL_HOSTS)


def url_parts(url: str) -> tuple[str, ...]:
    """The URL and what may be a credential in it (its path and query), to mask in a text."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return (url,)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return (url, tail) if len(tail) > 1 else (url,)


def excerpt(text: str, *secrets: str | None, limit: int = EXCERPT_CHARS) -> str:
    """At most `limit` characters of a reply, on one line, with each secret replaced by ***."""
    # Longest first, so that a secret containing another is masked whole.
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    flat = " ".join(text.split())
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat if len(flat) <= limit else flat[:limit] + "…"
