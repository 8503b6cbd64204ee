"""Crontab parsing, tick arithmetic and the catch-up policy. Pure: no clock, no I/O (times are passed in).

A tick is a scheduled instant of a job, in whole seconds since the Unix epoch (UTC). Every replica computes
the same ticks from the same schedule, whatever its clock said when it started: ``@every`` intervals are
aligned to the epoch, cron expressions to the UTC calendar.

Crontab format, one job per line (``#`` starts a comment line)::

    # name      schedule                command (run with /bin/sh -c)
    backup      0 3 * * *               ./backup.sh            # 5 fields: minute hour day month weekday
    heartbeat   */10 * * * * *          echo "tick $CRON_TICK_ID"  # 6 fields: second first
    report      @every 90s              python report.py       # @every <n>s|m|h|d (epoch-aligned)
    rollup      @hourly                 ./rollup.sh            # @yearly @monthly @weekly @daily @hourly

Fields take ``*``, ``5``, ``1-5``, ``*/15``, ``10-40/10``, lists ``1,15,30``, and the names ``jan`` to ``dec`` and
``sun`` to ``sat``; weekday 0 and 7 are Sunday. As in Vixie cron, when both day-of-month and weekday are
restricted a day matching either fires. Six fields (seconds first) are recognised when the first six words
after the name are all cron fields.
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

SEARCH_DAYS = 366 * 8 + 2  # long enough for "29 Feb" across a non-leap century year


class CrontabError(ValueError):
    """A schedule or crontab line that cannot be parsed (the message says which line and why)."""


class Schedule(Protocol):
    def next_after(self, t: int) -> int:
        """The first tick strictly after ``t``."""

    def last_at_or_before(self, t: int) -> int | None:
        """The last tick at or before ``t`` (None if there is none in the search window)."""


_MONTHS = {name: i + 1 for i, name in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {name: i for i, name in enumerate("sun mon tue wed thu fri sat".split())}
_FIELDS: list[tuple[str, int, int, dict[str, int]]] = [
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
]
_NAME = "|".join([*_MONTHS, *_DAYS])
_ATOM = rf"(?:\d+|{_NAME})"
_ELEMENT = rf"(?:\*|{_ATOM}(?:-{_ATOM})?)(?:/\d+)?"
_FIELD_RE = re.compile(rf"^{_ELEMENT}(?:,{_ELEMENT})*$", re.IGNORECASE)
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_MACROS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}


def _parse_field(text: str, what: str, lo: int, hi: int, names: dict[str, int]) -> tuple[int, ...]:
    def atom(s: str) -> int:
        s = s.lower()
        if s in names:
            return names[s]
        if not s.isdigit():
            raise CrontabError(f"bad {what} {s!r}")
        return int(s)

    values: set[int] = set()
    for part in text.split(","):
        body, slash, step_s = part.partition("/")
        step = int(step_s) if slash else 1
        if step <= 0:
            raise CrontabError(f"bad step in {what} {part!r}")
        if body == "*":
            first, last = lo, hi
        elif "-" in body:
            a, b = body.split("-", 1)
            first, last = atom(a), atom(b)
        else:
            first = atom(body)
            last = hi if slash else first
        if not lo <= first <= last <= hi:
            raise CrontabError(f"{what} {part!r} is outside {lo}-{hi}")
        values.update(range(first, last + 1, step))
    return tuple(sorted(values))


@dataclass(frozen=True)
class Cron:
    """A cron expression with a seconds field (five-field expressions get second 0)."""

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, fields: list[str]) -> Cron:
        """Five fields (minute first) or six (second first). Raises CrontabError."""
        if len(fields) == 5:
            fields = ["0", *fields]
        if len(fields) != 6:
            raise CrontabError(f"a cron expression has 5 or 6 fields, not {len(fields)}")
        parsed = [_parse_field(f, *spec) for f, spec in zip(fields, _FIELDS, strict=True)]
        weekdays = tuple(sorted({d % 7 for d in parsed[5]}))
        second, minute, hour, day, month, _ = parsed
        cron = cls(second, minute, hour, day, month, weekdays, fields[3] == "*", fields[5] == "*")
        cron.next_after(0)  # raises CrontabError for a date that never comes (30 Feb)
        return cron

    def _day_matches(self, d: date) -> bool:
        dom = d.day in self.days
        dow = (d.weekday() + 1) % 7 in self.weekdays  # Python: Monday=0; cron: Sunday=0
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def _candidate_days(self, start: date, step: int) -> list[date]:
        out = []
        d = start
        for _ in range(SEARCH_DAYS):
            if d.month in self.months and self._day_matches(d):
                out.append(d)
                if len(out) == 2:  # the first day may have no time left; the next matching one always has
                    break
            d += timedelta(days=step)
        return out

    def next_after(self, t: int) -> int:
        """The first tick strictly after ``t``. Raises CrontabError if there is none within eight years."""
        dt = datetime.fromtimestamp(t + 1, UTC)
        for d in self._candidate_days(dt.date(), 1):
            first = d == dt.date()
            for h in self.hours:
                if first and h < dt.hour:
                    continue
                for m in self.minutes:
                    if first and h == dt.hour and m < dt.minute:
                        continue
                    for s in self.seconds:
                        if first and h == dt.hour and m == dt.minute and s < dt.second:
                            continue
                        return int(datetime(d.year, d.month, d.day, h, m, s, tzinfo=UTC).timestamp())
        raise CrontabError("the expression never fires")

    def last_at_or_before(self, t: int) -> int | None:
        dt = datetime.fromtimestamp(t, UTC)
        for d in self._candidate_days(dt.date(), -1):
            first = d == dt.date()
            for h in reversed(self.hours):
                if first and h > dt.hour:
                    continue
                for m in reversed(self.minutes):
                    if first and h == dt.hour and m > dt.minute:
                        continue
                    for s in reversed(self.seconds):
                        if first and h == dt.hour and m == dt.minute and s > dt.second:
                            continue
                        return int(datetime(d.year, d.month, d.day, h, m, s, tzinfo=UTC).timestamp())
        return None


@dataclass(frozen=True)
class Every:
    """``@every <duration>``: ticks at the multiples of ``interval`` seconds since the epoch."""

    interval: int

    @classmethod
    def parse(cls, text: str) -> Every:
        m = _DURATION_RE.match(text)
        if not text or m is None:
            raise CrontabError(f"bad duration {text!r} (use e.g. 30s, 5m, 1h30m, 1d)")
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
        if seconds <= 0:
            raise CrontabError("@every needs a duration of at least 1s")
        return cls(seconds)

    def next_after(self, t: int) -> int:
        return (t // self.interval + 1) * self.interval

    def last_at_or_before(self, t: int) -> int | None:
        return t // self.interval * self.interval


@dataclass(frozen=True)
class Job:
    """One crontab entry: ``name``, the schedule text ``spec`` as written, the parsed ``schedule``, the shell
    ``command``."""

    name: str
    spec: str
    schedule: Cron | Every
    command: str

    def line(self) -> str:
        return f"{self.name} {self.spec} {self.command}"


def _words(text: str) -> list[tuple[str, int]]:
    """(word, end offset) for each whitespace-separated word."""
    return [(m.group(), m.end()) for m in re.finditer(r"\S+", text)]


def parse_entry(text: str) -> tuple[str, Cron | Every, str]:
    """``SCHEDULE COMMAND`` -> (schedule text, schedule, command). Raises CrontabError."""
    words = _words(text)
    if not words:
        raise CrontabError("empty entry")
    first = words[0][0]
    if first.startswith("@"):
        if first == "@every":
            if len(words) < 2:
                raise CrontabError("@every needs a duration")
            sched: Cron | Every = Every.parse(words[1][0])
            used = 2
        elif first in _MACROS:
            sched = Cron.parse(_MACROS[first].split())
            used = 1
        else:
            raise CrontabError(f"unknown macro {first!r} (known: @every, {', '.join(_MACROS)})")
    else:
        used = 0
        while used < min(6, len(words)) and _FIELD_RE.match(words[used][0]):
            used += 1
        if used < 5:
            raise CrontabError("expected a cron expression of 5 or 6 fields, or an @macro")
        sched = Cron.parse([w for w, _ in words[:used]])
    command = text[words[used - 1][1]:].strip()
    if not command:
        raise CrontabError("missing command")
    return " ".join(w for w, _ in words[:used]), sched, command


def parse_job(name: str, entry: str) -> Job:
    """A job from its name and ``SCHEDULE COMMAND`` text. Raises CrontabError."""
    if not _JOB_NAME_RE.match(name):
        raise CrontabError(f"bad job name {name!r} (letters, digits, '_', '.', '-')")
    spec, sched, command = parse_entry(entry)
    return Job(name, spec, sched, command)


def parse_crontab(text: str, source: str = "crontab") -> list[Job]:
    """Every job of a crontab file. Raises CrontabError naming ``source`` and the line."""
    jobs: dict[str, Job] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, *rest = line.split(None, 1)
        try:
            job = parse_job(name, rest[0] if rest else "")
        except CrontabError as exc:
            raise CrontabError(f"{source}:{n}: {exc}") from None
        if job.name in jobs:
            raise CrontabError(f"{source}:{n}: job {job.name!r} is defined twice")
        jobs[job.name] = job
    return list(jobs.values())


def iso(t: int) -> str:
    """A tick as ``2024-05-01T12:00:05Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def tick_id(job: str, t: int) -> str:
    """The fleet-wide identity of a tick, ``<job>@<UTC time>``: the same on every replica and every attempt."""
    return f"{job}@{iso(t)}"


def upcoming(schedule: Schedule, after: int, n: int) -> list[int]:
    """The ``n`` ticks following ``after``."""
    out = []
    t = after
    for _ in range(n):
        t = schedule.next_after(t)
        out.append(t)
    return out


# ------------------------------------------------------------------------------------------ catch-up policy


class CatchUp(enum.Enum):
    """What the leader does with ticks whose time passed while no leader could fire them (a failover, or the
    whole fleet down). A tick that was *started* and never recorded is always run again, whatever the policy:
    its job was promised at-least-once execution.

    * ``all``: run every missed tick, oldest first, back to back — but at most ``max_catch_up`` of them (the
      most recent ones); older ones are recorded as skipped.
    * ``latest``: run only the most recent missed tick; record the older ones as skipped.
    * ``skip``: run a missed tick only if it is at most ``grace`` seconds late; otherwise record it skipped.
    """

    ALL = "all"
    LATEST = "latest"
    SKIP = "skip"


@dataclass(frozen=True)
class Decision:
    """What to do next for one job: record ``skip`` = (first, last) tick as skipped (inclusive; None: nothing),
    then run tick ``run`` (None: nothing now) or, when there is nothing to run, sleep until ``wake_at``."""

    skip: tuple[int, int] | None
    run: int | None
    wake_at: int | None


def decide(
    schedule: Schedule,
    cursor: int,
    now: float,
    *,
    policy: CatchUp,
    grace: float,
    max_catch_up: int,
    in_flight: int | None = None,
) -> Decision:
    """The next step for a job whose last handled (recorded or skipped) tick is ``cursor``, at time ``now``.
    ``in_flight`` is a tick that was started by an earlier leader and never recorded."""
    if in_flight is not None and in_flight > cursor:
        return Decision(None, in_flight, None)
    nxt = schedule.next_after(cursor)
    if nxt > now:
        return Decision(None, None, nxt)
    latest = schedule.last_at_or_before(int(now))
    assert latest is not None and latest >= nxt
    if policy is CatchUp.ALL:
        first = latest
        for _ in range(max(max_catch_up, 1) - 1):
            prev = schedule.last_at_or_before(first - 1)
            if prev is None or prev < nxt:
                break
            first = prev
        if first == nxt:
            return Decision(None, nxt, None)
        return Decision((nxt, _before(schedule, first)), first, None)
    if policy is CatchUp.SKIP and now - latest > grace:
        return Decision((nxt, latest), None, schedule.next_after(latest))
    if latest == nxt:
        return Decision(None, nxt, None)
    return Decision((nxt, _before(schedule, latest)), latest, None)


def _before(schedule: Schedule, t: int) -> int:
    prev = schedule.last_at_or_before(t - 1)
    assert prev is not None
    return prev
