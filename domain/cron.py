"""Five-field cron schedules, evaluated in a time zone.

Pure: no clock and no IO. The caller passes the current time and a `tzinfo` (normally a
`zoneinfo.ZoneInfo`, which it builds; reading the zone database is IO and stays outside `domain/`).

Syntax: `minute hour day-of-month month day-of-week`, fields separated by blanks.

- Each field is a comma-separated list of items: `*`, `N`, `A-B`, each optionally `/STEP`
  (`*/5`, `1-10/2`); `N/STEP` means `N-max/STEP`. Ranges do not wrap (`5-1` is an error).
- Bounds: minute 0-59, hour 0-23, day-of-month 1-31, month 1-12, day-of-week 0-7 (0 and 7 are Sunday).
- Names, case-insensitive: months JAN-DEC, weekdays SUN-SAT. `SUN` at the end of a range is 7, so
  `FRI-SUN` means Friday to Sunday.
- Macros: @yearly = @annually = `0 0 1 1 *`, @monthly = `0 0 1 * *`, @weekly = `0 0 * * 0`,
  @daily = @midnight = `0 0 * * *`, @hourly = `0 * * * *`.
- Day rule (Vixie cron): a day-of-month or day-of-week field is *restricted* unless it starts with
  `*` (so `*/2` is not restricted). When both are restricted a day matches if EITHER matches;
  otherwise it must match both (the unrestricted one matches every day).
- A day-of-month that never occurs in the chosen months (`0 0 30 2 *`) is refused at parse time.

Times: a tick is a local wall-clock minute in the time zone, second 0. Results are aware UTC
datetimes; inputs must be aware (any zone). Across DST: a local time that does not exist (spring
forward gap) does not fire that day; a local time that occurs twice (fall back) fires once, at its
first occurrence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import MAXYEAR, MINYEAR, UTC, date, datetime, timedelta, tzinfo
from typing import Final

FIELD_NAMES: Final = ("minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS: Final = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_MONTHS: Final = {
    name: i + 1
    for i, name in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))
}
_WEEKDAYS: Final = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_DAYS_IN_MONTH: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February of a leap year

MACROS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# How far next_after / latest_at_or_before look. A valid schedule fires at least every 8 years (Feb 29).
SEARCH_YEARS: Final = 28
DEFAULT_TICK_LIMIT: Final = 100_000

_DIGITS: Final = re.compile(r"[0-9]+")


class CronError(ValueError):
    """A cron expression that cannot be parsed. `field` names the bad field when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A parsed cron expression. Build with `CronSchedule.parse`."""

    expression: str
    minutes: tuple[int, ...]  # sorted
    hours: tuple[int, ...]  # sorted
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    day_of_month_restricted: bool
    day_of_week_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse five fields or a macro. Raises CronError naming the bad field."""
        text = expression.strip()
        if not text:
            raise CronError("empty cron expression")
        if text.startswith("@"):
            macro = MACROS.get(text.lower())
            if macro is None:
                raise CronError(f"unknown macro '{text}'; supported: {', '.join(MACROS)}")
            fields = macro.split()
        else:
            fields = text.split()
        if len(fields) != 5:
            raise CronError(f"expected 5 fields ({' '.join(FIELD_NAMES)}), got {len(fields)}")
        sets = [_parse_field(f, i) for i, f in enumerate(fields)]
        minutes, hours, doms, months, dows = sets
        dom_restricted = not fields[2].startswith("*")
        dow_restricted = not fields[4].startswith("*")
        if dom_restricted and not dow_restricted and not any(d <= _DAYS_IN_MONTH[m - 1] for m in months for d in doms):
            raise CronError(
                f"day-of-month field '{fields[2]}' never occurs in month field '{fields[3]}'", "day-of-month"
            )
        return cls(
            expression=text,
            minutes=tuple(sorted(minutes)),
            hours=tuple(sorted(hours)),
            days_of_month=frozenset(doms),
            months=frozenset(months),
            days_of_week=frozenset(dows),
            day_of_month_restricted=dom_restricted,
            day_of_week_restricted=dow_restricted,
        )

    def __str__(self) -> str:
        return self.expression

    # ------------------------------------------------------------------------------------ matching

    def matches_day(self, day: date) -> bool:
        """Whether the schedule fires on this local calendar day (month and the day rule)."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days_of_month
        dow = (day.weekday() + 1) % 7 in self.days_of_week
        if self.day_of_month_restricted and self.day_of_week_restricted:
            return dom or dow
        return dom and dow

    def matches_wall(self, wall: datetime) -> bool:
        """Whether a local wall-clock time (naive, or its own tzinfo ignored) is a tick minute."""
        return (
            wall.second == 0
            and wall.microsecond == 0
            and wall.minute in self.minutes
            and wall.hour in self.hours
            and self.matches_day(wall.date())
        )

    # ------------------------------------------------------------------------------------- queries

    def next_after(self, dt: datetime, tz: tzinfo) -> datetime:
        """The first tick strictly after `dt` (aware), as an aware UTC datetime."""
        _require_aware(dt, "dt")
        local = dt.astimezone(tz)
        start = local.replace(tzinfo=None, second=0, microsecond=0, fold=0)
        for wall in self._walls_forward(start, _add_years(start.date(), SEARCH_YEARS)):
            tick = _instant(wall, tz)
            if tick is not None and tick > dt:
                return tick
        raise CronError(f"'{self.expression}' does not fire within {SEARCH_YEARS} years after {dt.isoformat()}")

    def latest_at_or_before(self, dt: datetime, tz: tzinfo) -> datetime | None:
        """The last tick at or before `dt` (aware), as aware UTC; None when there is none within
        SEARCH_YEARS. For catch-up: fire it once if it is later than the last tick fired."""
        _require_aware(dt, "dt")
        local = dt.astimezone(tz)
        wall = local.replace(tzinfo=None, fold=0)
        if local.fold:
            # dt is the second occurrence of an ambiguous time: first occurrences of later wall times
            # (up to the size of the shift) were still before it.
            first, second = local.replace(fold=0).utcoffset(), local.utcoffset()
            if first is not None and second is not None and first > second:
                wall += first - second
        start = wall.replace(second=0, microsecond=0)
        for candidate in self._walls_backward(start, _add_years(start.date(), -SEARCH_YEARS)):
            tick = _instant(candidate, tz)
            if tick is not None and tick <= dt:
                return tick
        return None

    def ticks_between(
        self, start: datetime, end: datetime, tz: tzinfo, *, limit: int = DEFAULT_TICK_LIMIT
    ) -> Iterator[datetime]:
        """The ticks t with start < t <= end, in order, as aware UTC; at most `limit` of them."""
        _require_aware(start, "start")
        _require_aware(end, "end")
        if limit < 0:
            raise ValueError("limit must not be negative")
        return self._ticks(start, end, tz, limit)

    def _ticks(self, start: datetime, end: datetime, tz: tzinfo, limit: int) -> Iterator[datetime]:
        if end <= start or limit == 0:
            return
        first = start.astimezone(tz).replace(tzinfo=None, second=0, microsecond=0, fold=0)
        stop = end.astimezone(tz).date() + timedelta(days=2) if end.year < MAXYEAR else date.max
        count = 0
        for wall in self._walls_forward(first, stop):
            tick = _instant(wall, tz)
            if tick is None or tick <= start:
                continue
            if tick > end:
                return
            yield tick
            count += 1
            if count >= limit:
                return

    # ------------------------------------------------------------------------------------ internals

    def _walls_forward(self, start: datetime, last_day: date) -> Iterator[datetime]:
        """Candidate wall times >= start (naive, minute-aligned), ascending, through `last_day`."""
        day = start.date()
        while day <= last_day:
            if day.month not in self.months:
                if day.year == MAXYEAR and day.month == 12:
                    return
                day = date(day.year + (day.month == 12), day.month % 12 + 1, 1)
                continue
            if self.matches_day(day):
                for hour in self.hours:
                    if day == start.date() and hour < start.hour:
                        continue
                    for minute in self.minutes:
                        wall = datetime(day.year, day.month, day.day, hour, minute)
                        if wall >= start:
                            yield wall
            if day == date.max:
                return
            day += timedelta(days=1)

    def _walls_backward(self, start: datetime, first_day: date) -> Iterator[datetime]:
        """Candidate wall times <= start (naive, minute-aligned), descending, back to `first_day`."""
        day = start.date()
        while day >= first_day:
            if day.month not in self.months:
                if day.year == MINYEAR and day.month == 1:
                    return
                day = date(day.year, day.month, 1) - timedelta(days=1)
                continue
            if self.matches_day(day):
                for hour in reversed(self.hours):
                    if day == start.date() and hour > start.hour:
                        continue
                    for minute in reversed(self.minutes):
                        wall = datetime(day.year, day.month, day.day, hour, minute)
                        if wall <= start:
                            yield wall
            if day == date.min:
                return
            day -= timedelta(days=1)


def _parse_field(text: str, index: int) -> set[int]:
    name = FIELD_NAMES[index]
    lo, hi = _BOUNDS[index]
    names = _MONTHS if index == 3 else _WEEKDAYS if index == 4 else None

    def fail(problem: str) -> CronError:
        return CronError(f"{name} field '{text}': {problem}", name)

    def value(token: str, *, range_end: bool = False) -> int:
        if _DIGITS.fullmatch(token):
            n = int(token)
        elif names is not None and token.lower() in names:
            n = names[token.lower()]
            if range_end and index == 4 and n == 0:
                n = 7  # FRI-SUN
        elif not token:
            raise fail("missing number")
        else:
            kind = "a number" if names is None else f"a number or a name ({'JAN-DEC' if index == 3 else 'SUN-SAT'})"
            raise fail(f"'{token}' is not {kind}")
        if not lo <= n <= hi:
            raise fail(f"{n} is out of range {lo}-{hi}")
        return n

    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise fail("empty list item")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not _DIGITS.fullmatch(step_text):
                raise fail(f"step '{step_text}' is not a number" if step_text else "missing step after '/'")
            step = int(step_text)
            if step == 0:
                raise fail("step must be at least 1")
        if base == "*":
            first, last = lo, (6 if index == 4 else hi)
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = value(a), value(b, range_end=True)
            if first > last:
                raise fail(f"range '{base}' runs backwards")
        else:
            first = value(base)
            last = (6 if index == 4 else hi) if slash else first
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:
        values.discard(7)
        values.add(0)
    return values


def _instant(wall: datetime, tz: tzinfo) -> datetime | None:
    """The UTC instant of a local wall time: its first occurrence when ambiguous, None when it does
    not exist (a DST gap)."""
    try:
        utc = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
        if utc.astimezone(tz).replace(tzinfo=None) != wall:
            return None
    except OverflowError:
        return None
    return utc


def _require_aware(dt: datetime, what: str) -> None:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")


def _add_years(day: date, years: int) -> date:
    year = min(max(day.year + years, MINYEAR), MAXYEAR)
    return date(year, 12, 31) if years > 0 else date(year, 1, 1)
