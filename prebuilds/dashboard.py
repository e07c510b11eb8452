"""Read models for the operator dashboards: the status document and database rows, as rows.

Views stay thin: they call one function here and hand the result to a template. Every function
answers with a **fixed number of queries**, whatever the number of presets, prebuilds, claims
or passes, so a dashboard costs the same at 10 presets and at 1,000.

The overview is built from the reconciler's dry-run pass (`reconcile(dry_run=True)`), the very
`PassResult` that `status_document()` serialises: same presets, same state, same actions. The
dashboard reads the result rather than the JSON because the JSON drops two things an operator
needs: the reason of a validation failure or hard limit, and how many failures a backoff is
counting.

Live updates without re-rendering unchanged rows
------------------------------------------------
Every live piece of the overview (the reconciler card, each template's header row, each preset
row, each template's totals row, the audit list) is an element with a stable `id` and a
`data-version`: a short hash of exactly the data it shows (never of the time of rendering, so
an unchanged row keeps its version). The table carries `data-layout`, the hash of its ordered
piece ids. The page polls (`hx-trigger="every 3s [visible]"`, slower while the tab is hidden)
with what it holds: `layout=<hash>&known=<v1>.<v2>…` (every `data-version` in page order,
collected by `static/js/warmstart.js` on `htmx:configRequest`). `overview_changes` compares them
with the current ones and the view answers with only the pieces whose version differs, as htmx
out-of-band swaps (`hx-swap-oob`; table rows wrapped in `<template>` so the HTML parser keeps
them, htmx unwraps them). When the layout differs (a preset appeared or left) the whole table is
swapped instead, which keeps the protocol trivially correct. Nothing changed: 204, and htmx
swaps nothing.

What a page costs. Every viewer of a web process is served from one shared `Overview`
(`overview_shared`), computed at most once a second (`OVERVIEW_MAX_AGE`) by one request while
the others are answered from the previous one, so twenty operators watching cost one
computation a second, not twenty every three seconds, and a page load costs its rendering. A
poll whose versions are all current is then a string comparison and a 204: the unchanged rows
cost nothing. A control computes a fresh overview (`overview_fresh`: begun after the control's
write, shared by requests arriving meanwhile) and shares it, so an operator's own action shows
at once; anyone else's change shows within about a second plus the poll's interval. The preset
page reads its one preset (`preset_pool`), never the fleet.

Why this shape: no client-side diffing library (idiomorph) and no server-side session state;
the server renders only what changed; an unchanged row's DOM node (focus, text selection) is
left alone. The versions are positional rather than `id:version` pairs so a poll of 1,000
presets stays a ~10 kB query string (a GET, cacheable by nobody but harmless to repeat).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from itertools import groupby
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.expressions import RawSQL
from django.db.models.fields.json import KeyTransform
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from prebuilds import eligibility
from prebuilds.audit import audit_recent
from prebuilds.models import AuditEntry, MissReason, PrebuildClaim, ReconciliationPass
from prebuilds.reconciler import PassResult, PresetResult, reconcile
from prebuilds.reconciliation import ActionType
from workspaces.liveness import agent_connection
from workspaces.models import (
    ACTIVE_JOB_STATUSES,
    BuildReason,
    JobStatus,
    ProvisionerJob,
    Template,
    TemplateVersionPreset,
    Transition,
    Workspace,
    WorkspaceBuild,
)
from workspaces.selectors import current_agents, latest_build, workspace_queryset

# A delete action lists at most this many workspace names; the rest is "and N more".
NAMES_SHOWN = 5


def version_of(*parts: Any) -> str:
    """A short, stable content hash: equal data, equal version (8 hex characters).

    32 bits keep the poll's query string small (9 bytes a row); a collision would only delay
    one row's refresh until its next change, and happens about once in 4 billion changes.
    """
    return hashlib.blake2b(repr(parts).encode(), digest_size=4).hexdigest()


# ---------------------------------------------------------------------------------------------
# The overview


@dataclass(frozen=True)
class ActionText:
    """One pending action of a preset, in words ("create 2", "delete 1 expired: prebuild-x").

    Backoff is rendered by the template as "backing off until <time> after N failures" so the
    time can be shown in the viewer's time zone.
    """

    kind: str  # "create" | "delete" | "backoff" | "cancel_pending"
    text: str
    names: tuple[str, ...] = ()
    more: int = 0
    until: datetime | None = None
    failures: int = 0

    @property
    def words(self) -> str:
        """The action as plain text (times in UTC): what the page says, minus the markup."""
        if self.kind == "backoff":
            until = f"{self.until:%H:%M:%S}" if self.until else "?"
            return f"backing off until {until} after {self.failures} failures"
        if not self.names:
            return self.text
        more = f" and {self.more} more" if self.more else ""
        return f"{self.text}: {', '.join(self.names)}{more}"


@dataclass(frozen=True)
class PresetRow:
    """One preset of the status document, ready to show."""

    preset_id: UUID
    template_id: UUID
    organization: str
    template: str
    template_version: str
    preset: str
    active: bool
    status: str  # healthy | backoff | paused | hard_limited | validation_failed
    status_label: str
    status_reason: str
    status_until: datetime | None
    desired: int
    actual: int
    eligible: int
    starting: int
    stopping: int
    deleting: int
    expired: int
    extraneous: int
    actions: tuple[ActionText, ...]
    # Failed prebuild builds in the back-off look-back window by kind, and the newest failure
    # (kind "" when there is none): an operator must see whether a template or the machinery
    # failed (only template failures hold a pool back).
    failures_template: int = 0
    failures_infrastructure: int = 0
    last_failure_kind: str = ""
    last_failure_error: str = ""
    last_failure_at: datetime | None = None
    unhealthy: int = 0  # running prebuilds whose agents are gone (issue 12)
    # A pool sized by a goal (prebuilds.sizing): "target" or "fallback", and why ("" otherwise).
    sizing_policy: str = ""
    sizing_reason: str = ""

    @property
    def dom_id(self) -> str:
        return f"preset-{self.preset_id}"

    @cached_property
    def version(self) -> str:
        return version_of("preset", astuple(self))

    @property
    def badge(self) -> str:
        return STATUS_BADGES[self.status]


STATUS_BADGES = {
    "healthy": "ok",
    "backoff": "warn",
    "paused": "warn",
    "hard_limited": "bad",
    "validation_failed": "bad",
}
COUNT_FIELDS = (
    "desired",
    "actual",
    "eligible",
    "starting",
    "stopping",
    "deleting",
    "expired",
    "extraneous",
    "unhealthy",
)


@dataclass(frozen=True)
class Totals:
    """Sums of a template's preset rows."""

    template_id: UUID
    presets: int
    desired: int
    actual: int
    eligible: int
    starting: int
    stopping: int
    deleting: int
    expired: int
    extraneous: int
    unhealthy: int

    @property
    def dom_id(self) -> str:
        return f"totals-{self.template_id}"

    @cached_property
    def version(self) -> str:
        return version_of("totals", astuple(self))


@dataclass(frozen=True)
class TemplateGroup:
    """The presets of one template (of one organization), with their totals."""

    template_id: UUID
    organization: str
    template: str
    rows: tuple[PresetRow, ...]
    totals: Totals

    @property
    def dom_id(self) -> str:
        return f"template-{self.template_id}"

    @cached_property
    def version(self) -> str:
        return version_of("template", self.template_id, self.organization, self.template)


@dataclass(frozen=True)
class Overview:
    """Everything the overview page shows."""

    paused: bool
    lock_acquired: bool
    computed_at: datetime
    groups: tuple[TemplateGroup, ...]
    last_pass: ReconciliationPass | None
    audit: tuple[AuditEntry, ...]

    @property
    def preset_count(self) -> int:
        return sum(len(group.rows) for group in self.groups)

    @cached_property
    def reconciler_version(self) -> str:
        last = self.last_pass
        return version_of(
            "reconciler",
            self.paused,
            self.lock_acquired,
            last.pk if last else None,
        )

    @cached_property
    def audit_version(self) -> str:
        return version_of("audit", tuple(entry.pk for entry in self.audit))

    @cached_property
    def table_pieces(self) -> list[tuple[str, str, Any]]:
        """The table's versioned rows in page order: `(dom_id, version, (kind, item))`."""
        pieces: list[tuple[str, str, Any]] = []
        for group in self.groups:
            pieces.append((group.dom_id, group.version, ("template", group)))
            pieces.extend((row.dom_id, row.version, ("preset", row)) for row in group.rows)
            pieces.append((group.totals.dom_id, group.totals.version, ("totals", group.totals)))
        return pieces

    @cached_property
    def layout(self) -> str:
        """The version of the table's shape: which pieces, in which order."""
        return version_of("layout", tuple(dom_id for dom_id, _, _ in self.table_pieces))

    def known(self) -> str:
        """What a page showing this overview sends back when it polls."""
        return self._known

    @cached_property
    def _known(self) -> str:
        versions = [version for _, version, _ in self.table_pieces]
        return ".".join([self.reconciler_version, *versions, self.audit_version])


def overview(*, now: datetime | None = None) -> Overview:
    """The overview, from a dry-run pass: 5 snapshot queries + names + last pass + audit.

    Writes nothing (the dry run only probes the reconciliation lock, on its own connection).
    """
    result = reconcile(dry_run=True, now=now)
    # The document is ordered by organization, template, version, preset: groupby suffices.
    groups = []
    for template_id, grouped in groupby(preset_rows(result), key=lambda row: row.template_id):
        rows = tuple(grouped)
        groups.append(
            TemplateGroup(
                template_id=template_id,
                organization=rows[0].organization,
                template=rows[0].template,
                rows=rows,
                totals=_totals(template_id, rows),
            )
        )
    return Overview(
        paused=result.paused,
        lock_acquired=result.lock_acquired,
        computed_at=result.started_at,
        groups=tuple(groups),
        last_pass=ReconciliationPass.objects.filter(lock_acquired=True).first(),
        audit=tuple(audit_recent()),
    )


# How old the shared overview may be when a poll is answered from it (see the module docstring).
OVERVIEW_MAX_AGE = timedelta(seconds=1)
# One computation of the shared overview at a time in this process.
_computing = threading.Lock()
# The shared overview, once computed: (board, time.monotonic() when its computation began).
# Replaced whole (one list assignment) under `_computing`; read without it.
_shared: list[tuple[Overview, float]] = []


def _compute_and_share() -> Overview:
    started = time.monotonic()
    board = overview()
    _shared[:] = [(board, started)]
    return board


def overview_shared(*, max_age: timedelta = OVERVIEW_MAX_AGE) -> Overview:
    """The overview of this process computed at most `max_age` ago, else a fresh one.

    Single flight: one request computes while the others wait for it and share its result, so
    however many viewers poll, a process computes the overview at most once per `max_age`.
    While a newer one is being computed, polls are answered from the current one instead of
    waiting (so the answer may be `max_age` plus one computation old).
    """
    current = _shared[0][0] if _shared else None
    if current is not None and timezone.now() - current.computed_at <= max_age:
        return current
    if not _computing.acquire(blocking=current is None):
        return current  # being recomputed: this one meanwhile
    try:
        if _shared and timezone.now() - _shared[0][0].computed_at <= max_age:
            return _shared[0][0]  # computed while we waited for the lock
        return _compute_and_share()
    finally:
        _computing.release()


def overview_fresh() -> Overview:
    """An overview whose computation began after this call did, so it sees every write
    committed before (a control's); shared from then on.

    Requests waiting while one computes take the next result if it began after they arrived:
    many concurrent callers cost one or two computations, not one each.
    """
    asked = time.monotonic()
    with _computing:
        if _shared and _shared[0][1] >= asked:
            return _shared[0][0]
        return _compute_and_share()


def overview_forget() -> None:
    """Drop the shared overview: the next request computes one (tests start from nothing)."""
    with _computing:
        _shared.clear()


def _totals(template_id: UUID, rows: Sequence[PresetRow]) -> Totals:
    sums = {name: sum(getattr(row, name) for row in rows) for name in COUNT_FIELDS}
    return Totals(template_id=template_id, presets=len(rows), **sums)


def preset_rows(result: PassResult) -> list[PresetRow]:
    """One row per preset of a (dry-run) pass, in the document's order; one query for names."""
    delete_ids = {
        workspace_id
        for preset in result.presets
        for action in preset.actions
        if action.type is ActionType.DELETE
        for workspace_id in action.delete_ids
    }
    names: dict[UUID, str] = (
        dict(Workspace.objects.filter(id__in=delete_ids).values_list("id", "name"))
        if delete_ids
        else {}
    )
    now = result.started_at
    return [_preset_row(preset, result.paused, names, now) for preset in result.presets]


def _preset_row(
    result: PresetResult, paused: bool, names: dict[UUID, str], now: datetime
) -> PresetRow:
    entry, state = result.entry, result.state
    actions = tuple(_action_texts(result, names, now))
    backoff = next((a for a in actions if a.kind == "backoff"), None)
    status, label, until = result.status, "", None
    if status == "validation_failed":
        label = "validation failed"
    elif status == "hard_limited":
        label = "hard limited"
    elif paused:
        status, label = "paused", "paused"
    elif backoff is not None:
        status, label, until = "backoff", "backing off until", backoff.until
    else:
        label = "healthy"
    return PresetRow(
        preset_id=entry.id,
        template_id=entry.template_id,
        organization=entry.organization,
        template=entry.template,
        template_version=entry.template_version,
        preset=entry.name,
        active=entry.active,
        status=status,
        status_label=label,
        status_reason=result.status_reason if status in STATUS_WITH_REASON else "",
        status_until=until,
        desired=state.desired,
        actual=state.actual,
        eligible=state.eligible,
        starting=state.starting,
        stopping=state.stopping,
        deleting=state.deleting,
        expired=state.expired,
        extraneous=state.extraneous,
        actions=actions,
        failures_template=entry.failures.template,
        failures_infrastructure=entry.failures.infrastructure,
        last_failure_kind=entry.failures.last.kind if entry.failures.last else "",
        last_failure_error=entry.failures.last.error if entry.failures.last else "",
        last_failure_at=entry.failures.last.at if entry.failures.last else None,
        unhealthy=state.unhealthy,
        sizing_policy=entry.sizing.policy if entry.sizing else "",
        sizing_reason=entry.sizing.reason if entry.sizing else "",
    )


STATUS_WITH_REASON = ("validation_failed", "hard_limited")
# How a delete's reason (the core's) reads on the page.
DELETE_WORDS = {"inactive": "on an old version", "unhealthy": "unhealthy"}
# Why a prebuild is unhealthy (`prebuilds.eligibility.agents_summary`), in words.
UNHEALTHY_WORDS = {
    "agent_disconnected": "agent disconnected",
    "agent_off": "agent off",
    "agent_shutting_down": "agent shutting down",
    "agent_start_error": "agent start error",
}


def _action_texts(
    result: PresetResult, names: dict[UUID, str], now: datetime
) -> Iterable[ActionText]:
    entry = result.entry
    for action in result.actions:
        if action.type is ActionType.CREATE:
            yield ActionText("create", f"create {action.create}")
        elif action.type is ActionType.CANCEL_PENDING:
            yield ActionText("cancel_pending", f"cancel {action.cancel_count} pending")
        elif action.type is ActionType.BACKOFF:
            backoff = entry.snapshot.backoff
            yield ActionText(
                "backoff",
                "backing off",
                until=action.backoff_until,
                failures=backoff.num_failed if backoff else 0,
            )
        else:
            ids = action.delete_ids
            why = DELETE_WORDS.get(action.reason, action.reason or "extraneous")
            shown = tuple(names.get(i, str(i)) for i in ids[:NAMES_SHOWN])
            if action.reason == "unhealthy":  # say why each one is
                reasons = entry.unhealthy_reasons
                shown = tuple(
                    f"{name} ({UNHEALTHY_WORDS.get(reasons.get(i, ''), 'agent gone')})"
                    for i, name in zip(ids, shown, strict=False)
                )
            yield ActionText(
                "delete",
                f"delete {len(ids)} {why}",
                names=shown,
                more=max(len(ids) - NAMES_SHOWN, 0),
            )


@dataclass(frozen=True)
class Changes:
    """What a poll must swap: flags for the fixed pieces, the changed table rows, or `table`."""

    reconciler: bool = False
    audit: bool = False
    table: bool = False
    items: tuple[tuple[str, Any], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.reconciler or self.audit or self.table or self.items)


def overview_changes(board: Overview, *, layout: str, known: str) -> Changes:
    """Compare the versions a page holds with the current ones (see the module docstring).

    `layout` is the version of the ordered list of table piece ids the page holds; `known` the
    versions of every piece in page order, dot-separated (the reconciler card first, the audit
    list last). Positional rather than `id:version` pairs so that a 1,000-preset poll stays a
    ~10 kB query string. Guarantees: every piece whose version differs is in the answer; when
    the table's pieces differ (added, removed, reordered) or `known` does not line up with
    them, the whole table is.
    """
    if layout == board.layout and known == board.known():
        return Changes()  # the common poll: nothing changed, nothing compared piece by piece
    versions = known.split(".") if known else []
    pieces = board.table_pieces
    if layout != board.layout or len(versions) != len(pieces) + 2:
        return Changes(
            reconciler=not versions or versions[0] != board.reconciler_version,
            audit=not versions or versions[-1] != board.audit_version,
            table=True,
        )
    return Changes(
        reconciler=versions[0] != board.reconciler_version,
        audit=versions[-1] != board.audit_version,
        items=tuple(
            item
            for held, (_, version, item) in zip(versions[1:-1], pieces, strict=True)
            if held != version
        ),
    )


@dataclass(frozen=True)
class PresetPool:
    """One preset's overview row (None when the status document leaves it out), and context."""

    row: PresetRow | None
    paused: bool
    computed_at: datetime


def preset_pool(preset_id: UUID, *, now: datetime | None = None) -> PresetPool:
    """The overview's row of one preset, from a dry run of that preset alone.

    The same decision the overview shows (`reconcile(dry_run=True)`, limited with
    `preset_ids`), reading that preset's prebuilds only: the preset page and its poll cost one
    pool, whatever the size of the fleet.
    """
    result = reconcile(dry_run=True, now=now, preset_ids=(preset_id,))
    rows = preset_rows(result)
    return PresetPool(
        row=rows[0] if rows else None, paused=result.paused, computed_at=result.started_at
    )


def preset_row(board: Overview, preset_id: UUID) -> PresetRow | None:
    """The overview row of one preset, or None when the preset is not in the status document."""
    for group in board.groups:
        for row in group.rows:
            if row.preset_id == preset_id:
                return row
    return None


# ---------------------------------------------------------------------------------------------
# The preset detail page


def preset_get(preset_id: UUID) -> TemplateVersionPreset | None:
    """The preset with its version, template and organization (one query), or None."""
    return (
        TemplateVersionPreset.objects.select_related(
            "template_version__template__organization", "template_version__template"
        )
        .filter(id=preset_id)
        .first()
    )


@dataclass(frozen=True)
class PrebuildLine:
    """One live prebuild of a preset."""

    workspace: Workspace
    build: WorkspaceBuild | None
    agents: tuple[tuple[str, str, str], ...]  # (name, lifecycle state, connection)
    ready: bool  # running, and every agent ready and connected (prebuilds.eligibility)
    expired: bool
    unhealthy: str = ""  # why its agents count as gone (UNHEALTHY_WORDS), or ""


def _latest_build_subquery(value: str) -> Subquery:
    return Subquery(
        WorkspaceBuild.objects.filter(workspace=OuterRef("pk"))
        .order_by("-build_number")
        .values(value)[:1]
    )


def preset_prebuilds(
    preset: TemplateVersionPreset, *, now: datetime | None = None, limit: int = 200
) -> list[PrebuildLine]:
    """Live prebuilds (system-owned, not deleted) whose latest build is of this preset, oldest
    first, with latest build and current agents: three queries. Readiness and health are
    judged by the one rule (`prebuilds.eligibility`), in the same query."""
    now = now or timezone.now()
    values = eligibility.params(disconnect_timeout=settings.AGENT_DISCONNECT_TIMEOUT)
    summary = eligibility.inline(eligibility.agents_summary("workspaces_workspace.id"), values)
    workspaces = (
        workspace_queryset()
        .filter(owner_id=SYSTEM_USER_ID, deleted=False)
        .annotate(
            agents_claimable=RawSQL(f"SELECT s.claimable FROM ({summary}) s", ()),
            unhealthy_reason=RawSQL(f"SELECT s.unhealthy_reason FROM ({summary}) s", ()),
        )
        .annotate(latest_preset_id=_latest_build_subquery("preset_id"))
        .filter(latest_preset_id=preset.id)
        .order_by("created_at", "id")[:limit]
    )
    ttl = preset.invalidate_after
    lines = []
    for workspace in workspaces:
        build = latest_build(workspace)
        agents = current_agents(workspace)
        running = (
            build is not None
            and build.transition == Transition.START
            and build.job.status == JobStatus.SUCCEEDED
        )
        expired = bool(
            (preset.last_invalidated_at and workspace.created_at < preset.last_invalidated_at)
            or (ttl and ttl > timedelta(0) and now - workspace.created_at > ttl)
        )
        lines.append(
            PrebuildLine(
                workspace=workspace,
                build=build,
                agents=tuple(
                    (agent.name, agent.lifecycle_state, agent_connection(agent, now=now))
                    for agent in agents
                ),
                ready=running and bool(workspace.agents_claimable),
                expired=expired,
                unhealthy=(
                    UNHEALTHY_WORDS.get(workspace.unhealthy_reason, workspace.unhealthy_reason)
                    if running and workspace.unhealthy_reason
                    else ""
                ),
            )
        )
    return lines


@dataclass(frozen=True)
class ClaimLine:
    claim: PrebuildClaim

    @property
    def seconds_to_ready(self) -> float | None:
        claim = self.claim
        if claim.ready_at is None:
            return None
        return (claim.ready_at - claim.requested_at).total_seconds()


def preset_claims(preset: TemplateVersionPreset, *, limit: int = 20) -> list[ClaimLine]:
    """The newest claims and misses of the preset, with user and workspace (one query)."""
    claims = (
        PrebuildClaim.objects.filter(preset=preset)
        .select_related("user", "workspace")
        .order_by("-requested_at", "-id")[:limit]
    )
    return [ClaimLine(claim) for claim in claims]


# The window of the preset page's "misses by reason": a day, so a quiet night still shows.
MISS_REASONS_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class MissReasonLine:
    code: str  # a ``MissReason`` value
    label: str
    count: int


def preset_miss_reasons(
    preset: TemplateVersionPreset, *, now: datetime
) -> tuple[int, list[MissReasonLine]]:
    """Claims and misses by reason of the preset in ``MISS_REASONS_WINDOW`` before ``now``:
    (hits, one line per reason seen, most first). One query."""
    rows = (
        PrebuildClaim.objects.filter(preset=preset, requested_at__gte=now - MISS_REASONS_WINDOW)
        .order_by()  # no default ordering: it would join the GROUP BY
        .values_list("miss_reason")
        .annotate(count=Count("id"))
    )
    hits, lines = 0, []
    for code, count in rows:
        if not code:
            hits = count
        else:
            lines.append(MissReasonLine(code, MissReason(code).label, count))
    lines.sort(key=lambda line: (-line.count, line.code))
    return hits, lines


def preset_failures(preset: TemplateVersionPreset, *, limit: int = 10) -> list[WorkspaceBuild]:
    """The newest failed prebuild builds of the preset, with job error and workspace (one query)."""
    return list(
        WorkspaceBuild.objects.filter(
            preset=preset, reason=BuildReason.PREBUILD, job__status=JobStatus.FAILED
        )
        .select_related("job", "workspace")
        .defer("job__logs")
        .order_by("-created_at", "-id")[:limit]
    )


# ---------------------------------------------------------------------------------------------
# The chart: desired / running / eligible over the last hours, as inline SVG geometry

CHART_WIDTH = 720
CHART_HEIGHT = 220
CHART_MARGIN = {"left": 40, "right": 14, "top": 36, "bottom": 28}  # the legend sits on top
MAX_POINTS = 200
SERIES = (
    # key, label, index in ReconciliationPass.preset_counts, css class
    ("desired", "desired", 0, "series-desired"),
    ("running", "running", 1, "series-running"),
    ("eligible", "eligible", 2, "series-eligible"),
)


@dataclass(frozen=True)
class Tick:
    position: float
    label: str
    at: datetime | None = None


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    css: str
    points: str  # "x,y x,y …" for <polyline points>
    latest: int | None


@dataclass(frozen=True)
class Chart:
    """Geometry for `templates/prebuilds/_chart.html`; every coordinate is in the viewBox."""

    since: datetime
    until: datetime
    samples: int
    y_max: int
    series: tuple[Series, ...]
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    max_points: int = MAX_POINTS
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    margin: dict[str, int] = field(default_factory=lambda: dict(CHART_MARGIN))

    @property
    def plot_left(self) -> int:
        return self.margin["left"]

    @property
    def plot_right(self) -> int:
        return self.width - self.margin["right"]

    @property
    def plot_top(self) -> int:
        return self.margin["top"]

    @property
    def plot_bottom(self) -> int:
        return self.height - self.margin["bottom"]

    @property
    def center_x(self) -> float:
        return (self.plot_left + self.plot_right) / 2

    @property
    def center_y(self) -> float:
        return (self.plot_top + self.plot_bottom) / 2

    @property
    def summary(self) -> str:
        if not self.samples:
            return "No reconciliation passes recorded for this preset in this period."
        latest = ", ".join(f"{s.label} {s.latest}" for s in self.series)
        return f"{self.samples} samples; latest: {latest}."


def downsample(
    samples: Sequence[tuple[datetime, Any]], *, since: datetime, until: datetime, limit: int
) -> list[tuple[datetime, Any]]:
    """At most `limit` samples: the period cut into `limit` equal buckets, the last sample of
    each non-empty bucket kept. Passes run every few seconds, so "last" is what the pool
    looked like at the end of the bucket, and a change is never more than a bucket late."""
    if len(samples) <= limit:
        return list(samples)
    span = (until - since).total_seconds() or 1.0
    kept: dict[int, tuple[datetime, Any]] = {}
    for at, value in samples:
        bucket = min(int((at - since).total_seconds() / span * limit), limit - 1)
        kept[bucket] = (at, value)  # samples come in time order: the last one wins
    return [kept[bucket] for bucket in sorted(kept)]


def preset_chart(
    preset_id: UUID,
    *,
    now: datetime | None = None,
    hours: int = 6,
    max_points: int = MAX_POINTS,
) -> Chart:
    """Desired / running / eligible of one preset over the last `hours`, from the passes'
    `preset_counts` (one query that reads only this preset's key of each pass)."""
    until = now or timezone.now()
    since = until - timedelta(hours=hours)
    key = str(preset_id)
    rows = (
        ReconciliationPass.objects.filter(started_at__gte=since, preset_counts__has_key=key)
        .annotate(counts=KeyTransform(key, "preset_counts"))
        .order_by("started_at", "id")
        .values_list("started_at", "counts")
    )
    samples = [
        (at, counts)
        for at, counts in rows
        if isinstance(counts, list) and len(counts) == 3 and at <= until
    ]
    samples = downsample(samples, since=since, until=until, limit=max_points)
    y_max = _nice_max(max((max(c) for _, c in samples), default=0))
    left, right = CHART_MARGIN["left"], CHART_WIDTH - CHART_MARGIN["right"]
    top, bottom = CHART_MARGIN["top"], CHART_HEIGHT - CHART_MARGIN["bottom"]
    span = (until - since).total_seconds()

    def x(at: datetime) -> float:
        return round(left + (at - since).total_seconds() / span * (right - left), 1)

    def y(value: float) -> float:
        return round(bottom - value / y_max * (bottom - top), 1)

    series = tuple(
        Series(
            key=key_,
            label=label,
            css=css,
            points=" ".join(f"{x(at)},{y(counts[index])}" for at, counts in samples),
            latest=samples[-1][1][index] if samples else None,
        )
        for key_, label, index, css in SERIES
    )
    step = max(1, math.ceil(y_max / 4))
    y_ticks = tuple(Tick(y(v), str(v)) for v in range(0, y_max + 1, step))
    first_hour = (since + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    x_ticks = tuple(
        Tick(x(at), f"{at:%H:%M}", at)
        for at in (first_hour + timedelta(hours=h) for h in range(hours + 1))
        if since <= at <= until
    )
    return Chart(
        since=since,
        until=until,
        samples=len(samples),
        y_max=y_max,
        series=series,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        max_points=max_points,
    )


def _nice_max(value: int) -> int:
    """A round upper bound for the y axis (at least 1): 1-5, then 10, 20, 25, 50, 100, …"""
    if value <= 5:
        return max(value, 1)
    magnitude = 10 ** (len(str(value)) - 1)
    for factor in (1, 2, 2.5, 5, 10):
        bound = int(factor * magnitude)
        if bound >= value:
            return bound
    return value  # unreachable: 10 * magnitude >= value


# ---------------------------------------------------------------------------------------------
# Staff pages: every workspace, the build queue


def template_choices() -> QuerySet[Template]:
    """Templates for the workspace filter, by organization and name (one query)."""
    return Template.objects.filter(deleted=False).select_related("organization")


def staff_workspaces(
    *,
    owner: str = "",
    template: Template | None = None,
    prebuilds_only: bool = False,
    status: str = "",
) -> QuerySet[Workspace]:
    """Live workspaces of everybody (prebuilds included), newest first, filtered.

    Each carries `latest_builds` and `current_agents` (`workspaces.selectors.workspace_queryset`),
    so a page of them costs three queries whatever its size. `status` filters on the status of
    the latest build's job.
    """
    queryset = workspace_queryset().filter(deleted=False).order_by("-created_at", "id")
    if owner:
        queryset = queryset.filter(owner__username=owner)
    if template is not None:
        queryset = queryset.filter(template=template)
    if prebuilds_only:
        queryset = queryset.filter(owner_id=SYSTEM_USER_ID)
    if status:
        queryset = queryset.annotate(latest_status=_latest_build_subquery("job__status")).filter(
            latest_status=status
        )
    return queryset


def build_queue() -> QuerySet[ProvisionerJob]:
    """Jobs waiting or in progress (pending, running, canceling), oldest first, with their build,
    workspace and owner (one query per page; the logs are never read)."""
    return (
        ProvisionerJob.objects.filter(status__in=ACTIVE_JOB_STATUSES)
        .select_related("build", "build__workspace", "build__workspace__owner", "build__initiator")
        .defer("logs")
        .order_by("created_at", "id")
    )
