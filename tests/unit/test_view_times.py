"""Times in the API's objects: milliseconds, UTC, a `Z`, as the API reference writes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from projections.views import iso


def test_a_time_is_written_in_utc_to_the_millisecond_with_a_z() -> None:
    assert iso(datetime(2026, 3, 16, 0, 0, tzinfo=UTC)) == "2026-03-16T00:00:00.000Z"
    # Truncated, never rounded up into the next second.
    assert iso(datetime(2026, 3, 16, 23, 59, 59, 999_999, tzinfo=UTC)) == "2026-03-16T23:59:59.999Z"


def test_a_time_with_another_offset_is_written_as_the_same_instant_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    assert iso(datetime(2026, 3, 16, 1, 30, 0, 250_000, tzinfo=paris)) == "2026-03-16T00:30:00.250Z"
    # The same instant written twice in a row (the second from the cache) reads the same.
    assert iso(datetime(2026, 3, 16, 0, 30, 0, 250_000, tzinfo=UTC)) == "2026-03-16T00:30:00.250Z"


def test_a_naive_time_is_taken_as_utc_and_none_stays_none() -> None:
    assert iso(datetime(2026, 3, 16, 12, 0, 0, 1_000)) == "2026-03-16T12:00:00.001Z"
    assert iso(None) is None
