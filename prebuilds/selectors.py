"""Reads for the reconciler: one snapshot of every preset a pass looks at.

`reconciliation_snapshot` answers with a **fixed number of queries** (five), whatever the
number of presets, templates and workspaces, so a pass costs the same handful of round trips
at 1 preset and at 1,000. Each query is a set-based aggregate documented where it is written;
everything per-preset is then assembled in Python from the rows.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from prebuilds import eligibility
from prebuilds.models import SETTINGS_ID, PrebuildsSettings
from prebuilds.reconciliation import Backoff, PrebuildInfo, PrebuildSchedule, PresetSnapshot
from workspaces.models import PrebuildStatus, PresetSchedule


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
    # Why each unhealthy running prebuild is (`agent_off`, `agent_disconnected`, ...).
    unhealthy_reasons: dict[UUID, str] = field(default_factory=dict)

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


def reconciliation_snapshot(*, now: datetime | None = None) -> ReconciliationSnapshot:
    """Read every preset a pass must look at, with its `PresetSnapshot`, in five queries.

    The presets are every preset with `desired_instances` on an active version, plus every
    other preset that still has running or in-progress prebuilds. They come ordered by
    organization, template, version (newest first) and preset name.

    The queries run in the caller's transaction (or autocommit): the snapshot is a moment's
    view, and the executor re-checks what matters (ownership, build in progress) under row
    locks before it writes.
    """
    now = now or timezone.now()
    paused = reconciliation_paused()  # query 1
    prebuilds = _prebuild_rows(now)  # query 2
    preset_rows = _preset_rows({row["preset_id"] for row in prebuilds})  # query 3
    preset_ids = [row["id"] for row in preset_rows]
    schedules = _schedules(preset_ids)  # query 4
    history = _build_history(preset_ids, now=now)  # query 5

    by_preset: dict[UUID, list[dict[str, Any]]] = defaultdict(list)
    for row in prebuilds:
        by_preset[row["preset_id"]].append(row)
    entries = [
        _entry(row, by_preset.get(row["id"], ()), schedules.get(row["id"], ()), history)
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
       p.prebuild_status_reason,
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
# - backoff: failed ones whose job completed inside the look-back window, and the newest
#   completion among them;
# - hard limit: a window function numbers the builds newest first, separately for the builds
#   made after the preset's last status change (an operator reset starts a fresh streak), and
#   the streak holds when the newest `hard_limit` of those exist and all failed.
# Builds are counted whatever became of their workspace since (claimed, deleted): a prebuild
# that succeeded and was claimed still broke a failure streak.
_HISTORY_SQL = """
WITH builds AS (
    SELECT b.id, b.preset_id, b.created_at, j.status, j.completed_at,
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
           ROW_NUMBER() OVER (PARTITION BY preset_id, since_change
                              ORDER BY created_at DESC, id DESC) AS rn
      FROM builds
)
SELECT preset_id,
       COUNT(*) FILTER (WHERE status = 'failed' AND completed_at >= %(lookback_start)s)
           AS num_failed,
       MAX(completed_at) FILTER (WHERE status = 'failed' AND completed_at >= %(lookback_start)s)
           AS last_failed_at,
       COUNT(*) FILTER (WHERE since_change AND rn <= %(hard_limit)s) AS recent,
       COUNT(*) FILTER (WHERE since_change AND rn <= %(hard_limit)s AND status = 'failed')
           AS recent_failed
  FROM ranked
 GROUP BY preset_id
"""


@dataclass(frozen=True)
class _History:
    backoff: Backoff | None
    failure_streak: bool


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
        result[row["preset_id"]] = _History(backoff=backoff, failure_streak=streak)
    return result


# ---------------------------------------------------------------------------------------------
# Assembly


def _entry(
    row: dict[str, Any],
    prebuilds: Iterable[dict[str, Any]],
    schedules: tuple[PrebuildSchedule, ...],
    history: dict[UUID, _History],
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
        unhealthy_reasons=unhealthy,
    )


def _json(value: Any, default: Any) -> Any:
    """Django's psycopg setup hands raw jsonb back as text (JSONField decodes it itself)."""
    if value is None:
        return default
    if isinstance(value, str):
        return json.loads(value)
    return value
