"""Cron schedules in a time zone (domain/cron.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.cron import CronError, CronSchedule

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
ZUTC = ZoneInfo("UTC")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def local(tz: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int = 0, *, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=tz, fold=fold)


def ticks(expr: str, start: datetime, end: datetime, tz: ZoneInfo = ZUTC) -> list[datetime]:
    return list(CronSchedule.parse(expr).ticks_between(start, end, tz))


def walls(expr: str, start: datetime, count: int, tz: ZoneInfo) -> list[str]:
    """The next `count` ticks after `start`, as local ISO strings with offsets."""
    schedule = CronSchedule.parse(expr)
    out: list[str] = []
    t = start
    for _ in range(count):
        t = schedule.next_after(t, tz)
        out.append(t.astimezone(tz).isoformat())
    return out


# -------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("expr", "index", "expected"),
    [
        ("* * * * *", 0, set(range(60))),
        ("5 * * * *", 0, {5}),
        ("1,2,59 * * * *", 0, {1, 2, 59}),
        ("10-15 * * * *", 0, {10, 11, 12, 13, 14, 15}),
        ("*/15 * * * *", 0, {0, 15, 30, 45}),
        ("1-10/2 * * * *", 0, {1, 3, 5, 7, 9}),
        ("50/3 * * * *", 0, {50, 53, 56, 59}),
        ("*/100 * * * *", 0, {0}),
        ("0,30-32,*/20 * * * *", 0, {0, 20, 30, 31, 32, 40}),
        ("0 */6 * * *", 1, {0, 6, 12, 18}),
        ("0 9-17 * * *", 1, set(range(9, 18))),
        ("0 0 1,15 * *", 2, {1, 15}),
        ("0 0 */10 * *", 2, {1, 11, 21, 31}),
        ("0 0 * JAN,jul,Dec *", 3, {1, 7, 12}),
        ("0 0 * feb-APR *", 3, {2, 3, 4}),
        ("0 0 * */3 *", 3, {1, 4, 7, 10}),
        ("0 0 * * MON-FRI", 4, {1, 2, 3, 4, 5}),
        ("0 0 * * sun", 4, {0}),
        ("0 0 * * 0", 4, {0}),
        ("0 0 * * 7", 4, {0}),
        ("0 0 * * 5-7", 4, {5, 6, 0}),
        ("0 0 * * FRI-SUN", 4, {5, 6, 0}),
        ("0 0 * * */2", 4, {0, 2, 4, 6}),
        ("0 0 * * *", 4, set(range(7))),
    ],
)
def test_each_field_form_parses_to_its_set_of_values(expr: str, index: int, expected: set[int]) -> None:
    s = CronSchedule.parse(expr)
    fields = [set(s.minutes), set(s.hours), set(s.days_of_month), set(s.months), set(s.days_of_week)]
    assert fields[index] == expected


@pytest.mark.parametrize(
    ("macro", "equivalent"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_macros_mean_their_five_field_forms(macro: str, equivalent: str) -> None:
    a, b = CronSchedule.parse(macro), CronSchedule.parse(equivalent)
    assert (a.minutes, a.hours, a.days_of_month, a.months, a.days_of_week) == (
        b.minutes,
        b.hours,
        b.days_of_month,
        b.months,
        b.days_of_week,
    )
    assert str(a) == macro


def test_blanks_around_and_between_fields_are_ignored() -> None:
    s = CronSchedule.parse("  */5\t1   *  *  * ")
    assert s.expression == "*/5\t1   *  *  *"
    assert s.hours == (1,)


@pytest.mark.parametrize(
    ("expr", "field", "message"),
    [
        ("", None, "empty cron expression"),
        ("* * * *", None, "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
        ("* * * * * *", None, "expected 5 fields (minute hour day-of-month month day-of-week), got 6"),
        (
            "@reboot",
            None,
            "unknown macro '@reboot'; supported: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly",
        ),
        ("60 * * * *", "minute", "minute field '60': 60 is out of range 0-59"),
        ("* 24 * * *", "hour", "hour field '24': 24 is out of range 0-23"),
        ("* * 0 * *", "day-of-month", "day-of-month field '0': 0 is out of range 1-31"),
        ("* * 32 * *", "day-of-month", "day-of-month field '32': 32 is out of range 1-31"),
        ("* * * 13 *", "month", "month field '13': 13 is out of range 1-12"),
        ("* * * * 8", "day-of-week", "day-of-week field '8': 8 is out of range 0-7"),
        ("*/0 * * * *", "minute", "minute field '*/0': step must be at least 1"),
        ("*/ * * * *", "minute", "minute field '*/': missing step after '/'"),
        ("*/x * * * *", "minute", "minute field '*/x': step 'x' is not a number"),
        ("5-1 * * * *", "minute", "minute field '5-1': range '5-1' runs backwards"),
        ("1,,2 * * * *", "minute", "minute field '1,,2': empty list item"),
        ("-5 * * * *", "minute", "minute field '-5': missing number"),
        ("MON * * * *", "minute", "minute field 'MON': 'MON' is not a number"),
        ("* * * JANUARY *", "month", "month field 'JANUARY': 'JANUARY' is not a number or a name (JAN-DEC)"),
        ("* * * * MON-FUN", "day-of-week", "day-of-week field 'MON-FUN': 'FUN' is not a number or a name (SUN-SAT)"),
        ("* * ? * *", "day-of-month", "day-of-month field '?': '?' is not a number"),
        ("* * L * *", "day-of-month", "day-of-month field 'L': 'L' is not a number"),
        ("0 0 30 2 *", "day-of-month", "day-of-month field '30' never occurs in month field '2'"),
        ("0 0 31 4,6,9,11 *", "day-of-month", "day-of-month field '31' never occurs in month field '4,6,9,11'"),
    ],
)
def test_bad_expressions_are_refused_naming_the_field(expr: str, field: str | None, message: str) -> None:
    with pytest.raises(CronError) as info:
        CronSchedule.parse(expr)
    assert str(info.value) == message
    assert info.value.field == field


def test_impossible_days_are_fine_when_the_day_of_week_can_still_match() -> None:
    s = CronSchedule.parse("0 0 30 2 MON")  # OR rule: every Monday in February
    assert s.next_after(utc(2024, 1, 1), ZUTC) == utc(2024, 2, 5)


# ------------------------------------------------------------------------------------- next_after


def test_next_after_is_strictly_after_and_in_utc() -> None:
    s = CronSchedule.parse("*/15 * * * *")
    assert s.next_after(utc(2024, 5, 1, 10, 0), ZUTC) == utc(2024, 5, 1, 10, 15)
    assert s.next_after(utc(2024, 5, 1, 10, 14, 59, 999999), ZUTC) == utc(2024, 5, 1, 10, 15)
    assert s.next_after(utc(2024, 5, 1, 10, 15, 0, 1), ZUTC) == utc(2024, 5, 1, 10, 30)
    t = s.next_after(utc(2024, 5, 1, 23, 50), ZUTC)
    assert t == utc(2024, 5, 2, 0, 0)
    assert t.tzinfo is UTC


def test_next_after_takes_any_aware_time_and_refuses_naive_ones() -> None:
    s = CronSchedule.parse("0 9 * * *")
    tokyo_evening = datetime(2024, 5, 1, 20, 0, tzinfo=timezone(timedelta(hours=9)))  # 11:00 UTC
    assert s.next_after(tokyo_evening, BERLIN) == utc(2024, 5, 2, 7, 0)  # 09:00 CEST
    with pytest.raises(ValueError, match="timezone-aware"):
        s.next_after(datetime(2024, 5, 1), BERLIN)


def test_schedules_are_evaluated_in_their_time_zone() -> None:
    s = CronSchedule.parse("0 9 * * MON-FRI")
    friday_evening = utc(2024, 5, 3, 18)
    assert s.next_after(friday_evening, BERLIN) == utc(2024, 5, 6, 7)
    assert s.next_after(friday_evening, NEW_YORK) == utc(2024, 5, 6, 13)
    assert s.next_after(friday_evening, ZUTC) == utc(2024, 5, 6, 9)


def test_hours_minutes_and_weekday_names_combine() -> None:
    assert walls("30 8-9 * * TUE,thu", local(BERLIN, 2024, 5, 6, 12), 5, BERLIN) == [
        "2024-05-07T08:30:00+02:00",
        "2024-05-07T09:30:00+02:00",
        "2024-05-09T08:30:00+02:00",
        "2024-05-09T09:30:00+02:00",
        "2024-05-14T08:30:00+02:00",
    ]


def test_months_by_name_and_step() -> None:
    assert walls("0 0 1 JAN-DEC/3 *", utc(2024, 2, 1), 4, ZUTC) == [
        "2024-04-01T00:00:00+00:00",
        "2024-07-01T00:00:00+00:00",
        "2024-10-01T00:00:00+00:00",
        "2025-01-01T00:00:00+00:00",
    ]


def test_sunday_is_zero_or_seven() -> None:
    a = CronSchedule.parse("0 12 * * 0").next_after(utc(2024, 5, 1), ZUTC)
    b = CronSchedule.parse("0 12 * * 7").next_after(utc(2024, 5, 1), ZUTC)
    assert a == b == utc(2024, 5, 5, 12)
    assert a.weekday() == 6


def test_day_31_skips_months_that_are_shorter() -> None:
    assert [t.date() for t in ticks("0 0 31 * *", utc(2024, 1, 1), utc(2025, 1, 1))] == [
        date(2024, 1, 31),
        date(2024, 3, 31),
        date(2024, 5, 31),
        date(2024, 7, 31),
        date(2024, 8, 31),
        date(2024, 10, 31),
        date(2024, 12, 31),
    ]
    assert CronSchedule.parse("0 0 31 * *").next_after(utc(2024, 1, 31), ZUTC) == utc(2024, 3, 31)


def test_february_29_only_in_leap_years() -> None:
    s = CronSchedule.parse("0 0 29 2 *")
    assert s.next_after(utc(2024, 1, 1), ZUTC) == utc(2024, 2, 29)
    assert s.next_after(utc(2024, 2, 29), ZUTC) == utc(2028, 2, 29)
    assert s.next_after(utc(2096, 3, 1), ZUTC) == utc(2104, 2, 29)  # 2100 is not a leap year
    assert s.latest_at_or_before(utc(2027, 6, 1), ZUTC) == utc(2024, 2, 29)
    assert ticks("0 0 * 2 *", utc(2023, 2, 27), utc(2023, 3, 2)) == [utc(2023, 2, 28)]
    assert ticks("0 0 * 2 *", utc(2024, 2, 27), utc(2024, 3, 2)) == [utc(2024, 2, 28), utc(2024, 2, 29)]


def test_day_of_month_and_day_of_week_both_restricted_match_either() -> None:
    # The 13th of any month, or any Friday (Sep 13 2024 is both).
    days = [t.date() for t in ticks("0 0 13 * FRI", utc(2024, 9, 1), utc(2024, 10, 20))]
    assert days == [
        date(2024, 9, 6),
        date(2024, 9, 13),
        date(2024, 9, 20),
        date(2024, 9, 27),
        date(2024, 10, 4),
        date(2024, 10, 11),
        date(2024, 10, 13),
        date(2024, 10, 18),
    ]


def test_a_field_starting_with_a_star_is_not_restricted() -> None:
    # Vixie rule: `*/2` counts as unrestricted, so both must match: odd days that are Mondays.
    s = CronSchedule.parse("0 0 */2 * MON")
    assert not s.day_of_month_restricted
    assert [t.date() for t in ticks("0 0 */2 * MON", utc(2024, 3, 31), utc(2024, 5, 1))] == [
        date(2024, 4, 1),
        date(2024, 4, 15),
        date(2024, 4, 29),
    ]
    # `1-31` is restricted: either matches, which is every day.
    assert len(ticks("0 0 1-31 * MON", utc(2024, 3, 31), utc(2024, 4, 30))) == 30
    # Only the day of week restricted: Mondays only.
    assert len(ticks("0 0 * * MON", utc(2024, 3, 31), utc(2024, 4, 30))) == 5


# --------------------------------------------------------------------------------------------- DST


def test_berlin_spring_forward_skips_the_missing_local_time() -> None:
    # 2024-03-31: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    assert walls("30 2 * * *", utc(2024, 3, 29, 12), 3, BERLIN) == [
        "2024-03-30T02:30:00+01:00",
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]


def test_berlin_spring_forward_hourly_ticks() -> None:
    assert [
        t.astimezone(BERLIN).isoformat()
        for t in ticks("0 * * * *", utc(2024, 3, 30, 23, 30), utc(2024, 3, 31, 2, 30), BERLIN)
    ] == ["2024-03-31T01:00:00+01:00", "2024-03-31T03:00:00+02:00", "2024-03-31T04:00:00+02:00"]
    assert [
        t.isoformat() for t in ticks("*/30 1-3 31 3 *", utc(2024, 3, 30, 23, 0), utc(2024, 3, 31, 3, 0), BERLIN)
    ] == [
        "2024-03-31T00:00:00+00:00",
        "2024-03-31T00:30:00+00:00",
        "2024-03-31T01:00:00+00:00",
        "2024-03-31T01:30:00+00:00",
    ]


def test_berlin_fall_back_fires_an_ambiguous_time_once_at_its_first_occurrence() -> None:
    # 2024-10-27: 03:00 CEST falls back to 02:00 CET; 02:00-02:59 happens twice.
    assert walls("30 2 * * *", utc(2024, 10, 26, 12), 3, BERLIN) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]
    assert [
        t.astimezone(BERLIN).isoformat()
        for t in ticks("0,30 * * * *", utc(2024, 10, 26, 23, 15), utc(2024, 10, 27, 2, 45), BERLIN)
    ] == [
        "2024-10-27T01:30:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00",
        # 02:00 and 02:30 CET (second occurrence) do not fire again
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T03:30:00+01:00",
    ]


def test_berlin_fall_back_from_inside_the_repeated_hour() -> None:
    s = CronSchedule.parse("45 2 * * *")
    second_pass = local(BERLIN, 2024, 10, 27, 2, 15, fold=1)  # 01:15 UTC
    assert second_pass.astimezone(UTC) == utc(2024, 10, 27, 1, 15)
    assert s.next_after(second_pass, BERLIN) == utc(2024, 10, 28, 1, 45)
    # The latest tick at or before it is the first 02:45, 30 minutes earlier in real time.
    assert s.latest_at_or_before(second_pass, BERLIN) == utc(2024, 10, 27, 0, 45)
    first_pass = local(BERLIN, 2024, 10, 27, 2, 15)  # 00:15 UTC
    assert s.next_after(first_pass, BERLIN) == utc(2024, 10, 27, 0, 45)
    assert s.latest_at_or_before(first_pass, BERLIN) == utc(2024, 10, 26, 0, 45)  # 02:45 CEST the day before


def test_new_york_transitions() -> None:
    # 2024-03-10 02:00 EST -> 03:00 EDT; 2024-11-03 02:00 EDT -> 01:00 EST.
    assert walls("30 2 * * *", utc(2024, 3, 9, 12), 2, NEW_YORK) == [
        "2024-03-11T02:30:00-04:00",
        "2024-03-12T02:30:00-04:00",
    ]
    assert walls("30 1 * * *", utc(2024, 11, 2, 12), 2, NEW_YORK) == [
        "2024-11-03T01:30:00-04:00",
        "2024-11-04T01:30:00-05:00",
    ]


# ------------------------------------------------------------------------------ ticks and catch-up


def test_ticks_between_is_half_open_and_bounded() -> None:
    s = CronSchedule.parse("*/10 * * * *")
    got = list(s.ticks_between(utc(2024, 1, 1, 0, 0), utc(2024, 1, 1, 1, 0), ZUTC))
    assert got[0] == utc(2024, 1, 1, 0, 10)
    assert got[-1] == utc(2024, 1, 1, 1, 0)
    assert len(got) == 6
    assert list(s.ticks_between(utc(2024, 1, 1, 1), utc(2024, 1, 1, 1), ZUTC)) == []
    assert list(s.ticks_between(utc(2024, 1, 2), utc(2024, 1, 1), ZUTC)) == []
    limited = list(s.ticks_between(utc(2024, 1, 1), utc(2030, 1, 1), ZUTC, limit=3))
    assert limited == [utc(2024, 1, 1, 0, 10), utc(2024, 1, 1, 0, 20), utc(2024, 1, 1, 0, 30)]
    with pytest.raises(ValueError, match="timezone-aware"):
        s.ticks_between(datetime(2024, 1, 1), utc(2024, 1, 2), ZUTC)
    with pytest.raises(ValueError, match="limit"):
        s.ticks_between(utc(2024, 1, 1), utc(2024, 1, 2), ZUTC, limit=-1)


def test_latest_at_or_before_includes_an_exact_tick() -> None:
    s = CronSchedule.parse("0 * * * *")
    assert s.latest_at_or_before(utc(2024, 1, 1, 13, 0), ZUTC) == utc(2024, 1, 1, 13, 0)
    assert s.latest_at_or_before(utc(2024, 1, 1, 12, 59, 59), ZUTC) == utc(2024, 1, 1, 12, 0)
    assert s.latest_at_or_before(utc(2024, 1, 1, 0, 30), BERLIN) == utc(2024, 1, 1, 0, 0)


def test_latest_at_or_before_is_none_when_nothing_earlier_exists() -> None:
    s = CronSchedule.parse("0 12 * * *")
    assert s.latest_at_or_before(datetime(1, 1, 1, 6, tzinfo=UTC), ZUTC) is None


def test_catch_up_fires_one_missed_tick_after_downtime() -> None:
    s = CronSchedule.parse("0 * * * *")
    last_fired = utc(2024, 6, 1, 10, 0)
    now = utc(2024, 6, 1, 13, 30)  # down from 10:05 to 13:30: 11:00, 12:00 and 13:00 were missed
    missed = s.latest_at_or_before(now, BERLIN)
    assert missed == utc(2024, 6, 1, 13, 0)
    assert missed > last_fired  # so the scheduler fires it, once
    assert s.next_after(now, BERLIN) == utc(2024, 6, 1, 14, 0)
    # Nothing was missed when the last tick fired is the latest one.
    assert s.latest_at_or_before(utc(2024, 6, 1, 10, 30), BERLIN) == last_fired


def test_matches_wall_and_matches_day() -> None:
    s = CronSchedule.parse("15 10 * * SAT")
    assert s.matches_wall(datetime(2024, 5, 4, 10, 15))
    assert not s.matches_wall(datetime(2024, 5, 4, 10, 15, 1))
    assert not s.matches_wall(datetime(2024, 5, 5, 10, 15))
    assert s.matches_day(date(2024, 5, 4))


# -------------------------------------------------------------------------------------- properties


def _item(lo: int, hi: int) -> st.SearchStrategy[str]:
    value = st.integers(lo, hi)
    step = st.integers(1, max(1, (hi - lo) // 2 + 1))
    ranges = st.tuples(value, value).map(sorted)
    return st.one_of(
        st.just("*"),
        step.map(lambda k: f"*/{k}"),
        value.map(str),
        ranges.map(lambda r: f"{r[0]}-{r[1]}"),
        st.tuples(ranges, step).map(lambda x: f"{x[0][0]}-{x[0][1]}/{x[1]}"),
    )


def _field(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.lists(_item(lo, hi), min_size=1, max_size=3).map(",".join)


_FIELDS = (
    st.one_of(st.sampled_from(["*", "*/7", "0", "0,30", "*/20", "59"]), _field(0, 59)),
    st.one_of(st.sampled_from(["*", "1,2,3", "2", "0-4", "*/5"]), _field(0, 23)),
    st.one_of(st.just("*"), _field(1, 31)),
    st.one_of(st.just("*"), _field(1, 12)),
    st.one_of(st.just("*"), _field(0, 7)),
)


def _schedule(fields: tuple[str, ...]) -> CronSchedule:
    try:
        return CronSchedule.parse(" ".join(fields))
    except CronError:  # a day of month that never occurs in the months drawn
        return CronSchedule.parse(" ".join([*fields[:2], "*", "*", fields[4]]))


_SCHEDULES = st.tuples(*_FIELDS).map(_schedule)


_STARTS = st.one_of(
    st.datetimes(datetime(2023, 1, 1), datetime(2026, 12, 31)).map(lambda d: d.replace(tzinfo=UTC)),
    st.sampled_from([utc(2024, 2, 28, 12), utc(2023, 12, 31, 12), utc(2024, 4, 30, 12)]),
)
_TIMEZONES = st.sampled_from([BERLIN, NEW_YORK, ZUTC])
# (zone, the instant its clocks change)
_TRANSITIONS = st.sampled_from(
    [
        (BERLIN, utc(2024, 3, 31, 1)),
        (BERLIN, utc(2024, 10, 27, 1)),
        (BERLIN, utc(2025, 3, 30, 1)),
        (BERLIN, utc(2025, 10, 26, 1)),
        (NEW_YORK, utc(2024, 3, 10, 7)),
        (NEW_YORK, utc(2024, 11, 3, 6)),
    ]
)
_TIMES_OF_DAY = st.tuples(
    st.one_of(st.sampled_from(["*", "*/7", "0", "0,30", "*/20", "59", "15,45"]), _field(0, 59)),
    st.one_of(st.sampled_from(["*", "1,2,3", "2", "0-4", "1", "*/5"]), _field(0, 23)),
).map(lambda f: CronSchedule.parse(f"{f[0]} {f[1]} * * *"))


def _brute_force(s: CronSchedule, start: datetime, end: datetime, tz: ZoneInfo) -> list[datetime]:
    """Every minute instant in (start, end] whose local time matches, skipping second occurrences."""
    out = []
    t = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while t <= end:
        wall = t.astimezone(tz)
        dom = wall.day in s.days_of_month
        dow = wall.isoweekday() % 7 in s.days_of_week
        day_ok = (dom or dow) if (s.day_of_month_restricted and s.day_of_week_restricted) else (dom and dow)
        if wall.fold == 0 and wall.minute in s.minutes and wall.hour in s.hours and wall.month in s.months and day_ok:
            out.append(t)
        t += timedelta(minutes=1)
    return out


def _check_against_brute_force(s: CronSchedule, start: datetime, tz: ZoneInfo, probe: int) -> None:
    end = start + timedelta(hours=36)
    expected = _brute_force(s, start, end, tz)
    assert list(s.ticks_between(start, end, tz)) == expected
    # next_after walks the same ticks (the first 100), strictly increasing, as aware UTC on the minute.
    walked: list[datetime] = []
    t = start
    while len(walked) < 100:
        t2 = s.next_after(t, tz)
        assert t2 > t
        assert t2.tzinfo is UTC
        assert t2.second == 0
        if t2 > end:
            break
        walked.append(t2)
        t = t2
    assert walked == expected[:100]
    # latest_at_or_before: the last tick at or before a point of the window, exact ticks included.
    dt = start + timedelta(minutes=probe)
    before = [x for x in expected if x <= dt]
    latest = s.latest_at_or_before(dt, tz)
    if before:
        assert latest == before[-1]
    else:
        assert latest is not None
        assert latest <= start
    for tick in expected[:5]:
        assert s.latest_at_or_before(tick, tz) == tick
        assert s.next_after(tick - timedelta(seconds=1), tz) == tick


@settings(max_examples=100, deadline=None)
@given(_SCHEDULES, _STARTS, _TIMEZONES, st.integers(0, 36 * 60))
def test_ticks_match_a_brute_force_minute_scan(s: CronSchedule, start: datetime, tz: ZoneInfo, probe: int) -> None:
    _check_against_brute_force(s, start, tz, probe)


@settings(max_examples=100, deadline=None)
@given(_TIMES_OF_DAY, _TRANSITIONS, st.integers(-24 * 60, 0), st.integers(0, 36 * 60))
def test_ticks_across_dst_transitions_match_a_brute_force_minute_scan(
    s: CronSchedule, transition: tuple[ZoneInfo, datetime], offset: int, probe: int
) -> None:
    tz, instant = transition
    _check_against_brute_force(s, instant + timedelta(minutes=offset), tz, probe)


@settings(max_examples=100, deadline=None)
@given(_SCHEDULES, _STARTS, _TIMEZONES)
def test_latest_at_or_before_is_the_tick_before_next_after(s: CronSchedule, dt: datetime, tz: ZoneInfo) -> None:
    latest = s.latest_at_or_before(dt, tz)
    assert latest is not None
    assert latest <= dt
    assert s.next_after(latest, tz) == s.next_after(dt, tz)
