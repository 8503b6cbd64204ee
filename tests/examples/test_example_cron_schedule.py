"""The cron example's pure core: crontab parsing, tick arithmetic against a brute-force model, catch-up policy."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

import pytest
from example_kit import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.cron.schedule import (
    CatchUp,
    Cron,
    CrontabError,
    Decision,
    Every,
    decide,
    iso,
    parse_crontab,
    parse_entry,
    tick_id,
    upcoming,
)


def ts(text: str) -> int:
    return calendar.timegm(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timetuple())


def test_crontab_file_forms() -> None:
    jobs = parse_crontab(
        "# comment\n\n"
        "backup    0 3 * * *        ./backup.sh  --full   'a  b'\n"
        "beat      */10 * * * * *   echo \"tick $CRON_TICK_ID\"\n"
        "report\t@every 1h30m\tpython report.py\n"
        "rollup    @hourly          ./rollup.sh\n"
        "weekdays  0 9 * jan-mar mon-fri  echo work\n"
    )
    by = {j.name: j for j in jobs}
    assert by["backup"].spec == "0 3 * * *" and by["backup"].command == "./backup.sh  --full   'a  b'"
    assert by["beat"].spec == "*/10 * * * * *" and by["beat"].command == 'echo "tick $CRON_TICK_ID"'
    assert by["beat"].schedule.seconds == (0, 10, 20, 30, 40, 50)  # type: ignore[union-attr]
    assert by["report"].schedule == Every(5400)
    assert by["rollup"].spec == "@hourly"
    wd = by["weekdays"].schedule
    assert isinstance(wd, Cron) and wd.months == (1, 2, 3) and wd.weekdays == (1, 2, 3, 4, 5)
    assert [j.name for j in parse_crontab(ROOT.joinpath("examples/cron/crontab.example").read_text())] == [
        "heartbeat", "minutely", "nightly"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x 61 * * * * echo", "outside 0-59"),
        ("x * * * * echo", "5 or 6 fields"),
        ("x 0 0 30 2 * echo", "never fires"),
        ("x @often echo", "unknown macro"),
        ("x @every 0s echo", "at least 1s"),
        ("x @every soon echo", "bad duration"),
        ("x */0 * * * * echo", "bad step"),
        ("x 5-1 * * * * echo", "outside"),
        ("x @daily", "missing command"),
        ("bad/name @daily true", "bad job name"),
        ("x @daily a\nx @hourly b", "defined twice"),
    ],
)
def test_crontab_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(CrontabError, match=message) as info:
        parse_crontab("# header\n" + text, "my.crontab")
    assert str(info.value).startswith("my.crontab:")


def test_cron_next_and_last_known_dates() -> None:
    nightly = parse_entry("30 2 * * * x")[1]
    assert iso(nightly.next_after(ts("2024-02-28 02:30:00"))) == "2024-02-29T02:30:00Z"
    assert iso(nightly.next_after(ts("2024-02-28 02:29:59"))) == "2024-02-28T02:30:00Z"
    assert nightly.last_at_or_before(ts("2024-02-28 02:30:00")) == ts("2024-02-28 02:30:00")
    leap = parse_entry("0 0 29 2 * x")[1]
    assert iso(leap.next_after(ts("2024-03-01 00:00:00"))) == "2028-02-29T00:00:00Z"
    assert iso(leap.last_at_or_before(ts("2028-02-28 00:00:00")) or 0) == "2024-02-29T00:00:00Z"
    # day of month and weekday both restricted: either matches (Vixie cron)
    either = parse_entry("0 0 13 * fri x")[1]
    fired = upcoming(either, ts("2024-09-01 00:00:00"), 4)
    assert [iso(t)[:10] for t in fired] == ["2024-09-06", "2024-09-13", "2024-09-20", "2024-09-27"]
    sunday = parse_entry("0 12 * * 7 x")[1]
    assert iso(sunday.next_after(ts("2024-09-01 12:00:00"))) == "2024-09-08T12:00:00Z"
    every = Every(90)
    assert every.next_after(89) == 90 and every.next_after(90) == 180 and every.last_at_or_before(179) == 90
    assert tick_id("job", 90) == "job@1970-01-01T00:01:30Z"


def _matches(expr: Cron, t: int) -> bool:
    d = datetime.fromtimestamp(t, UTC)
    dom = d.day in expr.days
    dow = (d.weekday() + 1) % 7 in expr.weekdays
    day = (dom and dow) if (expr.any_day or expr.any_weekday) else (dom or dow)
    return (d.second in expr.seconds and d.minute in expr.minutes and d.hour in expr.hours
            and d.month in expr.months and day)


FIELD = st.sampled_from(["*", "*/7", "5", "0-10/3", "1,15,30"])


@settings(max_examples=60, deadline=None)
@given(
    minute=st.sampled_from(["*", "*/13", "7", "10-50/20", "0,30"]),
    hour=st.sampled_from(["*", "*/5", "3", "22-23"]),
    dom=st.sampled_from(["*", "1", "15-17", "*/10"]),
    month=st.sampled_from(["*", "jan,jul", "2-3"]),
    dow=st.sampled_from(["*", "sun", "1-3", "sat,wed"]),
    start=st.integers(ts("2023-01-01 00:00:00"), ts("2026-12-31 00:00:00")),
)
def test_cron_agrees_with_a_minute_by_minute_scan(minute: str, hour: str, dom: str, month: str, dow: str,
                                                  start: int) -> None:
    expr = Cron.parse([minute, hour, dom, month, dow])
    nxt = expr.next_after(start)
    prev = expr.last_at_or_before(start)
    assert _matches(expr, nxt) and nxt > start
    assert prev is not None and _matches(expr, prev) and prev <= start
    # nothing matches strictly between the two (scanned minute by minute, seconds are 0)
    for t in range(prev - prev % 60 + 60, min(nxt, prev + 3 * 86400), 60):
        assert not _matches(expr, t), iso(t)


def test_six_fields_mean_seconds_first() -> None:
    spec, sched, command = parse_entry("*/15 * * * * * echo hi")
    assert spec == "*/15 * * * * *" and command == "echo hi"
    assert sched.next_after(ts("2024-01-01 00:00:14")) == ts("2024-01-01 00:00:15")
    spec, sched, command = parse_entry("0 3 * * * 5 is the answer")
    assert spec == "0 3 * * * 5" and command == "is the answer"  # six field-like words: seconds first


EVERY = Every(1)


@pytest.mark.parametrize(
    ("policy", "cursor", "now", "in_flight", "expected"),
    [
        (CatchUp.ALL, 100, 100.5, None, Decision(None, None, 101)),  # nothing due yet
        (CatchUp.ALL, 100, 101.2, None, Decision(None, 101, None)),  # on time
        (CatchUp.ALL, 100, 105.5, None, Decision(None, 101, None)),  # missed 5: oldest first
        (CatchUp.ALL, 100, 120.0, None, Decision((101, 109), 110, None)),  # more than max_catch_up=11
        (CatchUp.LATEST, 100, 105.5, None, Decision((101, 104), 105, None)),
        (CatchUp.LATEST, 100, 101.5, None, Decision(None, 101, None)),
        (CatchUp.SKIP, 100, 105.5, None, Decision((101, 104), 105, None)),  # 105 is 0.5 s late: within grace
        (CatchUp.SKIP, 100, 105.95, None, Decision((101, 105), None, 106)),  # 0.95 s late: skipped
        (CatchUp.SKIP, 100, 200.0, 101, Decision(None, 101, None)),  # started, never recorded: always re-run
        (CatchUp.ALL, 100, 200.0, 100, Decision((101, 189), 190, None)),  # an in-flight tick already handled
    ],
)
def test_catch_up_policy(policy: CatchUp, cursor: int, now: float, in_flight: int | None,
                         expected: Decision) -> None:
    got = decide(EVERY, cursor, now, policy=policy, grace=0.9, max_catch_up=11, in_flight=in_flight)
    assert got == expected


def test_catch_up_on_a_cron_schedule() -> None:
    hourly = parse_entry("@hourly x")[1]
    cursor = ts("2024-01-01 10:00:00")
    now = ts("2024-01-01 14:30:00")
    assert decide(hourly, cursor, now, policy=CatchUp.ALL, grace=60, max_catch_up=2) == Decision(
        (ts("2024-01-01 11:00:00"), ts("2024-01-01 12:00:00")), ts("2024-01-01 13:00:00"), None)
    assert decide(hourly, cursor, now, policy=CatchUp.SKIP, grace=60, max_catch_up=2) == Decision(
        (ts("2024-01-01 11:00:00"), ts("2024-01-01 14:00:00")), None, ts("2024-01-01 15:00:00"))
