"""Which pushes start a run: event-type and branch-glob filters of `event` triggers. Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """`*` matches within one path segment, `**` across segments, `?` one character."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def branch_matches(patterns: Sequence[str], branch: str) -> bool:
    return any(_glob(p).match(branch) for p in patterns)


def branch_of(ref: str | None) -> str | None:
    """`refs/heads/main` -> `main`; tags and other refs are not branches."""
    if ref and ref.startswith("refs/heads/"):
        return ref[len("refs/heads/") :]
    return None


def matching_event_trigger(
    triggers: Sequence[Mapping[str, Any]], event: str, branch: str | None
) -> tuple[int, str | None]:
    """(index of the first `event` trigger that accepts this delivery, or -1; why none did)."""
    event_triggers = [(i, t) for i, t in enumerate(triggers) if t.get("type") == "event"]
    if not event_triggers:
        return -1, "the pipeline has no event trigger"
    reasons = []
    for i, t in event_triggers:
        events = t.get("events") or ["push"]
        if event not in events:
            reasons.append(f"event {event!r} is not one of {events}")
            continue
        branches = t.get("branches")
        if branches:
            if branch is None:
                reasons.append("the delivery names no branch")
                continue
            if not branch_matches(branches, branch):
                reasons.append(f"branch {branch!r} matches none of {branches}")
                continue
        return i, None
    return -1, "; ".join(reasons)
