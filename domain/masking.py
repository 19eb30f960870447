"""Masking of secret values in text that is shown or stored (log lines, stage errors):
`Masker(values).mask(text)` replaces every occurrence of every secret value with `***`."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_FRAGMENT = 4
# Length of the pattern prefixes the first search looks for: bounds its work per position.
_PREFIX = 32


def _variants(value: str) -> set[str]:
    out = {value}
    lines = value.splitlines()
    if len(lines) > 1:
        out.update(line for line in (ln.strip() for ln in lines) if len(line) >= MIN_FRAGMENT)
    raw = value.encode()
    out.add(json.dumps(value)[1:-1])
    out.add(json.dumps(value, ensure_ascii=False)[1:-1])
    out.add(quote(value, safe=""))
    out.add(quote_plus(value, safe=""))
    if len(raw) >= 3:  # shorter values encode to two or three characters: too easy to collide
        out.add(base64.b64encode(raw).decode().rstrip("="))
        out.add(base64.urlsafe_b64encode(raw).decode().rstrip("="))
    return {v for v in out if v}


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex for any of `words`, shaped as a trie: the alternatives of a node begin with
    distinct characters, so a position costs about one branch per character rather than one
    per word."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here
    return _node_pattern(root)


def _node_pattern(node: dict[str, Any]) -> str:
    alternatives = []
    for ch in sorted(k for k in node if k):
        run, sub = [ch], node[ch]
        while len(sub) == 1 and "" not in sub:  # a chain without branches: one literal
            ((c, sub),) = sub.items()
            run.append(c)
        alternatives.append(re.escape("".join(run)) + _node_pattern(sub))
    if not alternatives:
        return ""
    body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
    return f"(?:{body})?" if "" in node else body


def _period(pattern: str) -> int:
    """The smallest period of `pattern` (from the KMP failure function)."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return len(pattern) - fail[-1]


def _periodic_run(text: str, start: int, period: int) -> int:
    """How many characters from `start` on repeat the character `period` places before them."""
    lo, hi = 0, len(text) - start
    while lo < hi:  # binary search over slice comparisons: O(n log n), in C
        mid = (lo + hi + 1) // 2
        if text[start : start + mid] == text[start - period : start - period + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _replace_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each span replaced by the mask, overlapping or touching spans as one."""
    spans = sorted(spans)
    out: list[str] = []
    last = 0
    start, end = spans[0]
    for s, e in spans[1:]:
        if s <= end:
            end = max(end, e)
            continue
        out.append(text[last:start])
        out.append(MASK)
        last, start, end = end, s, e
    out.append(text[last:start])
    out.append(MASK)
    out.append(text[end:])
    return "".join(out)


class Masker:
    """Masks the given secret values; cheap to call for every line (not thread-safe: it caches).

    What is masked:
    - every non-empty value, however short (as GitHub Actions does): a one-character secret makes
      logs hard to read, but showing it would be worse. Empty values mask nothing.
    - each line of a multi-line value on its own (logs arrive line by line, so a PEM key is never
      seen whole), when that line has at least `MIN_FRAGMENT` characters: short lines of a
      multi-line value (`}`, `==`) reveal next to nothing and would mask half the log.
    - the forms a value commonly takes when a script prints it: JSON-string escaped, URL-encoded
      and base64 (whole-value, standard and URL-safe alphabets), when they differ from the value.

    Overlapping occurrences are masked together (`abcd` and `cdef` in `abcdef` give `***`, not
    `***ef`; `abab` in `ababab` gives `***`).

    Cost. A line is first searched with one regex for the first `_PREFIX` characters of every
    pattern, built as a trie (about 1.5 us for an 80-character line with 10 secrets, 15 us with 100).
    Only a line where a prefix shows up is searched exactly, pattern by pattern, with `str.find`.
    Both steps are linear in the line whatever the values and the text: a run controls its secrets
    and its output, and neither may let it stall the executor with regex backtracking.

    Not covered: a value split across two lines by the script, or a line cut by the runner's line
    length limit (64 KiB) in the middle of a value; transformations other than the ones above.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        patterns: set[str] = set()
        for value in values:
            if value:
                patterns |= _variants(value)
        # Sorted only for a deterministic order: the spans found are merged, so it changes nothing.
        self._patterns = tuple(sorted(patterns, key=lambda p: (-len(p), p)))
        self._prefilter = re.compile(_trie_pattern({p[:_PREFIX] for p in patterns})) if patterns else None
        self._periods: dict[str, int] = {}  # computed when a pattern is first found

    def __bool__(self) -> bool:
        return self._prefilter is not None

    @property
    def patterns(self) -> tuple[str, ...]:
        """Every string masked: the values and their variants, longest first."""
        return self._patterns

    def mask(self, text: str) -> str:
        if self._prefilter is None or self._prefilter.search(text) is None:
            return text
        spans = [span for pattern in self._patterns for span in self._occurrences(pattern, text)]
        return _replace_spans(text, spans) if spans else text

    def _occurrences(self, pattern: str, text: str) -> list[tuple[int, int]]:
        """The spans `pattern` covers in `text`, overlapping occurrences joined.

        Two overlapping occurrences lie a period of the pattern apart; when they are closer than
        half its length, a multiple of its smallest period (Fine and Wilf). So from each
        occurrence, the run of occurrences one smallest period apart is followed at once (as far
        as the text keeps that period), then the search goes on one character later."""
        i = text.find(pattern)
        if i < 0:
            return []
        size = len(pattern)
        period = self._periods.get(pattern)
        if period is None:
            period = self._periods[pattern] = _period(pattern)
        spans = []
        while i >= 0:
            start = i
            if text.startswith(pattern[size - period :], i + size):  # the next one is there: follow the run
                i += (_periodic_run(text, i + size, period) // period) * period
            spans.append((start, i + size))
            i = text.find(pattern, i + 1)
        return spans

    def mask_optional(self, text: str | None) -> str | None:
        return None if text is None else self.mask(text)
