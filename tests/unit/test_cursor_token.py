"""The resume token: the feed cursor as a string that sorts as the cursor does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from infra.broker.cursor import cursor_token, parse_cursor_token

cursors = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**63 - 1))


@given(cursors, cursors)
def test_tokens_sort_as_their_cursors_and_read_back(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert (cursor_token(a) < cursor_token(b)) == (a < b)
    assert parse_cursor_token(cursor_token(a)) == a


def test_anything_else_is_not_a_token() -> None:
    for wrong in (None, 7, "", "0" * 31, "0" * 33, "G" * 32, "A" * 32, "0x" + "0" * 30, " " + "0" * 31):
        assert parse_cursor_token(wrong) is None, wrong
