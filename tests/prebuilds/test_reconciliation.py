"""Table-driven tests of the pure reconciliation core (DESIGN.md section 4).

No database and no Django: run with `-p no:django` for a sub-second loop.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest

from prebuilds.reconciliation import (
    ActionType,
    Backoff,
    PrebuildInfo,
    PrebuildSchedule,
    PresetSnapshot,
    ReconciliationActions,
    ReconciliationState,
    calculate_actions,
    calculate_desired_instances,
    calculate_state,
    validate_schedules,
)

NOW = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)  # a Monday
INTERVAL = timedelta(seconds=15)
PRESET_ID = UUID(int=0xFEED)


def uid(n: int) -> UUID:
    return UUID(int=n)


def prebuild(n: int, age_minutes: float = 5, *, ready: bool = True) -> PrebuildInfo:
    """Prebuild `n`, created `age_minutes` before NOW."""
    return PrebuildInfo(id=uid(n), created_at=NOW - timedelta(minutes=age_minutes), ready=ready)


def snapshot(desired: int | None = 2, **fields: object) -> PresetSnapshot:
    return PresetSnapshot(preset_id=PRESET_ID, desired_instances=desired, **fields)


def create(count: int) -> ReconciliationActions:
    return ReconciliationActions(ActionType.CREATE, create=count)


def delete(*ns: int) -> ReconciliationActions:
    return ReconciliationActions(ActionType.DELETE, delete_ids=tuple(uid(n) for n in ns))


def backoff_until(when: datetime) -> ReconciliationActions:
    return ReconciliationActions(ActionType.BACKOFF, backoff_until=when)


def cancel_pending(count: int) -> ReconciliationActions:
    return ReconciliationActions(ActionType.CANCEL_PENDING, cancel_count=count)


HOUR = timedelta(hours=1)
TTL_EXPIRED = 90  # minutes; older than a one-hour TTL


# ---------------------------------------------------------------------------------------------
# calculate_actions

ACTION_CASES = [
    # Nothing there, nothing wanted.
    pytest.param(snapshot(None), [], id="no-prebuilds-declared"),
    pytest.param(snapshot(0), [], id="zero-desired-nothing-running"),
    # Net new and partial pools.
    pytest.param(snapshot(3), [create(3)], id="net-new"),
    pytest.param(snapshot(3, running=[prebuild(1)]), [create(2)], id="partially-filled"),
    pytest.param(snapshot(2, running=[prebuild(1), prebuild(2)]), [], id="balanced"),
    # In-progress builds.
    pytest.param(snapshot(3, running=[prebuild(1)], starting=1), [create(1)], id="starting-short"),
    pytest.param(snapshot(3, running=[prebuild(1)], starting=2), [], id="starting-balanced"),
    pytest.param(snapshot(1, starting=3), [], id="starting-more-than-desired-deletes-nothing"),
    pytest.param(
        snapshot(1, running=[prebuild(1, 20), prebuild(2, 10)], starting=1),
        [delete(1)],
        id="starting-not-counted-as-extraneous",
    ),
    pytest.param(
        snapshot(2, running=[prebuild(1)], stopping=1), [create(1)], id="stopping-not-counted"
    ),
    pytest.param(snapshot(2, deleting=2), [create(2)], id="deleting-not-counted"),
    pytest.param(
        snapshot(3, running=[prebuild(1)], starting=1, stopping=4, deleting=4),
        [create(1)],
        id="short-with-all-in-progress-kinds",
    ),
    # Extraneous, oldest first, ties broken by id.
    pytest.param(
        snapshot(1, running=[prebuild(1, 30), prebuild(2, 10), prebuild(3, 20)]),
        [delete(1, 3)],
        id="extraneous-oldest-first",
    ),
    pytest.param(
        snapshot(1, running=[prebuild(3, 10), prebuild(1, 10), prebuild(2, 10)]),
        [delete(1, 2)],
        id="extraneous-ties-by-id",
    ),
    pytest.param(
        snapshot(1, running=[prebuild(9, 30), prebuild(2, 10), prebuild(4, 30)]),
        [delete(4, 9)],
        id="extraneous-time-before-id",
    ),
    pytest.param(
        snapshot(0, running=[prebuild(2, 1), prebuild(1, 2)]),
        [delete(1, 2)],
        id="zero-desired-deletes-all",
    ),
    pytest.param(snapshot(None, running=[prebuild(1)]), [delete(1)], id="none-desired-deletes-all"),
    # TTL.
    pytest.param(
        snapshot(2, ttl=HOUR, running=[prebuild(1, 30), prebuild(2, TTL_EXPIRED)]),
        [delete(2), create(1)],
        id="ttl-expired-replaced",
    ),
    pytest.param(
        snapshot(1, ttl=HOUR, running=[prebuild(1, 60)]), [], id="ttl-exactly-reached-not-expired"
    ),
    pytest.param(
        snapshot(1, ttl=HOUR, running=[prebuild(1, 60.001)]),
        [delete(1), create(1)],
        id="ttl-just-passed-expired",
    ),
    pytest.param(snapshot(1, ttl=None, running=[prebuild(1, 10_000)]), [], id="ttl-none-disables"),
    pytest.param(
        snapshot(1, ttl=timedelta(0), running=[prebuild(1, 10_000)]), [], id="ttl-zero-disables"
    ),
    pytest.param(
        snapshot(
            3, ttl=HOUR, running=[prebuild(3, 100), prebuild(1, 200), prebuild(2, 100), prebuild(4)]
        ),
        [delete(1, 2, 3), create(2)],
        id="ttl-expired-oldest-first",
    ),
    # Invalidation: strictly before last_invalidated_at.
    pytest.param(
        snapshot(
            3,
            last_invalidated_at=NOW - timedelta(minutes=15),
            running=[prebuild(1, 20), prebuild(2, 15), prebuild(3, 10)],
        ),
        [delete(1), create(1)],
        id="invalidated-before-only",
    ),
    pytest.param(
        snapshot(
            2,
            ttl=HOUR,
            last_invalidated_at=NOW - timedelta(minutes=5),
            running=[prebuild(1, TTL_EXPIRED), prebuild(2, 10), prebuild(3, 1)],
        ),
        [delete(1, 2), create(1)],
        id="invalidated-and-ttl-together",
    ),
    # Expired first, then extraneous among the rest.
    pytest.param(
        snapshot(
            1,
            ttl=HOUR,
            running=[prebuild(1, 120), prebuild(2, 50), prebuild(3, 40), prebuild(4, 30)],
        ),
        [delete(1), delete(2, 3)],
        id="expired-then-extraneous",
    ),
    # Inactive presets.
    pytest.param(snapshot(3, active=False), [], id="inactive-nothing"),
    pytest.param(
        snapshot(3, active=False, pending_count=2), [cancel_pending(2)], id="inactive-pending-only"
    ),
    pytest.param(
        snapshot(
            3,
            active=False,
            ttl=HOUR,
            pending_count=2,
            running=[prebuild(2, 10), prebuild(3, TTL_EXPIRED), prebuild(1, 10)],
        ),
        [cancel_pending(2), delete(3, 1, 2)],
        id="inactive-cancels-then-deletes-all-oldest-first",
    ),
    pytest.param(
        snapshot(
            5,
            active=False,
            running=[prebuild(1)],
            backoff=Backoff(num_failed=3, last_build_at=NOW),
        ),
        [delete(1)],
        id="inactive-never-creates-or-backs-off",
    ),
    pytest.param(
        snapshot(
            5, active=False, pending_count=0, backoff=Backoff(num_failed=3, last_build_at=NOW)
        ),
        [],
        id="inactive-empty-never-creates",
    ),
    # Backoff: now <= last_build_at + num_failed * interval backs off.
    pytest.param(
        snapshot(2, backoff=Backoff(num_failed=2, last_build_at=NOW - timedelta(seconds=20))),
        [backoff_until(NOW + timedelta(seconds=10))],
        id="backoff-before-end",
    ),
    pytest.param(
        snapshot(2, backoff=Backoff(num_failed=2, last_build_at=NOW - timedelta(seconds=30))),
        [backoff_until(NOW)],
        id="backoff-exactly-at-end",
    ),
    pytest.param(
        snapshot(
            2, backoff=Backoff(num_failed=2, last_build_at=NOW - timedelta(seconds=30.000001))
        ),
        [create(2)],
        id="backoff-just-after-end",
    ),
    pytest.param(
        snapshot(2, backoff=Backoff(num_failed=0, last_build_at=NOW)),
        [create(2)],
        id="backoff-zero-failures-ignored",
    ),
    pytest.param(
        snapshot(2, running=[prebuild(1), prebuild(2)], backoff=Backoff(3, NOW)),
        [],
        id="backoff-with-nothing-to-create",
    ),
    pytest.param(
        snapshot(2, ttl=HOUR, running=[prebuild(1, TTL_EXPIRED)], backoff=Backoff(1, NOW)),
        [delete(1), backoff_until(NOW + INTERVAL)],
        id="backoff-holds-creation-not-expired-deletion",
    ),
    pytest.param(
        snapshot(1, running=[prebuild(1, 2), prebuild(2, 1)], backoff=Backoff(1, NOW)),
        [delete(1)],
        id="backoff-holds-creation-not-extraneous-deletion",
    ),
    # Hard limit: holds back creation (and so backoff), never deletion.
    pytest.param(snapshot(3, hard_limited=True), [], id="hard-limited-creates-nothing"),
    pytest.param(
        snapshot(3, hard_limited=True, backoff=Backoff(2, NOW)),
        [],
        id="hard-limited-no-backoff-either",
    ),
    pytest.param(
        snapshot(3, hard_limited=True, ttl=HOUR, running=[prebuild(1, TTL_EXPIRED)]),
        [delete(1)],
        id="hard-limited-still-deletes-expired",
    ),
    pytest.param(
        snapshot(1, hard_limited=True, running=[prebuild(1, 2), prebuild(2, 1)]),
        [delete(1)],
        id="hard-limited-still-deletes-extraneous",
    ),
    pytest.param(
        snapshot(
            3,
            active=False,
            hard_limited=True,
            pending_count=1,
            running=[prebuild(1)],
        ),
        [cancel_pending(1), delete(1)],
        id="hard-limited-inactive-still-cleans-up",
    ),
]


@pytest.mark.parametrize(("snap", "expected"), ACTION_CASES)
def test_it_calculates_actions(snap: PresetSnapshot, expected: list[ReconciliationActions]):
    assert calculate_actions(snap, NOW, INTERVAL) == expected


def test_it_scales_backoff_with_failures_and_interval():
    snap = snapshot(1, backoff=Backoff(num_failed=4, last_build_at=NOW - timedelta(minutes=1)))

    assert calculate_actions(snap, NOW, timedelta(seconds=30)) == [
        backoff_until(NOW + timedelta(minutes=1))
    ]
    assert calculate_actions(snap, NOW, timedelta(seconds=10)) == [create(1)]


def test_it_accepts_lists_and_keeps_the_snapshot_immutable():
    running = [prebuild(2), prebuild(1)]
    snap = snapshot(0, running=running)
    running.append(prebuild(3))

    assert snap.running == (prebuild(2), prebuild(1))
    assert calculate_actions(snap, NOW, INTERVAL) == [delete(1, 2)]
    assert hash(snap) == hash(snapshot(0, running=(prebuild(2), prebuild(1))))


def test_it_uses_the_scheduled_desired_count_for_actions():
    snap = snapshot(
        1,
        timezone="UTC",
        schedules=[PrebuildSchedule("* 9-18 * * 1-5", 4)],
        running=[prebuild(1)],
    )

    assert calculate_actions(snap, NOW, INTERVAL) == [create(3)]
    assert calculate_actions(snap, NOW.replace(hour=20), INTERVAL) == []


# ---------------------------------------------------------------------------------------------
# calculate_state

STATE_CASES = [
    pytest.param(
        snapshot(None),
        ReconciliationState(0, 0, 0, 0, 0, 0, 0, 0),
        id="no-prebuilds-declared",
    ),
    pytest.param(
        snapshot(
            2,
            ttl=HOUR,
            running=[
                prebuild(1, ready=True),
                prebuild(2, ready=False),
                prebuild(3, TTL_EXPIRED, ready=True),
                prebuild(4, TTL_EXPIRED, ready=False),
                prebuild(5, ready=True),
            ],
            starting=1,
            stopping=2,
            deleting=3,
        ),
        ReconciliationState(
            actual=5,
            desired=2,
            eligible=2,
            expired=2,
            extraneous=1,
            starting=1,
            stopping=2,
            deleting=3,
        ),
        id="active-mixed",
    ),
    pytest.param(
        snapshot(
            5,
            last_invalidated_at=NOW - timedelta(minutes=3),
            running=[prebuild(1, 5), prebuild(2, 1)],
        ),
        ReconciliationState(2, 5, 1, 1, 0, 0, 0, 0),
        id="active-short-with-invalidated",
    ),
    pytest.param(
        snapshot(
            4,
            active=False,
            ttl=HOUR,
            running=[prebuild(1), prebuild(2, TTL_EXPIRED)],
            starting=1,
            stopping=1,
            deleting=2,
            pending_count=3,
        ),
        ReconciliationState(
            actual=2,
            desired=0,
            eligible=0,
            expired=1,
            extraneous=0,
            starting=1,
            stopping=1,
            deleting=2,
        ),
        id="inactive-desires-nothing",
    ),
]


@pytest.mark.parametrize(("snap", "expected"), STATE_CASES)
def test_it_calculates_state(snap: PresetSnapshot, expected: ReconciliationState):
    assert calculate_state(snap, NOW) == expected


# ---------------------------------------------------------------------------------------------
# calculate_desired_instances

BUSINESS_HOURS = PrebuildSchedule("* 9-18 * * 1-5", 5)
NIGHT_TIME = PrebuildSchedule("* 0-6 * * *", 0)
WEEKEND = PrebuildSchedule("* 9-18 * * 0,6", 2)
MONDAY = datetime(2024, 6, 3, tzinfo=UTC)
SATURDAY = datetime(2024, 6, 8, tzinfo=UTC)
NEW_YORK = "America/New_York"
TOKYO = timezone(timedelta(hours=9))


def at(day: datetime, hour: int, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return day.replace(hour=hour, minute=minute, second=second, microsecond=micro)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def scheduled(*schedules: PrebuildSchedule, tz: str = "UTC", desired: int | None = 1):
    return snapshot(desired, timezone=tz, schedules=schedules)


DESIRED_CASES = [
    pytest.param(snapshot(None), NOW, 0, id="none-is-zero"),
    pytest.param(snapshot(3), NOW, 3, id="no-schedules"),
    # Hour ranges and weekdays, in UTC.
    pytest.param(scheduled(BUSINESS_HOURS), at(MONDAY, 9), 5, id="range-first-second"),
    pytest.param(scheduled(BUSINESS_HOURS), at(MONDAY, 8, 59, 59, 999999), 1, id="range-before"),
    pytest.param(scheduled(BUSINESS_HOURS), at(MONDAY, 18, 59, 59, 999999), 5, id="range-last"),
    pytest.param(scheduled(BUSINESS_HOURS), at(MONDAY, 19), 1, id="range-after"),
    pytest.param(scheduled(BUSINESS_HOURS), at(SATURDAY, 12), 1, id="weekday-excluded"),
    pytest.param(scheduled(BUSINESS_HOURS, WEEKEND), at(SATURDAY, 12), 2, id="second-matches"),
    pytest.param(scheduled(BUSINESS_HOURS, WEEKEND), at(MONDAY, 12), 5, id="first-matches"),
    pytest.param(scheduled(BUSINESS_HOURS, NIGHT_TIME), at(MONDAY, 3), 0, id="match-of-zero"),
    pytest.param(scheduled(BUSINESS_HOURS, desired=None), at(MONDAY, 12), 5, id="none-scheduled"),
    pytest.param(scheduled(BUSINESS_HOURS, desired=None), at(MONDAY, 20), 0, id="none-unmatched"),
    # Day-of-month OR day-of-week when both are restricted (as cron and croniter do).
    pytest.param(
        scheduled(PrebuildSchedule("* * 1 * 1", 7)), utc(2024, 1, 15, 10), 7, id="dom-or-dow"
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* * 1 * 1", 7)), utc(2024, 1, 16, 10), 1, id="dom-or-dow-miss"
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* * 29 2 *", 7)), utc(2024, 2, 29, 10), 7, id="leap-day"
    ),
    # Time zones: the schedule is wall-clock time in the preset's zone.
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"), utc(2024, 6, 3, 7), 5, id="berlin-summer"
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"),
        utc(2024, 6, 3, 6, 59),
        1,
        id="berlin-summer-before",
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"), utc(2024, 1, 8, 8), 5, id="berlin-winter"
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"),
        utc(2024, 1, 8, 7, 59),
        1,
        id="berlin-winter-before",
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"),
        utc(2024, 6, 7, 16, 59),
        5,
        id="berlin-friday-last-minute",
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"),
        utc(2024, 6, 7, 17),
        1,
        id="berlin-friday-evening",
    ),
    # America/New_York springs forward on 2024-03-10 at 02:00 EST (07:00 UTC) to 03:00 EDT.
    pytest.param(
        scheduled(PrebuildSchedule("* 3 * * *", 4), tz=NEW_YORK),
        utc(2024, 3, 9, 8),
        4,
        id="new-york-before-dst-03:00-est",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* 3 * * *", 4), tz=NEW_YORK),
        utc(2024, 3, 10, 7),
        4,
        id="new-york-dst-start-03:00-edt",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* 3 * * *", 4), tz=NEW_YORK),
        utc(2024, 3, 10, 6, 59),
        1,
        id="new-york-dst-start-01:59-est",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* 3 * * *", 4), tz=NEW_YORK),
        utc(2024, 3, 10, 8),
        1,
        id="new-york-dst-start-04:00-edt",
    ),
    # It falls back on 2024-11-03: 01:00-01:59 happens twice, 05:00 and 06:00 UTC.
    pytest.param(
        scheduled(PrebuildSchedule("* 1 * * *", 4), tz=NEW_YORK),
        utc(2024, 11, 3, 5, 30),
        4,
        id="new-york-dst-end-first-01:30",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* 1 * * *", 4), tz=NEW_YORK),
        utc(2024, 11, 3, 6, 30),
        4,
        id="new-york-dst-end-second-01:30",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* 1 * * *", 4), tz=NEW_YORK),
        utc(2024, 11, 3, 7),
        1,
        id="new-york-dst-end-02:00-est",
    ),
    # `now` given in another UTC offset is the same instant.
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"),
        datetime(2024, 6, 3, 16, 30, tzinfo=TOKYO),  # 07:30 UTC, 09:30 in Berlin
        5,
        id="now-in-tokyo-offset-matches",
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Europe/Berlin"),
        datetime(2024, 6, 3, 15, 30, tzinfo=TOKYO),  # 06:30 UTC, 08:30 in Berlin
        1,
        id="now-in-tokyo-offset-misses",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* * * * 1", 3)),
        datetime(2024, 6, 3, 1, 0, tzinfo=TOKYO),  # Monday in Tokyo, Sunday 16:00 in UTC
        1,
        id="now-weekday-judged-in-preset-zone",
    ),
    # Unusable schedules fall back to desired_instances.
    pytest.param(
        scheduled(BUSINESS_HOURS, PrebuildSchedule("* 12 * * *", 9), desired=3),
        at(MONDAY, 12),
        3,
        id="overlapping-falls-back",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("0 12 * * *", 9), desired=3),
        at(MONDAY, 12),
        3,
        id="minute-not-star-falls-back",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* 12 * * * 2024", 9), desired=3),
        at(MONDAY, 12),
        3,
        id="six-fields-falls-back",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("* 12-25 * * *", 9), desired=3),
        at(MONDAY, 12),
        3,
        id="malformed-falls-back",
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, PrebuildSchedule("* x * * *", 9), desired=3),
        at(MONDAY, 12),
        3,
        id="one-bad-schedule-disables-all",
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="Mars/Olympus_Mons", desired=3),
        at(MONDAY, 12),
        3,
        id="unknown-timezone-falls-back",
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="", desired=3), at(MONDAY, 12), 3, id="empty-timezone"
    ),
    pytest.param(
        scheduled(BUSINESS_HOURS, tz="../etc/passwd", desired=3),
        at(MONDAY, 12),
        3,
        id="path-timezone-falls-back",
    ),
    pytest.param(
        scheduled(PrebuildSchedule("0 12 * * *", 9), desired=None),
        at(MONDAY, 12),
        0,
        id="invalid-with-none-is-zero",
    ),
]


@pytest.mark.parametrize(("snap", "now", "expected"), DESIRED_CASES)
def test_it_calculates_desired_instances(snap: PresetSnapshot, now: datetime, expected: int):
    assert calculate_desired_instances(snap, now) == expected


def test_it_uses_scheduled_desired_in_state():
    snap = scheduled(BUSINESS_HOURS, desired=1)

    assert calculate_state(snap, at(MONDAY, 10)).desired == 5
    assert calculate_state(snap, at(MONDAY, 20)).desired == 1
    assert calculate_state(scheduled(BUSINESS_HOURS), at(SATURDAY, 10)).desired == 1


NAIVE = datetime(2024, 6, 3, 12, 0)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: calculate_desired_instances(snapshot(1), NAIVE), id="desired"),
        pytest.param(lambda: calculate_state(snapshot(1), NAIVE), id="state"),
        pytest.param(lambda: calculate_actions(snapshot(1), NAIVE, INTERVAL), id="actions"),
        pytest.param(
            lambda: calculate_actions(snapshot(1, active=False), NAIVE, INTERVAL), id="inactive"
        ),
    ],
)
def test_it_rejects_a_naive_now(call):
    with pytest.raises(ValueError, match="timezone-aware"):
        call()


# ---------------------------------------------------------------------------------------------
# validate_schedules


def crons(*expressions: str) -> list[PrebuildSchedule]:
    return [PrebuildSchedule(expression, 1) for expression in expressions]


VALIDATION_CASES = [
    # Valid.
    pytest.param("UTC", [], None, id="no-schedules"),
    pytest.param("", [], None, id="no-schedules-no-timezone"),
    pytest.param("UTC", crons("* 9-18 * * 1-5"), None, id="business-hours"),
    pytest.param("Europe/Berlin", crons("* 9-18 * * MON-FRI"), None, id="names"),
    pytest.param("UTC", crons("*  9-18\t* *  1-5 "), None, id="any-whitespace"),
    pytest.param("UTC", crons("* 9-18 * * 1-5", "* 9-18 * * 0,6"), None, id="weekdays-disjoint"),
    pytest.param("UTC", crons("* 0-8 * * *", "* 9-23 * * *"), None, id="hours-disjoint"),
    pytest.param("UTC", crons("* */2 * * *", "* 1-23/2 * * *"), None, id="steps-disjoint"),
    pytest.param("UTC", crons("* * 1-15 * *", "* * 16-31 * *"), None, id="days-disjoint"),
    pytest.param("UTC", crons("* * * jan-jun *", "* * * JUL-DEC *"), None, id="months-disjoint"),
    pytest.param("UTC", crons("* * 31 * *", "* * * 2,4,6 *"), None, id="no-31st-in-those-months"),
    pytest.param("UTC", crons("* * 30 2 *", "* * * * *"), None, id="never-matching-30-feb"),
    pytest.param(
        "UTC", crons("* 9 * * 1-5", "* 10 * * *", "* 11 * * 0,6"), None, id="three-disjoint"
    ),
    # Timezone.
    pytest.param("Mars/Olympus_Mons", [], "unknown timezone 'Mars/Olympus_Mons'", id="unknown-tz"),
    pytest.param(
        "Mars/Olympus_Mons",
        crons("* 9 * * *"),
        "unknown timezone 'Mars/Olympus_Mons'",
        id="unknown-tz-with-schedules",
    ),
    pytest.param("/etc/passwd", [], "unknown timezone '/etc/passwd'", id="absolute-path-tz"),
    pytest.param("utc", [], "unknown timezone 'utc'", id="tz-case-matters"),
    pytest.param(
        "", crons("* 9 * * *"), "timezone is required when schedules are given", id="empty-tz"
    ),
    # Shape of each expression.
    pytest.param(
        "UTC",
        crons("* 9-18 * * 1-5", "0 9-18 * * 1-5"),
        "schedule 2: minute field must be '*' (got '0')",
        id="minute-not-star",
    ),
    pytest.param(
        "UTC",
        crons("*/1 * * * *"),
        "schedule 1: minute field must be '*' (got '*/1')",
        id="minute-step",
    ),
    pytest.param(
        "UTC",
        crons("* * * * * *"),
        "schedule 1: cron must have 5 fields (got 6): '* * * * * *'",
        id="six-fields",
    ),
    pytest.param(
        "UTC",
        crons("* * * *"),
        "schedule 1: cron must have 5 fields (got 4): '* * * *'",
        id="four-fields",
    ),
    pytest.param(
        "UTC",
        crons("@hourly"),
        "schedule 1: cron must have 5 fields (got 1): '@hourly'",
        id="macro",
    ),
    pytest.param("UTC", crons(""), "schedule 1: cron must have 5 fields (got 0): ''", id="empty"),
    pytest.param(
        "UTC", crons("* 24 * * *"), "schedule 1: malformed cron '* 24 * * *'", id="hour-range"
    ),
    pytest.param(
        "UTC", crons("* * 0 * *"), "schedule 1: malformed cron '* * 0 * *'", id="day-zero"
    ),
    pytest.param(
        "UTC", crons("* * * 13 *"), "schedule 1: malformed cron '* * * 13 *'", id="month-13"
    ),
    pytest.param(
        "UTC", crons("* * * * 8"), "schedule 1: malformed cron '* * * * 8'", id="weekday-8"
    ),
    pytest.param(
        "UTC", crons("* * * * xyz"), "schedule 1: malformed cron '* * * * xyz'", id="bad-name"
    ),
    pytest.param(
        "UTC", crons("* */0 * * *"), "schedule 1: malformed cron '* */0 * * *'", id="zero-step"
    ),
    pytest.param(
        "UTC",
        crons("* * L * *"),
        "schedule 1: malformed cron '* * L * *': unsupported day-of-month field 'L'",
        id="last-day-extension",
    ),
    pytest.param(
        "UTC",
        crons("* * 15W * *"),
        "schedule 1: malformed cron '* * 15W * *': unsupported day-of-month field '15W'",
        id="nearest-weekday-extension",
    ),
    pytest.param(
        "UTC",
        crons("* * * * 1#2"),
        "schedule 1: malformed cron '* * * * 1#2': unsupported day-of-week field '1#2'",
        id="nth-weekday-extension",
    ),
    pytest.param(
        "UTC",
        crons("* * ? * *"),
        "schedule 1: malformed cron '* * ? * *': unsupported day-of-month field '?'",
        id="question-mark-extension",
    ),
    pytest.param(
        "UTC",
        [PrebuildSchedule("* 9 * * *", -1)],
        "schedule 1: instances must be >= 0 (got -1)",
        id="negative-instances",
    ),
    pytest.param(
        "UTC",
        [PrebuildSchedule("* 9 * * *", 1), PrebuildSchedule(None, 1)],  # type: ignore[arg-type]
        "schedule 2: cron must be a string (got None)",
        id="cron-not-a-string",
    ),
    pytest.param(
        "Mars/Olympus_Mons",
        [PrebuildSchedule("* 9 * * *", [3])],  # type: ignore[arg-type]
        "schedule 1: instances must be an integer (got [3])",
        id="instances-not-an-integer",
    ),
    pytest.param(
        "UTC",
        [PrebuildSchedule("* 9 * * *", True)],
        "schedule 1: instances must be an integer (got True)",
        id="instances-bool",
    ),
    # Overlap.
    pytest.param(
        "UTC", crons("* 9-18 * * 1-5", "* 12 * * *"), "schedules 1 and 2 overlap", id="hour-inside"
    ),
    pytest.param(
        "UTC",
        crons("* 9 * * *", "* 10 * * *", "* 8-9 * * 0"),
        "schedules 1 and 3 overlap",
        id="names-the-pair",
    ),
    pytest.param("UTC", crons("* * * * 7", "* * * * 0"), "schedules 1 and 2 overlap", id="sun-7-0"),
    pytest.param(
        "UTC", crons("* * 1 * *", "* * * * 1"), "schedules 1 and 2 overlap", id="monday-the-1st"
    ),
    pytest.param(
        "UTC",
        crons("* * 1 * 1", "* * 15 * *"),
        "schedules 1 and 2 overlap",
        id="or-semantics-monday-the-15th",
    ),
    pytest.param(
        "UTC",
        crons("* * 31 * 1", "* * * 2 *"),
        "schedules 1 and 2 overlap",
        id="or-semantics-a-monday-in-february",
    ),
    pytest.param("UTC", crons("* * 31 * *", "* * * 2 1"), None, id="no-31st-in-february"),
    pytest.param(
        "UTC", crons("* * 29 * *", "* * * 2 *"), "schedules 1 and 2 overlap", id="leap-day"
    ),
    pytest.param(
        "UTC",
        crons("* 0-8 * * *", "* 22-23 * * *", "* 8 1 1 *"),
        "schedules 1 and 3 overlap",
        id="single-hour-shared",
    ),
]


@pytest.mark.parametrize(("tz", "schedules", "expected"), VALIDATION_CASES)
def test_it_validates_schedules(tz: str, schedules: list[PrebuildSchedule], expected: str | None):
    assert validate_schedules(tz, schedules) == expected


# ---------------------------------------------------------------------------------------------
# Unhealthy prebuilds (agents gone past the grace period; issue 12)


def unhealthy(n: int, age_minutes: float = 5) -> PrebuildInfo:
    """Prebuild `n` whose agent is gone: never ready, and not healthy."""
    return PrebuildInfo(
        id=uid(n), created_at=NOW - timedelta(minutes=age_minutes), ready=False, healthy=False
    )


UNHEALTHY_CASES = [
    pytest.param(
        snapshot(2, running=[prebuild(1), unhealthy(2)]),
        ReconciliationState(1, 2, 1, 0, 0, 0, 0, 0, unhealthy=1),
        [delete(2), create(1)],
        id="replaced:-deleted-and-one-created",
    ),
    pytest.param(
        snapshot(2, running=[prebuild(1), unhealthy(2)], starting=1),
        ReconciliationState(1, 2, 1, 0, 0, 1, 0, 0, unhealthy=1),
        [delete(2)],
        id="its-replacement-already-starting",
    ),
    pytest.param(
        snapshot(1, running=[prebuild(1), unhealthy(2, 10), unhealthy(3, 20)]),
        ReconciliationState(1, 1, 1, 0, 0, 0, 0, 0, unhealthy=2),
        [delete(3, 2)],
        id="not-extraneous:-the-healthy-one-stays",
    ),
    pytest.param(
        snapshot(2, ttl=HOUR, running=[prebuild(1, TTL_EXPIRED), unhealthy(2, TTL_EXPIRED)]),
        ReconciliationState(1, 2, 0, 1, 0, 0, 0, 0, unhealthy=1),
        [delete(1), delete(2), create(2)],
        id="expired-and-unhealthy-counted-once",
    ),
    pytest.param(
        snapshot(1, running=[unhealthy(1)], backoff=Backoff(2, NOW)),
        ReconciliationState(0, 1, 0, 0, 0, 0, 0, 0, unhealthy=1),
        [delete(1), backoff_until(NOW + 2 * INTERVAL)],
        id="deleted-during-backoff",
    ),
    pytest.param(
        snapshot(1, running=[unhealthy(1)], hard_limited=True),
        ReconciliationState(0, 1, 0, 0, 0, 0, 0, 0, unhealthy=1),
        [delete(1)],
        id="deleted-when-hard-limited",
    ),
    pytest.param(
        snapshot(1, active=False, running=[prebuild(1), unhealthy(2)]),
        ReconciliationState(1, 0, 0, 0, 0, 0, 0, 0, unhealthy=1),
        [delete(1, 2)],
        id="inactive:-all-deleted",
    ),
    pytest.param(
        # A ready flag with healthy=False (a snapshot can't say both, but the core must not
        # count it eligible whatever it is handed).
        snapshot(
            1,
            running=[PrebuildInfo(uid(1), NOW - timedelta(minutes=5), ready=True, healthy=False)],
        ),
        ReconciliationState(0, 1, 0, 0, 0, 0, 0, 0, unhealthy=1),
        [delete(1), create(1)],
        id="never-eligible",
    ),
]


@pytest.mark.parametrize(("snap", "state", "actions"), UNHEALTHY_CASES)
def test_unhealthy_prebuilds_are_counted_apart_and_replaced(
    snap: PresetSnapshot, state: ReconciliationState, actions: list[ReconciliationActions]
):
    assert calculate_state(snap, NOW) == state
    assert calculate_actions(snap, NOW, INTERVAL) == actions


def test_each_delete_says_why():
    snap = snapshot(
        1,
        ttl=HOUR,
        running=[prebuild(1, TTL_EXPIRED), unhealthy(2), prebuild(3, 10), prebuild(4, 1)],
    )
    reasons = [action.reason for action in calculate_actions(snap, NOW, INTERVAL)]
    assert reasons == ["expired", "unhealthy", "extraneous"]
    inactive = snapshot(1, active=False, running=[prebuild(1)])
    assert [a.reason for a in calculate_actions(inactive, NOW, INTERVAL)] == ["inactive"]
