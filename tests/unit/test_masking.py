"""Masking of secret values in log lines and errors (domain/masking.py)."""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from domain.masking import MASK, Masker


def test_every_occurrence_of_every_value_is_masked() -> None:
    m = Masker(["hunter2", "s3cr3t-token"])
    assert m.mask("password=hunter2 token=s3cr3t-token again hunter2") == "password=*** token=*** again ***"
    assert m.mask("nothing to hide") == "nothing to hide"


def test_empty_values_mask_nothing_and_no_values_is_a_no_op() -> None:
    assert not Masker([])
    assert not Masker([""])
    assert Masker([""]).mask("anything at all") == "anything at all"
    text = "some line"
    assert Masker().mask(text) is text


def test_short_values_are_masked_too() -> None:
    assert Masker(["ab"]).mask("xaby ab") == "x***y ***"
    assert Masker(["7"]).mask("1776") == "1***6"


def test_the_longest_value_wins_where_values_share_a_prefix() -> None:
    m = Masker(["abc", "abcdef"])
    assert m.mask("abcdefg abcx") == "***g ***x"


def test_overlapping_values_are_masked_together() -> None:
    m = Masker(["abcd", "cdef"])
    assert m.mask("xxabcdefyy") == "xx***yy"
    assert m.mask("abcdabcd") == "***"
    assert Masker(["aa"]).mask("aaa") == "***"


def test_regex_metacharacters_are_literal() -> None:
    m = Masker(["a.b*c", "(x|y)", "\\d+"])
    assert m.mask("a.b*c axbc (x|y) x \\d+ 42") == "*** axbc *** x *** 42"


def test_each_line_of_a_multi_line_value_is_masked_on_its_own() -> None:
    pem = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEA1234\nabcdEFGH5678\n}\n-----END KEY-----"
    m = Masker([pem])
    assert m.mask("MIIEowIBAAKCAQEA1234") == MASK
    assert m.mask("  abcdEFGH5678  ") == f"  {MASK}  "
    assert m.mask("-----END KEY-----") == MASK
    assert m.mask("if (x) { y }") == "if (x) { y }"  # a short line of the value masks nothing
    assert m.mask(pem) == MASK


def test_common_encodings_of_a_value_are_masked() -> None:
    value = 'p@ss w/"quote"é'
    m = Masker([value])
    assert m.mask(json.dumps({"pw": value})) == '{"pw": "***"}'
    assert m.mask(json.dumps({"pw": value}, ensure_ascii=False)) == '{"pw": "***"}'
    assert m.mask(f"https://host/?pw={quote(value, safe='')}") == "https://host/?pw=***"
    assert MASK in m.mask(base64.b64encode(value.encode()).decode())
    assert MASK in m.mask(base64.urlsafe_b64encode(value.encode()).decode())


def test_mask_optional() -> None:
    m = Masker(["x1y2"])
    assert m.mask_optional(None) is None
    assert m.mask_optional("exit: x1y2") == "exit: ***"


@given(
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_no_value_survives_masking(values: list[str], before: str, after: str) -> None:
    m = Masker(values)
    # The mask itself may complete a value with what is left beside it ("0" + "***" holds "0*"):
    # that reveals nothing, so the check reads the masks as a character no value contains.
    blank = next(c for c in map(chr, range(0xE000, 0xE100)) if all(c not in v for v in values))
    for value in values:
        masked = m.mask(before + value + after)
        assert value not in masked.replace(MASK, blank) or value in MASK


def test_masking_many_lines_with_many_secrets_is_fast() -> None:
    secrets = [f"secret-value-{i:03d}-{'x' * (i % 20)}" for i in range(100)]
    m = Masker(secrets)
    clean = [f"line {i}: compiling module {i % 97} ... ok" for i in range(50_000)]
    dirty = [f"token {secrets[i % 100]} used" for i in range(1_000)]
    began = time.perf_counter()
    out = [m.mask(line) for line in clean]
    out += [m.mask(line) for line in dirty]
    elapsed = time.perf_counter() - began
    assert out[:50_000] == clean
    assert all(line == "token *** used" for line in out[50_000:])
    assert elapsed < 5, f"masking 51,000 lines took {elapsed:.2f}s"


def _reference(values: list[str], text: str) -> str:
    """Brute force: every position where any pattern of the masker starts, all overlaps."""
    covered = [False] * len(text)
    for pattern in Masker(values).patterns:
        for i in range(len(text) - len(pattern) + 1):
            if text.startswith(pattern, i):
                covered[i : i + len(pattern)] = [True] * len(pattern)
    out, i = [], 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            out.append(MASK)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@given(st.lists(st.text("ab", min_size=1, max_size=6), min_size=1, max_size=3), st.text("abc", max_size=30))
def test_masking_covers_exactly_every_occurrence_even_overlapping(values: list[str], text: str) -> None:
    assert Masker(values).mask(text) == _reference(values, text)


def test_periodic_values_overlapping_themselves_are_masked_whole() -> None:
    assert Masker(["abab"]).mask("xababababy") == "x***y"
    assert Masker(["aabaa"]).mask("aabaaabaa") == "***"


def test_crafted_values_and_output_cost_linear_time() -> None:
    """A run controls both its secrets and its output: neither may stall the executor."""
    cases = [
        (["x" * 32768], "y" + "x" * 65536 + "y", "y***y"),
        (["x" * 32767 + "y"], "x" * 65536, "x" * 65536),
        (["ab" * 16384], "ab" * 32768, "***"),
        (["a" * i for i in range(1, 200)], "b" + "a" * 65536 + "b", "b***b"),
    ]
    for values, text, expected in cases:
        began = time.perf_counter()
        masked = Masker(values).mask(text)
        elapsed = time.perf_counter() - began
        assert masked == expected
        assert elapsed < 1, f"{elapsed:.2f}s for values of {len(values[0])} characters"
