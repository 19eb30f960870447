"""The resume token: the feed cursor (transaction id, position) as one string that sorts in delivery order."""

from __future__ import annotations

import re

from infra.store.records import FeedCursor

CURSOR = "Pipelines-Cursor"
_TOKEN = re.compile(r"[0-9a-f]{32}")


def cursor_token(cursor: FeedCursor) -> str:
    """32 lowercase hex digits: the transaction id, then the position, 16 digits each. Events are
    delivered in feed-cursor order, so the tokens of delivered events only go up, compared as
    plain strings (a position alone can go down: see docs/architecture.md)."""
    tx, position = cursor
    return f"{tx:016x}{position:016x}"


def parse_cursor_token(token: object) -> FeedCursor | None:
    """The feed cursor of a token, or None if it is not one."""
    if not isinstance(token, str) or _TOKEN.fullmatch(token) is None:
        return None
    return (int(token[:16], 16), int(token[16:], 16))
