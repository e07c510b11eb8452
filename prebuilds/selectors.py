"""Reads for the reconciler (one snapshot of every preset a pass looks at) and for the operator
API (one preset, ``preset_get_for_operator``).

`reconciliation_snapshot` answers with a **fixed number of queries** (five; six when a preset
in scope is sized by a goal and its cached demand figures are older than five minutes),
whatever the number of presets, templates and workspaces, so a pass costs the same handful of
round trips at 1 preset and at 1,000. Each query is a set-based aggregate documented where it
is written; everything per-preset is then assembled in Python from the rows.

Definitions (DESIGN.md sections 1 and 5):

- a *prebuild* is a live workspace owned by the system user; its preset is its latest build's;
- *running*: the latest build is a `start` whose job succeeded; *ready*: running and every
  current agent reports `ready` and is connected (at least one agent); *unhealthy*: running
  with an agent gone past the grace period — both from `prebuilds.eligibility`, the one home
  of the rule;
- *in progress*: the latest build's job is pending, running or canceling, counted by transition;
- *active* preset: on its template's active version, template neither deleted nor deprecated.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID, Membership, User
from prebuilds import eligibility
from prebuilds.models import SETTINGS_ID, PrebuildsSettings
from prebuilds.reconciliation import (
    Backoff,
    PrebuildInfo,
    PrebuildSchedule,
    PresetSnapshot,
    calculate_desired_instances,
)
from prebuilds.sizing import Demand, Sizing, SizingGoal, desired_size
from workspaces.models import (
    JobStatus,
    PrebuildStatus,
    PresetSchedule,
    ProvisionerJob,
    TemplateVersionPreset,
)
from workspaces.selectors import parse_uuid


@dataclass(frozen=True)
class LastFailure:
    """The newest failed prebuild start build of a preset: its kind (`FailureKind`), error and
    completion time."""

    kind: str
    error: str
    at: datetime


@dataclass(frozen=True)
class FailureSummary:
    """A preset's failed prebuild start builds inside the back-off look-back window, by kind
    (only `template` ones count towards back-off), and its newest failure whatever its age."""

    template: int = 0
    infrastructure: int = 0
    last: LastFailure | None = None


@dataclass(frozen=True)
class PresetEntry:
    """One preset as a pass sees it: names for humans, facts for the executor, the core's input.

    `snapshot.hard_limited` reflects the *stored* status; the reconciler decides whether the
    failure streak (`failure_streak`) turns a healthy preset into a hard-limited one.
    """

    snapshot: PresetSnapshot
    name: str
    parameters: dict[str, Any]
    status: str
    status_reason: str
    template_id: UUID
    template: str
    template_version_id: UUID
    template_version: str
    version_parameter_names: frozenset[str]
    organization_id: UUID
    organization: str
    # Jobs of pending prebuild `start` builds: what CANCEL_PENDING cancels.
    pending_job_ids: tuple[UUID, ...] = ()
    # The last PREBUILDS_FAILURE_HARD_LIMIT prebuild start builds (since the preset's last
    # status change, so an operator reset starts a fresh count) all failed.
    failure_streak: bool = False
    failures: FailureSummary = field(default_factory=FailureSummary)
    # Why each unhealthy running prebuild is (`agent_off`, `agent_disconnected`, ...).
    unhealthy_reasons: dict[UUID, str] = field(default_factory=dict)
    # A preset sized by a goal: the derived size (already `snapshot.desired_instances`, whose
    # schedules are then cleared: they served as the fallback) and why. None otherwise.
    sizing: Sizing | None = None
    # The schedules the preset declares (for validation), whatever the snapshot uses.
    declared_schedules: tuple[PrebuildSchedule, ...] = ()

    @property
    def id(self) -> UUID:
        return self.snapshot.preset_id

    @property
    def active(self) -> bool:
        return self.snapshot.active


@dataclass(frozen=True)
class ReconciliationSnapshot:
    """Everything one pass needs, read at `now`."""

    now: datetime
    paused: bool
    presets: Sequence[PresetEntry] = field(default_factory=tuple)


def reconciliation_paused() -> bool:
    """The operator's pause switch; a missing settings row means "not paused". One query."""
    return bool(
        PrebuildsSettings.objects.filter(id=SETTINGS_ID)
        .values_list("reconciliation_paused", flat=True)
        .first()
    )


def preset_get_for_operator(*, user: User, preset_id: object) -> TemplateVersionPreset | None:
    """The preset with its version, template and organization loaded (one query), or None.

    None for a malformed or unknown id and for a preset of an organization ``user`` is not a
    member of: callers answer all three alike, so ids of other organizations' presets leak
    nothing. Staff status is the caller's to check. The version's template file (``source``,
    possibly large) is not read.
    """
    parsed = parse_uuid(preset_id)
    if parsed is None:
        return None
    return (
        TemplateVersionPreset.objects.select_related("template_version__template__organization")
        .defer("template_version__source")
        .filter(
            id=parsed,
            template_version__template__organization_id__in=Membership.objects.filter(
                user=user
            ).values("organization_id"),
        )
        .first()
    )


def preset_is_active(preset: TemplateVersionPreset) -> bool:
    """Whether the preset is *active* (module docstring) for a preset whose version and template
    are loaded; the same rule as the ``active`` column of ``_PRESETS_SQL`` (the snapshot)."""
    template = preset.template_version.template
    return (
        template.active_version_id == preset.template_version_id
        and not template.deleted
        and not template.deprecated
    )


def reconciliation_snapshot(
    *, now: datetime | None = None, preset_ids: Collection[UUID] | None = None
) -> ReconciliationSnapshot:
    """Read every preset a pass must look at, with its `PresetSnapshot`, in five queries.

    The presets are every preset with `desired_instances` on an active version, plus every
    other preset that still has running or in-progress prebuilds. They come ordered by
    organization, template, version (newest first) and preset name.

    `preset_ids` limits the snapshot to those of them (a pool's own page): at most six queries
    that read only those presets' prebuilds, and each entry is the one the whole snapshot
    would hold (the same queries, filtered).

    The queries run in the caller's transaction (or autocommit): the snapshot is a moment's
    view, and the executor re-checks what matters (ownership, build in progress) under row
    locks before it writes.
    """
    now = now or timezone.now()
    paused = reconciliation_paused()  # query 1
    if preset_ids is None:
        prebuilds = _prebuild_rows(now)  # query 2
        preset_rows = _preset_rows({row["preset_id"] for row in prebuilds})  # query 3
    else:
        prebuilds = _prebuild_rows_of(preset_ids, now)  # queries 2a and 2
        wanted = set(preset_ids)
        # Query 3 as it is (presets are few, prebuilds many), then only the wanted ones.
        scope = _preset_rows({row["preset_id"] for row in prebuilds})
        preset_rows = [row for row in scope if row["id"] in wanted]
    preset_ids = [row["id"] for row in preset_rows]
    schedules = _schedules(preset_ids)  # query 4
    history = _build_history(preset_ids, now=now)  # query 5
    goals = [row["id"] for row in preset_rows if _goal(row) is not None]
    demand = _sizing_history_cached(goals, now=now) if goals else {}  # query 6, see there

    by_preset: dict[UUID, list[dict[str, Any]]] = defaultdict(list)
    for row in prebuilds:
        by_preset[row["preset_id"]].append(row)
    entries = [
        _entry(
            row,
            by_preset.get(row["id"], ()),
            schedules.get(row["id"], ()),
            history,
            demand.get(row["id"]),
            now,
        )
        for row in preset_rows
    ]
    return ReconciliationSnapshot(now=now, paused=paused, presets=tuple(entries))


# ---------------------------------------------------------------------------------------------
# The queries


def _fetch(sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        columns = [column.name for column in cursor.description]
        return [dict(zip(columns, values, strict=True)) for values in cursor.fetchall()]


# Query 2: the latest build of every live system-owned workspace (`DISTINCT ON (workspace_id)
# … ORDER BY workspace_id, build_number DESC`, served by the unique (workspace, build_number)
# index), kept when it is running (succeeded start) or in progress (active job). Readiness and
# health are one LATERAL aggregate over the workspace's current agents
# (`eligibility.agents_summary`, on the partial `agent_current` index), so they cost one index
# probe per prebuild rather than a scan of every agent; judged at the pass's `now`. Failed
# and canceled prebuilds are filtered out here: they are kept for inspection but count for
# nothing.
_PREBUILDS_SQL = f"""
WITH latest AS (
    SELECT DISTINCT ON (b.workspace_id)
           b.workspace_id, b.preset_id, b.transition, b.job_id, j.status AS job_status,
           w.created_at
      FROM workspaces_workspace w
      JOIN workspaces_workspacebuild b ON b.workspace_id = w.id
      JOIN workspaces_provisionerjob j ON j.id = b.job_id
     WHERE w.owner_id = %(system_user)s AND NOT w.deleted
     ORDER BY b.workspace_id, b.build_number DESC
)
SELECT l.workspace_id, l.preset_id, l.transition, l.job_id, l.job_status, l.created_at,
       a.claimable AS ready, a.unhealthy_reason
  FROM latest l
  LEFT JOIN LATERAL (
        {eligibility.agents_summary("l.workspace_id", now="%(now)s::timestamptz")}
       ) a ON l.transition = 'start' AND l.job_status = 'succeeded'
 WHERE l.preset_id IS NOT NULL
   AND ((l.transition = 'start' AND l.job_status = 'succeeded')
        OR l.job_status IN ('pending', 'running', 'canceling'))
"""


def _prebuild_rows(now: datetime) -> list[dict[str, Any]]:
    liveness = eligibility.params(disconnect_timeout=settings.AGENT_DISCONNECT_TIMEOUT)
    return _fetch(_PREBUILDS_SQL, {"system_user": SYSTEM_USER_ID, "now": now, **liveness})


# Query 2 for some presets only. The live system-owned workspaces that ever had a build of
# them (query 2a, the build's preset index) go into query 2 as a literal list: a condition on
# the DISTINCT ON column is pushed down into `latest` (a subquery's condition would not be), so
# only their builds are read; then their latest build must be of one of the presets.
_PRESET_WORKSPACES_SQL = """
SELECT DISTINCT b.workspace_id
  FROM workspaces_workspacebuild b
  JOIN workspaces_workspace w ON w.id = b.workspace_id
 WHERE b.preset_id = ANY(%(preset_ids)s::uuid[])
   AND w.owner_id = %(system_user)s AND NOT w.deleted
"""
_PRESET_PREBUILDS_SQL = f"""
SELECT * FROM ({_PREBUILDS_SQL}) prebuilds
 WHERE workspace_id = ANY(%(workspace_ids)s::uuid[]) AND preset_id = ANY(%(preset_ids)s::uuid[])
"""


def _prebuild_rows_of(preset_ids: Collection[UUID], now: datetime) -> list[dict[str, Any]]:
    params = {"system_user": SYSTEM_USER_ID, "preset_ids": list(preset_ids)}
    workspace_ids = [row["workspace_id"] for row in _fetch(_PRESET_WORKSPACES_SQL, params)]
    if not workspace_ids:
        return []
    liveness = eligibility.params(disconnect_timeout=settings.AGENT_DISCONNECT_TIMEOUT)
    return _fetch(
        _PRESET_PREBUILDS_SQL, {**params, "now": now, "workspace_ids": workspace_ids, **liveness}
    )


# Query 3: the presets in scope with the names of their version, template and organization.
# The first branch walks templates to their active version's presets (the preset's
# template_version index); the second adds presets that still have prebuilds (query 2), which
# is how presets of old versions, deprecated or deleted templates, or with `desired_instances`
# removed, get cleaned up. UNION removes the overlap.
_PRESETS_SQL = """
WITH scope AS (
    SELECT p.id
      FROM workspaces_template t
      JOIN workspaces_templateversionpreset p ON p.template_version_id = t.active_version_id
     WHERE NOT t.deleted AND NOT t.deprecated AND p.desired_instances IS NOT NULL
    UNION
    SELECT unnest(%(with_prebuilds)s::uuid[])
)
SELECT p.id, p.name, p.parameters, p.desired_instances, p.invalidate_after,
       p.scheduling_timezone, p.last_invalidated_at, p.prebuild_status,
       p.prebuild_status_reason, p.target_hit_rate, p.min_instances, p.max_instances,
       v.id AS template_version_id, v.name AS template_version, v.parameters AS version_parameters,
       t.id AS template_id, t.name AS template,
       o.id AS organization_id, o.name AS organization,
       (t.active_version_id = v.id AND NOT t.deleted AND NOT t.deprecated) AS active
       -- ^ eligibility.ACTIVE, for a preset rather than a build
  FROM scope s
  JOIN workspaces_templateversionpreset p ON p.id = s.id
  JOIN workspaces_templateversion v ON v.id = p.template_version_id
  JOIN workspaces_template t ON t.id = v.template_id
  JOIN accounts_organization o ON o.id = t.organization_id
 ORDER BY o.name, t.name, v.number DESC, p.name, p.id
"""


def _preset_rows(with_prebuilds: Iterable[UUID]) -> list[dict[str, Any]]:
    return _fetch(_PRESETS_SQL, {"with_prebuilds": list(with_prebuilds)})


# Query 4: the schedules of those presets, in their declared order (first match wins).
def _schedules(preset_ids: Sequence[UUID]) -> dict[UUID, tuple[PrebuildSchedule, ...]]:
    result: dict[UUID, list[PrebuildSchedule]] = defaultdict(list)
    rows = (
        PresetSchedule.objects.filter(preset_id__in=preset_ids)
        .order_by("preset_id", "position")
        .values_list("preset_id", "cron", "instances")
    )
    for preset_id, cron, instances in rows:
        result[preset_id].append(PrebuildSchedule(cron=cron, instances=instances))
    return {preset_id: tuple(items) for preset_id, items in result.items()}


# Query 5: the history of prebuild creations, per preset, in one pass over the preset's
# prebuild start builds (initiator the system user, reason `prebuild`; the preset index):
# - backoff: *template* failures whose job completed inside the look-back window, and the
#   newest completion among them;
# - hard limit: a window function numbers the builds newest first, separately for the builds
#   made after the preset's last status change (an operator reset starts a fresh streak), and
#   the streak holds when the newest `hard_limit` of those exist and all failed;
# - infrastructure failures (`failure_kind`, a lost worker, a database outage) say nothing
#   about the template: they are numbered apart (their own window partition), so they neither
#   count towards back-off or the streak nor break a streak of template failures; they are
#   only counted, for the status document. A failed job without a kind counts as `template`;
# - the newest failure of any kind, with its error, numbered newest first among the failures.
# Builds are counted whatever became of their workspace since (claimed, deleted): a prebuild
# that succeeded and was claimed still broke a failure streak.
_HISTORY_SQL = """
WITH builds AS (
    SELECT b.id, b.preset_id, b.created_at, j.status, j.completed_at,
           COALESCE(NULLIF(j.failure_kind, ''), 'template') AS kind,
           LEFT(j.error, 500) AS error,
           (j.status = 'failed' AND j.failure_kind = 'infrastructure') AS infrastructure,
           (p.prebuild_status_changed_at IS NULL
            OR b.created_at > p.prebuild_status_changed_at) AS since_change
      FROM workspaces_workspacebuild b
      JOIN workspaces_provisionerjob j ON j.id = b.job_id
      JOIN workspaces_templateversionpreset p ON p.id = b.preset_id
     WHERE b.preset_id = ANY(%(preset_ids)s::uuid[])
       AND b.initiator_id = %(system_user)s
       AND b.reason = 'prebuild'
       AND b.transition = 'start'
), ranked AS (
    SELECT builds.*,
           ROW_NUMBER() OVER (PARTITION BY preset_id, since_change, infrastructure
                              ORDER BY created_at DESC, id DESC) AS rn,
           ROW_NUMBER() OVER (PARTITION BY preset_id, status = 'failed'
                              ORDER BY completed_at DESC, id DESC) AS failed_rn
      FROM builds
)
SELECT preset_id,
       COUNT(*) FILTER (WHERE status = 'failed' AND NOT infrastructure
                          AND completed_at >= %(lookback_start)s) AS num_failed,
       MAX(completed_at) FILTER (WHERE status = 'failed' AND NOT infrastructure
                                   AND completed_at >= %(lookback_start)s) AS last_failed_at,
       COUNT(*) FILTER (WHERE infrastructure AND completed_at >= %(lookback_start)s)
           AS num_infrastructure_failed,
       COUNT(*) FILTER (WHERE since_change AND NOT infrastructure AND rn <= %(hard_limit)s)
           AS recent,
       COUNT(*) FILTER (WHERE since_change AND NOT infrastructure AND rn <= %(hard_limit)s
                          AND status = 'failed') AS recent_failed,
       MAX(kind) FILTER (WHERE status = 'failed' AND failed_rn = 1) AS last_failure_kind,
       MAX(error) FILTER (WHERE status = 'failed' AND failed_rn = 1) AS last_failure_error,
       MAX(completed_at) FILTER (WHERE status = 'failed' AND failed_rn = 1) AS last_failure_at
  FROM ranked
 GROUP BY preset_id
"""


@dataclass(frozen=True)
class _History:
    backoff: Backoff | None
    failure_streak: bool
    failures: FailureSummary = field(default_factory=FailureSummary)


def _build_history(preset_ids: Sequence[UUID], *, now: datetime) -> dict[UUID, _History]:
    hard_limit = int(settings.PREBUILDS_FAILURE_HARD_LIMIT)
    lookback: timedelta = settings.PREBUILDS_BACKOFF_LOOKBACK
    rows = _fetch(
        _HISTORY_SQL,
        {
            "preset_ids": list(preset_ids),
            "system_user": SYSTEM_USER_ID,
            "lookback_start": now - lookback,
            "hard_limit": hard_limit,
        },
    )
    result = {}
    for row in rows:
        backoff = None
        if row["num_failed"] and row["last_failed_at"] is not None:
            backoff = Backoff(num_failed=row["num_failed"], last_build_at=row["last_failed_at"])
        streak = hard_limit > 0 and row["recent"] == hard_limit == row["recent_failed"]
        last = None
        if row["last_failure_at"] is not None:
            last = LastFailure(
                kind=row["last_failure_kind"],
                error=row["last_failure_error"] or "",
                at=row["last_failure_at"],
            )
        failures = FailureSummary(
            template=row["num_failed"],
            infrastructure=row["num_infrastructure_failed"],
            last=last,
        )
        result[row["preset_id"]] = _History(
            backoff=backoff, failure_streak=streak, failures=failures
        )
    return result


# Query 6 (only when a preset in scope has a goal): what sizing needs, per goal preset, in one
# statement of two branches. Demand is read across the template's versions by preset *name*
# (a push creates new preset rows; the users asking for "standard" are the same), over the
# look-back window:
# - `demand` rows: requests (`PrebuildClaim`, hits and misses) grouped into bursts (one preset,
#   one UTC minute), counted per (hour of the week, burst size), with the first minute seen;
# - `build` rows: the durations (job started → completed) of the newest successful prebuild
#   start builds, at most `builds` of them.
_SIZING_SQL = """
WITH goals AS (
    SELECT p.id AS goal_id, same.id AS preset_id
      FROM workspaces_templateversionpreset p
      JOIN workspaces_templateversion v ON v.id = p.template_version_id
      JOIN workspaces_templateversion sv ON sv.template_id = v.template_id
      JOIN workspaces_templateversionpreset same
        ON same.template_version_id = sv.id AND same.name = p.name
     WHERE p.id = ANY(%(preset_ids)s::uuid[])
), bursts AS (
    SELECT g.goal_id, date_trunc('minute', c.requested_at AT TIME ZONE 'UTC') AS minute,
           COUNT(*) AS size
      FROM goals g
      JOIN prebuilds_prebuildclaim c ON c.preset_id = g.preset_id
     WHERE c.requested_at >= %(window_start)s AND c.requested_at < %(now)s
     GROUP BY 1, 2
), builds AS (
    SELECT g.goal_id, EXTRACT(EPOCH FROM j.completed_at - j.started_at)::float AS seconds,
           ROW_NUMBER() OVER (PARTITION BY g.goal_id ORDER BY j.completed_at DESC) AS rn
      FROM goals g
      JOIN workspaces_workspacebuild b ON b.preset_id = g.preset_id
      JOIN workspaces_provisionerjob j ON j.id = b.job_id
     WHERE b.initiator_id = %(system_user)s AND b.reason = 'prebuild'
       AND b.transition = 'start' AND j.status = 'succeeded'
       AND j.started_at IS NOT NULL AND j.completed_at >= %(window_start)s
)
SELECT 'demand' AS kind, goal_id,
       ((EXTRACT(ISODOW FROM minute)::int - 1) * 24 + EXTRACT(HOUR FROM minute)::int)
           AS hour_of_week,
       size, COUNT(*) AS minutes, MIN(minute) AS first_minute, NULL::float AS seconds
  FROM bursts
 GROUP BY goal_id, hour_of_week, size
UNION ALL
SELECT 'build', goal_id, NULL, NULL, NULL, NULL, seconds
  FROM builds
 WHERE rn <= %(builds)s
"""
SIZING_BUILD_SAMPLES = 200


def recent_prebuild_build_seconds(**builds: Any) -> list[float]:
    """Durations (s) of the newest `SIZING_BUILD_SAMPLES` successful prebuild start builds
    matching ``builds`` (lookups on the build, e.g. ``preset__in=…`` or
    ``workspace__template_id=…``), newest first: what the backtest draws from and a push plan
    takes its p90 of, the same sample query 6 gives sizing."""
    rows = (
        ProvisionerJob.objects.filter(
            **{f"build__{lookup}": value for lookup, value in builds.items()},
            build__initiator_id=SYSTEM_USER_ID,
            build__reason="prebuild",
            build__transition="start",
            status=JobStatus.SUCCEEDED,
            started_at__isnull=False,
            completed_at__isnull=False,
        )
        .order_by("-completed_at")
        .values_list("started_at", "completed_at")[:SIZING_BUILD_SAMPLES]
    )
    return [max((done - started).total_seconds(), 0.0) for started, done in rows]


@dataclass(frozen=True)
class _SizingHistory:
    demand: Demand
    build_seconds: tuple[float, ...]


def _sizing_history(preset_ids: Sequence[UUID], *, now: datetime) -> dict[UUID, _SizingHistory]:
    lookback_days = int(settings.PREBUILDS_SIZING_LOOKBACK_DAYS)
    window_start = now - timedelta(days=lookback_days)
    rows = _fetch(
        _SIZING_SQL,
        {
            "preset_ids": list(preset_ids),
            "system_user": SYSTEM_USER_ID,
            "window_start": window_start,
            "now": now,
            "builds": SIZING_BUILD_SAMPLES,
        },
    )
    bursts: dict[UUID, dict[int, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    first: dict[UUID, datetime] = {}
    seconds: dict[UUID, list[float]] = defaultdict(list)
    for row in rows:
        goal = row["goal_id"]
        if row["kind"] == "build":
            seconds[goal].append(max(row["seconds"], 0.0))
            continue
        bursts[goal][row["hour_of_week"]][row["size"]] = row["minutes"]
        # `minute` is UTC wall-clock time (timestamp without time zone).
        seen = row["first_minute"].replace(tzinfo=UTC)
        first[goal] = min(first.get(goal, seen), seen)
    result = {}
    for goal in preset_ids:
        days = (now - first[goal]).total_seconds() / 86400 if goal in first else 0.0
        result[goal] = _SizingHistory(
            demand=Demand(
                history_days=min(days, float(lookback_days)),
                bursts={hour: dict(sizes) for hour, sizes in bursts.get(goal, {}).items()},
            ),
            build_seconds=tuple(seconds.get(goal, ())),
        )
    return result


# Query 6 reads every request of the look-back window (measured: about 1 s for 100 goal presets
# with 640,000 requests in 28 days), while its figures are per hour of the week: a process
# reuses a preset's figures for SIZING_REFRESH, so at most one pass in twenty (at the default
# 15 s interval) pays for it, and only for presets whose figures are older.
SIZING_REFRESH = timedelta(minutes=5)
_sizing_cache: dict[UUID, tuple[datetime, _SizingHistory]] = {}


def _sizing_history_cached(
    preset_ids: Sequence[UUID], *, now: datetime
) -> dict[UUID, _SizingHistory]:
    """`_sizing_history`, reusing figures read less than SIZING_REFRESH before `now` (one query
    for all the presets whose figures are missing or older; none when all are fresh)."""
    result: dict[UUID, _SizingHistory] = {}
    missing = []
    for preset_id in preset_ids:
        cached = _sizing_cache.get(preset_id)
        # A `now` before the reading (a clock set back, a test's past `now`) is not fresh.
        if cached is not None and timedelta(0) <= now - cached[0] < SIZING_REFRESH:
            result[preset_id] = cached[1]
        else:
            missing.append(preset_id)
    if missing:
        if len(_sizing_cache) > 20_000:  # presets come and go with versions: forget the old
            _sizing_cache.clear()
        for preset_id, history in _sizing_history(missing, now=now).items():
            _sizing_cache[preset_id] = (now, history)
            result[preset_id] = history
    return result


def sizing_cache_clear() -> None:
    """Forget every cached sizing figure (tests; an operator's "refresh now" could use it)."""
    _sizing_cache.clear()


def _goal(row: dict[str, Any]) -> SizingGoal | None:
    """The preset's goal when it is sized by one (active, declares prebuilds, has a target)."""
    if row["target_hit_rate"] is None or row["desired_instances"] is None or not row["active"]:
        return None
    return SizingGoal(
        target_hit_rate=row["target_hit_rate"],
        min_instances=row["min_instances"] or 0,
        max_instances=row["max_instances"],
    )


# ---------------------------------------------------------------------------------------------
# Assembly


def _entry(
    row: dict[str, Any],
    prebuilds: Iterable[dict[str, Any]],
    schedules: tuple[PrebuildSchedule, ...],
    history: dict[UUID, _History],
    sizing_history: _SizingHistory | None,
    now: datetime,
) -> PresetEntry:
    running: list[PrebuildInfo] = []
    in_progress = {"start": 0, "stop": 0, "delete": 0}
    pending_job_ids: list[UUID] = []
    unhealthy: dict[UUID, str] = {}
    for prebuild in prebuilds:
        if prebuild["job_status"] == "succeeded":  # query 2 only keeps succeeded *starts*
            reason = prebuild["unhealthy_reason"]
            if reason is not None:
                unhealthy[prebuild["workspace_id"]] = reason
            running.append(
                PrebuildInfo(
                    id=prebuild["workspace_id"],
                    created_at=prebuild["created_at"],
                    ready=bool(prebuild["ready"]),
                    healthy=reason is None,
                )
            )
            continue
        in_progress[prebuild["transition"]] += 1
        # Only pending *start* builds are canceled: canceling a pending delete would strand
        # the prebuild (no longer running, never deleted).
        if prebuild["job_status"] == "pending" and prebuild["transition"] == "start":
            pending_job_ids.append(prebuild["job_id"])
    facts = history.get(row["id"], _History(backoff=None, failure_streak=False))
    snapshot = PresetSnapshot(
        preset_id=row["id"],
        desired_instances=row["desired_instances"],
        active=bool(row["active"]),
        running=running,
        ttl=row["invalidate_after"],
        last_invalidated_at=row["last_invalidated_at"],
        timezone=row["scheduling_timezone"],
        schedules=schedules,
        starting=in_progress["start"],
        stopping=in_progress["stop"],
        deleting=in_progress["delete"],
        pending_count=len(pending_job_ids),
        backoff=facts.backoff,
        hard_limited=row["prebuild_status"] == PrebuildStatus.HARD_LIMITED,
    )
    goal = _goal(row)
    sizing = None
    if goal is not None and sizing_history is not None:
        sizing = desired_size(
            goal=goal,
            demand=sizing_history.demand,
            build_seconds=sizing_history.build_seconds,
            now=now,
            fallback=calculate_desired_instances(snapshot, now),
        )
        # The core sizes the pool from `desired_instances`; the schedules were the fallback.
        snapshot = replace(snapshot, desired_instances=sizing.desired, schedules=())
    return PresetEntry(
        snapshot=snapshot,
        name=row["name"],
        parameters=_json(row["parameters"], {}),
        status=row["prebuild_status"],
        status_reason=row["prebuild_status_reason"],
        template_id=row["template_id"],
        template=row["template"],
        template_version_id=row["template_version_id"],
        template_version=row["template_version"],
        version_parameter_names=frozenset(
            parameter.get("name")
            for parameter in _json(row["version_parameters"], [])
            if isinstance(parameter, dict)
        ),
        organization_id=row["organization_id"],
        organization=row["organization"],
        pending_job_ids=tuple(pending_job_ids),
        failure_streak=facts.failure_streak,
        failures=facts.failures,
        unhealthy_reasons=unhealthy,
        sizing=sizing,
        declared_schedules=schedules,
    )


def _json(value: Any, default: Any) -> Any:
    """Django's psycopg setup hands raw jsonb back as text (JSONField decodes it itself)."""
    if value is None:
        return default
    if isinstance(value, str):
        return json.loads(value)
    return value
