"""The pure reconciliation core: given one preset's snapshot and one `now`, decide what to do.

Nothing here imports Django or touches a database; the reconciler reads a `PresetSnapshot`
per preset with a fixed number of queries, calls `calculate_actions`, and executes the
result. That split keeps every rule of DESIGN.md section 4 testable as a plain function.

Two outputs, kept apart on purpose:

- `ReconciliationState` is *diagnostics*: counts for dashboards, logs and metrics. Nothing
  executes it, so it may describe a preset (for example an inactive one) without implying
  any work.
- `ReconciliationActions` is the *decision*: the only thing the reconciler executes. An
  action is never emitted with nothing to do.

Every function takes a single timezone-aware `now` and raises `ValueError` for a naive one,
so expiry, schedules and backoff are judged against the same instant.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter


class ActionType(enum.Enum):
    """The kind of a `ReconciliationActions`; the values are the JSON strings."""

    CREATE = "create"
    DELETE = "delete"
    BACKOFF = "backoff"
    CANCEL_PENDING = "cancel_pending"


@dataclass(frozen=True)
class PrebuildInfo:
    """A running prebuild: owned by the system user, latest build a succeeded `start`.

    `ready`: every current agent is ready and connected (`prebuilds.eligibility`). `healthy`
    is False when an agent has been gone (off, or disconnected) past the grace period: such a
    prebuild is counted apart (`unhealthy`), never eligible, and replaced. An addition to
    DESIGN.md section 4 with a default, so the contract's constructor still works.
    """

    id: UUID
    created_at: datetime
    ready: bool
    healthy: bool = True


@dataclass(frozen=True)
class Backoff:
    """Failed first builds of the preset's prebuilds within the look-back window."""

    num_failed: int
    last_build_at: datetime


@dataclass(frozen=True)
class PrebuildSchedule:
    """While `cron` matches the current minute, the pool size is `instances`."""

    cron: str
    instances: int


@dataclass(frozen=True)
class PresetSnapshot:
    """Everything the core needs to know about one preset, read at one moment."""

    preset_id: UUID
    desired_instances: int | None  # None: the preset declares no prebuilds
    active: bool = True  # on the template's active version; template neither deleted nor deprecated
    running: Sequence[PrebuildInfo] = ()  # running prebuilds of this preset, expired ones included
    ttl: timedelta | None = None  # invalidate_after; None or 0 disables
    last_invalidated_at: datetime | None = None
    timezone: str = ""  # IANA name for schedules
    schedules: Sequence[PrebuildSchedule] = ()
    starting: int = 0  # in-progress system builds of this preset
    stopping: int = 0
    deleting: int = 0
    pending_count: int = (
        0  # pending, not yet picked up first builds (only meaningful when inactive)
    )
    backoff: Backoff | None = None
    hard_limited: bool = False

    def __post_init__(self) -> None:
        # `running` and `schedules` are stored as tuples: a caller's list would leave a
        # "frozen" snapshot mutable after the fact (and unhashable).
        object.__setattr__(self, "running", tuple(self.running))
        object.__setattr__(self, "schedules", tuple(self.schedules))


@dataclass(frozen=True)
class ReconciliationState:
    """Diagnostics for one preset; never executed."""

    actual: int
    desired: int
    eligible: int
    expired: int
    extraneous: int
    starting: int
    stopping: int
    deleting: int
    # Running prebuilds whose agents are gone (not in `actual`); DESIGN.md section 7 allows
    # the status document's `state` this extra count.
    unhealthy: int = 0


@dataclass(frozen=True)
class ReconciliationActions:
    """One decision for one preset.

    `create` is the number of prebuilds to create (CREATE), `delete_ids` the prebuilds to
    delete, oldest first (DELETE), `backoff_until` the end of the backoff (BACKOFF).
    `cancel_count` is an addition to DESIGN.md section 4: the number of pending first builds
    to cancel (CANCEL_PENDING). It is a separate optional field rather than a reuse of
    `create`, so that `create` never means anything but "create". `reason`, another addition,
    says why a DELETE was decided (one of `DELETE_REASONS`), for logs, pages and the status
    document.
    """

    type: ActionType
    create: int = 0
    delete_ids: tuple[UUID, ...] = ()
    backoff_until: datetime | None = None
    cancel_count: int = 0
    # Diagnostics, like the state: not part of what an action *is* (equality ignores it).
    reason: str = field(default="", compare=False)


# Why prebuilds are deleted: their preset is not active any more, they expired, their agents are
# gone (unhealthy), or the pool is larger than desired.
DELETE_REASONS = ("inactive", "expired", "unhealthy", "extraneous")


# ---------------------------------------------------------------------------------------------
# Prebuild helpers


def is_expired(prebuild: PrebuildInfo, snapshot: PresetSnapshot, now: datetime) -> bool:
    """True when the prebuild predates the last invalidation or has outlived a positive TTL."""
    invalidated_at = snapshot.last_invalidated_at
    if invalidated_at is not None and prebuild.created_at < invalidated_at:
        return True
    ttl = snapshot.ttl
    return ttl is not None and ttl > timedelta(0) and now - prebuild.created_at > ttl


def oldest_first(prebuilds: Iterable[PrebuildInfo]) -> list[PrebuildInfo]:
    """Sort by `created_at`, then `id`, so equal timestamps still give one fixed order."""
    return sorted(prebuilds, key=lambda prebuild: (prebuild.created_at, prebuild.id))


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got naive {now.isoformat()}")


# ---------------------------------------------------------------------------------------------
# Schedules

_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")

# Plain cron only: numbers, `*`, ranges, steps and lists, plus names in the month and
# day-of-week fields. croniter's extensions (`L`, `W`, `#`, `?`, `H`) are refused because
# their days are not captured by the expanded sets the overlap check relies on.
_FIELD_SYNTAX = (
    re.compile(r"[0-9*,/-]+"),  # minute (must be "*" anyway)
    re.compile(r"[0-9*,/-]+"),  # hour
    re.compile(r"[0-9*,/-]+"),  # day of month
    re.compile(r"[0-9A-Za-z*,/-]+"),  # month
    re.compile(r"[0-9A-Za-z*,/-]+"),  # day of week
)

# 29 February is included: it exists in leap years, and over the 400-year Gregorian cycle
# every (month, day) pair, 29 February included, falls on each of the seven weekdays.
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True)
class _CronSets:
    """A validated five-field cron expression as sets; `None` means the field is `*`."""

    hours: frozenset[int]
    days: frozenset[int] | None
    months: frozenset[int]
    weekdays: frozenset[int] | None  # cron numbering, 0 = Sunday

    def matches_date(self, month: int, day: int, weekday: int) -> bool:
        if month not in self.months:
            return False
        if self.days is None or self.weekdays is None:
            return (self.days is None or day in self.days) and (
                self.weekdays is None or weekday in self.weekdays
            )
        # Standard cron (and croniter's day_or default): when both day fields are
        # restricted, a date matches if either one does.
        return day in self.days or weekday in self.weekdays


def _parse_cron(cron: str) -> _CronSets | str:
    """The expression's sets, or a message saying what is wrong with it."""
    fields = cron.split()
    if len(fields) != 5:
        return f"cron must have 5 fields (got {len(fields)}): {cron!r}"
    if fields[0] != "*":
        return f"minute field must be '*' (got {fields[0]!r})"
    for name, syntax, value in zip(_FIELD_NAMES, _FIELD_SYNTAX, fields, strict=True):
        if not syntax.fullmatch(value):
            return f"malformed cron {cron!r}: unsupported {name} field {value!r}"
    try:
        expanded, nth_weekdays = croniter.expand(cron)
    except (CroniterError, ValueError):
        return f"malformed cron {cron!r}"
    if nth_weekdays:  # unreachable while `#` is refused above; kept as a guard
        return f"malformed cron {cron!r}: nth-weekday syntax is not supported"
    _, hours, days, months, weekdays = expanded
    return _CronSets(
        hours=frozenset(range(24)) if hours == ["*"] else _ints(hours),
        days=None if days == ["*"] else _ints(days),
        months=frozenset(range(1, 13)) if months == ["*"] else _ints(months),
        weekdays=None if weekdays == ["*"] else _ints(weekdays),
    )


def _ints(values: list[int | str]) -> frozenset[int]:
    return frozenset(int(value) for value in values)


def _overlap(a: _CronSets, b: _CronSets) -> bool:
    # Both expressions match every minute of their hours, so they share a minute exactly
    # when they share an hour and a calendar date. Dates are (month, day, weekday) triples
    # with the day valid in that month; by the Gregorian cycle each such triple is a real
    # date in some year.
    if not a.hours & b.hours:
        return False
    return any(
        a.matches_date(month, day, weekday) and b.matches_date(month, day, weekday)
        for month in sorted(a.months & b.months)
        for day in range(1, _DAYS_IN_MONTH[month - 1] + 1)
        for weekday in range(7)
    )


def _load_timezone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def validate_schedules(timezone: str, schedules: Sequence[PrebuildSchedule]) -> str | None:
    """Return a short message naming the first problem, or None when the schedules are usable.

    Problems, in the order they are checked: a schedule whose `cron` is not a string or whose
    `instances` is not an integer (template files are parsed loosely); an unknown `timezone`
    (an empty one is only a problem when there are schedules); then, per schedule (numbered
    from 1), a cron that does not have exactly five fields, a minute field other than `*`, a
    malformed cron or one that uses croniter's non-standard extensions (`L`, `W`, `#`, `?`,
    `H`), negative `instances`; then two schedules that overlap.

    Overlap is decided exactly on the wall-clock calendar: two schedules overlap when some
    hour and some real date (29 February included) are matched by both, where a date matches
    a schedule with both day-of-month and day-of-week restricted if either matches (cron OR
    semantics, as croniter applies them). Time-zone transitions are ignored, so schedules
    that could only meet in an hour skipped by a DST change still count as overlapping.
    """
    schedules = tuple(schedules)
    for number, schedule in enumerate(schedules, start=1):
        if not isinstance(schedule.cron, str):
            return f"schedule {number}: cron must be a string (got {schedule.cron!r})"
        if not isinstance(schedule.instances, int) or isinstance(schedule.instances, bool):
            return f"schedule {number}: instances must be an integer (got {schedule.instances!r})"
    return _validate_schedules(timezone, schedules)


# The reconciler validates every preset's schedules on every pass; the answer depends on
# nothing but the arguments, so it is computed once per distinct set of schedules.
@functools.lru_cache(maxsize=4096)
def _validate_schedules(timezone: str, schedules: tuple[PrebuildSchedule, ...]) -> str | None:
    if timezone and _load_timezone(timezone) is None:
        return f"unknown timezone {timezone!r}"
    if not schedules:
        return None
    if not timezone:
        return "timezone is required when schedules are given"
    parsed: list[_CronSets] = []
    for number, schedule in enumerate(schedules, start=1):
        sets = _parse_cron(schedule.cron)
        if isinstance(sets, str):
            return f"schedule {number}: {sets}"
        if schedule.instances < 0:
            return f"schedule {number}: instances must be >= 0 (got {schedule.instances})"
        parsed.append(sets)
    for later in range(len(parsed)):
        for earlier in range(later):
            if _overlap(parsed[earlier], parsed[later]):
                return f"schedules {earlier + 1} and {later + 1} overlap"
    return None


def calculate_desired_instances(snapshot: PresetSnapshot, now: datetime) -> int:
    """The pool size the preset wants at `now`.

    `desired_instances` (0 when None) unless the snapshot has valid, non-overlapping schedules
    and a known timezone; then the first schedule matching the wall-clock minute of `now` in
    that timezone gives the size, and `desired_instances` applies when none matches.
    """
    _require_aware(now)
    fallback = snapshot.desired_instances or 0
    if not snapshot.schedules:
        return fallback
    if validate_schedules(snapshot.timezone, snapshot.schedules) is not None:
        return fallback
    # Matching runs on naive wall-clock time: croniter then does no UTC arithmetic of its
    # own, whatever offset `now` came in, and an hour repeated by a DST change matches
    # the schedule for that hour both times.
    local = now.astimezone(ZoneInfo(snapshot.timezone))
    wall_clock = local.replace(tzinfo=None, second=0, microsecond=0)
    for schedule in snapshot.schedules:
        if croniter.match(schedule.cron, wall_clock):
            return schedule.instances
    return fallback


# ---------------------------------------------------------------------------------------------
# State and actions


def healthy_prebuilds(snapshot: PresetSnapshot) -> list[PrebuildInfo]:
    """The running prebuilds that count: unhealthy ones are counted apart and replaced."""
    return [prebuild for prebuild in snapshot.running if prebuild.healthy]


def calculate_state(snapshot: PresetSnapshot, now: datetime) -> ReconciliationState:
    """Diagnostics for the preset at `now`; an inactive preset desires nothing.

    Unhealthy prebuilds count only in `unhealthy`: not in `actual`, `expired` or `eligible`.
    """
    _require_aware(now)
    healthy = healthy_prebuilds(snapshot)
    expired = sum(1 for prebuild in healthy if is_expired(prebuild, snapshot, now))
    actual = len(healthy)
    if snapshot.active:
        desired = calculate_desired_instances(snapshot, now)
        eligible = sum(
            1 for prebuild in healthy if prebuild.ready and not is_expired(prebuild, snapshot, now)
        )
        extraneous = max(actual - expired - desired, 0)
    else:
        desired = eligible = extraneous = 0
    return ReconciliationState(
        actual=actual,
        desired=desired,
        eligible=eligible,
        expired=expired,
        extraneous=extraneous,
        starting=snapshot.starting,
        stopping=snapshot.stopping,
        deleting=snapshot.deleting,
        unhealthy=len(snapshot.running) - actual,
    )


def calculate_actions(
    snapshot: PresetSnapshot, now: datetime, backoff_interval: timedelta
) -> list[ReconciliationActions]:
    """The actions that bring the preset toward its desired state, in execution order.

    Guarantees: an inactive preset only has pending builds canceled and all its running
    prebuilds deleted; an active one has expired prebuilds deleted, then unhealthy ones, then
    extraneous ones, then either a CREATE or a BACKOFF. Backoff and the hard limit only hold
    back creation. No CREATE comes with a DELETE of healthy non-expired prebuilds (an unhealthy
    one is replaced: deleted, and counted as missing), deletions are oldest first
    (`created_at`, then `id`), and no action is emitted with nothing to do.
    """
    state = calculate_state(snapshot, now)
    if not snapshot.active:
        return _inactive_actions(snapshot)
    return _active_actions(snapshot, state, now, backoff_interval)


def _delete(prebuilds: Iterable[PrebuildInfo], reason: str) -> ReconciliationActions:
    ids = tuple(prebuild.id for prebuild in oldest_first(prebuilds))
    return ReconciliationActions(ActionType.DELETE, delete_ids=ids, reason=reason)


def _inactive_actions(snapshot: PresetSnapshot) -> list[ReconciliationActions]:
    actions = []
    if snapshot.pending_count > 0:
        actions.append(
            ReconciliationActions(ActionType.CANCEL_PENDING, cancel_count=snapshot.pending_count)
        )
    if snapshot.running:
        actions.append(_delete(snapshot.running, "inactive"))
    return actions


def _active_actions(
    snapshot: PresetSnapshot,
    state: ReconciliationState,
    now: datetime,
    backoff_interval: timedelta,
) -> list[ReconciliationActions]:
    healthy = healthy_prebuilds(snapshot)
    unhealthy = [prebuild for prebuild in snapshot.running if not prebuild.healthy]
    expired = [prebuild for prebuild in healthy if is_expired(prebuild, snapshot, now)]
    fresh = [prebuild for prebuild in healthy if not is_expired(prebuild, snapshot, now)]
    actions = []
    if expired:
        actions.append(_delete(expired, "expired"))
    if unhealthy:
        actions.append(_delete(unhealthy, "unhealthy"))
    if state.extraneous > 0:
        actions.append(_delete(oldest_first(fresh)[: state.extraneous], "extraneous"))

    # Stopping and deleting builds are on their way out, so they do not fill the pool.
    to_create = max(state.desired - (state.actual - state.expired) - snapshot.starting, 0)
    if to_create > 0 and not snapshot.hard_limited:
        until = backoff_until(snapshot.backoff, backoff_interval)
        if until is not None and now <= until:
            actions.append(ReconciliationActions(ActionType.BACKOFF, backoff_until=until))
        else:
            actions.append(ReconciliationActions(ActionType.CREATE, create=to_create))
    return actions


def backoff_until(backoff: Backoff | None, backoff_interval: timedelta) -> datetime | None:
    """When the back-off of ``backoff`` ends (None: no back-off); the claim's miss reason
    (``prebuilds.claims.miss_reason``) uses the same rule."""
    if backoff is None or backoff.num_failed <= 0:
        return None
    # The wait grows linearly with recent failures, so a broken preset retries ever
    # more slowly instead of burning a build every pass.
    return backoff.last_build_at + backoff.num_failed * backoff_interval
