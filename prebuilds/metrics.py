"""Prometheus metrics of the prebuild pools, served at `/metrics`.

A custom collector reads the database at scrape time (seven queries, whatever the scale), so
every web process answers the same numbers and no process has to have run the reconciler:
passes run in Celery workers, scrapes hit web processes.

- Counters come from the build history: `created` counts prebuild start builds (initiator the
  system user, reason `prebuild`), `failed` those whose job failed, `claimed` workspaces with
  `claimed_at` set, by the preset of their first build. Rows are never removed (a deleted
  workspace is only flagged), so the counts only grow.
- Gauges `desired`/`running`/`eligible`/`unhealthy` are the figures of the latest pass that
  held the lock (`ReconciliationPass.preset_counts`): the reconciler already computed them at
  one `now`, and re-deriving them per scrape would cost a full snapshot.
- `prebuilds_reconciliation_last_pass_timestamp_seconds`: when the newest pass that held the
  lock started (0 before the first), for the "passes stopped" alert.
- `prebuilds_reconciliation_duration_seconds` is a histogram (`_bucket`, `_count`, `_sum`) of
  every pass that held the lock, whichever process ran it: each such pass adds itself to
  `MetricTotal` rows (one upsert), which are never pruned, so the series only grow and
  `rate(_sum) / rate(_count)` and `histogram_quantile(0.99, rate(_bucket[5m]))` work. (A
  process-local `Histogram` would only be seen by the worker process that ran the passes,
  never by the web process being scraped; the pass rows themselves are pruned after a day.)
- `prebuilt_workspaces_claim_misses_total{reason}`: claim requests that found no eligible
  prebuild, by `MissReason` code (`PrebuildClaim.miss_reason`; `unknown` for misses recorded
  before reasons were), from the same query as the claim durations.
- `prebuilt_workspace_claim_duration_seconds`: a histogram of claim request → every agent ready
  for the new owner, from `PrebuildClaim` rows (never pruned).

Every metric Coder also has is exposed a second time under Coder's name and labels
(`CODER_NAMES`: `coderd_prebuilt_workspaces_*` with `organization_name`, `template_name`,
`preset_name`), so Coder's dashboards and alerts work unchanged. The HTTP and process metrics
of the answering web process come from `config.http_metrics`.

Labels are organization, template and preset *names*; presets of the same name on several
versions of a template are summed into one series.
"""

from __future__ import annotations

import hmac
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import path
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from accounts import tokens
from accounts.models import SYSTEM_USER_ID
from config import http_metrics
from prebuilds.models import MetricTotal, MissReason, ReconciliationPass
from prebuilds.selectors import reconciliation_paused
from workspaces.models import PrebuildStatus

LABELS = ("organization", "template", "preset")
DURATION_METRIC = "prebuilds_reconciliation_duration_seconds"
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[str, str, str]

_NAMES = """
  JOIN workspaces_templateversionpreset p ON p.id = {preset}
  JOIN workspaces_templateversion v ON v.id = p.template_version_id
  JOIN workspaces_template t ON t.id = v.template_id
  JOIN accounts_organization o ON o.id = t.organization_id
"""

# Prebuild creations and failures per preset name.
_CREATED_SQL = (
    """
SELECT o.name, t.name, p.name, COUNT(*), COUNT(*) FILTER (WHERE j.status = 'failed')
  FROM workspaces_workspacebuild b
  JOIN workspaces_provisionerjob j ON j.id = b.job_id
"""
    + _NAMES.format(preset="b.preset_id")
    + """
 WHERE b.initiator_id = %(system_user)s AND b.reason = 'prebuild' AND b.transition = 'start'
 GROUP BY o.name, t.name, p.name
"""
)

# Claimed workspaces by the preset of their first build (the prebuild build).
_CLAIMED_SQL = (
    """
SELECT o.name, t.name, p.name, COUNT(*)
  FROM workspaces_workspace w
  JOIN workspaces_workspacebuild b ON b.workspace_id = w.id AND b.build_number = 1
"""
    + _NAMES.format(preset="b.preset_id")
    + """
 WHERE w.claimed_at IS NOT NULL
 GROUP BY o.name, t.name, p.name
"""
)

CLAIM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Claim misses by reason and claim-to-ready durations per preset name (from PrebuildClaim
# rows), one row per preset and miss reason ('' for the claims).
_CLAIMS_SQL = (
    """
SELECT o.name, t.name, p.name, c.miss_reason,
       COUNT(*) FILTER (WHERE NOT c.claimed),
       COUNT(c.ready_at),
       COALESCE(SUM(EXTRACT(EPOCH FROM c.ready_at - c.requested_at)), 0),
"""
    + ",\n".join(
        f"       COUNT(*) FILTER (WHERE EXTRACT(EPOCH FROM c.ready_at - c.requested_at) <= {b!r})"
        for b in CLAIM_BUCKETS
    )
    + """
  FROM prebuilds_prebuildclaim c
"""
    + _NAMES.format(preset="c.preset_id")
    + """
 GROUP BY o.name, t.name, p.name, c.miss_reason
"""
)

# Names and status of the presets of the latest pass, plus every hard-limited preset.
_PRESETS_SQL = """
SELECT p.id, o.name, t.name, p.name, p.prebuild_status
  FROM workspaces_templateversionpreset p
  JOIN workspaces_templateversion v ON v.id = p.template_version_id
  JOIN workspaces_template t ON t.id = v.template_id
  JOIN accounts_organization o ON o.id = t.organization_id
 WHERE p.id = ANY(%(ids)s::uuid[]) OR p.prebuild_status = %(hard_limited)s
"""


# The gauges read from a pass's `preset_counts`, in its order.
POOL_GAUGES = ("desired", "running", "eligible", "unhealthy")


def _rows(sql: str, params: dict[str, Any]) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _sum_by_labels(rows: Iterable[tuple[Labels, float]]) -> dict[Labels, float]:
    totals: dict[Labels, float] = defaultdict(float)
    for labels, value in rows:
        totals[labels] += value
    return totals


class PrebuildsCollector(Collector):
    """Reads the prebuild metrics from the database on every `collect` (seven queries).

    Each metric is followed by its Coder twin (`coder_alias`), built from the same rows.
    """

    def collect(self) -> Iterator[Metric]:
        for metric in self._ours():
            yield metric
            alias = coder_alias(metric)
            if alias is not None:
                yield alias

    def _ours(self) -> Iterator[Metric]:
        yield from self._history()
        yield from self._pool()
        paused = GaugeMetricFamily(
            "prebuilds_reconciliation_paused", "1 when the reconciler is paused by an operator."
        )
        paused.add_metric([], 1.0 if reconciliation_paused() else 0.0)
        yield paused
        yield from self._passes()

    def _history(self) -> Iterator[Metric]:
        params = {"system_user": SYSTEM_USER_ID}
        created_rows = _rows(_CREATED_SQL, params)
        created = CounterMetricFamily(
            "prebuilt_workspaces_created", "Prebuilt workspaces created.", labels=LABELS
        )
        failed = CounterMetricFamily(
            "prebuilt_workspaces_failed", "Prebuilt workspaces that failed to build.", labels=LABELS
        )
        for labels, value in _sum_by_labels((tuple(r[:3]), r[3]) for r in created_rows).items():
            created.add_metric(labels, value)
        for labels, value in _sum_by_labels((tuple(r[:3]), r[4]) for r in created_rows).items():
            failed.add_metric(labels, value)
        claimed = CounterMetricFamily(
            "prebuilt_workspaces_claimed", "Prebuilt workspaces claimed by users.", labels=LABELS
        )
        claimed_rows = _rows(_CLAIMED_SQL, {})
        for labels, value in _sum_by_labels((tuple(r[:3]), r[3]) for r in claimed_rows).items():
            claimed.add_metric(labels, value)
        yield from (created, failed, claimed)
        yield from self._claims()

    def _claims(self) -> Iterator[Metric]:
        """Misses by reason (``MissReason``: the user got a cold build, and why) and
        claim-to-ready durations."""
        misses = CounterMetricFamily(
            "prebuilt_workspaces_claim_misses",
            "Requests for a preset that found no eligible prebuild, by reason.",
            labels=(*LABELS, "reason"),
        )
        durations = HistogramMetricFamily(
            "prebuilt_workspace_claim_duration_seconds",
            "From the claim request to every agent ready for the new owner.",
            labels=LABELS,
        )
        missed_by: dict[tuple[str, ...], float] = defaultdict(float)
        histograms: dict[Labels, list[float]] = {}
        for organization, template, preset, reason, missed, *figures in _rows(_CLAIMS_SQL, {}):
            labels = (organization, template, preset)
            if missed:
                missed_by[(*labels, reason)] += missed
            totals = histograms.setdefault(labels, [0.0] * len(figures))
            for index, value in enumerate(figures):  # summed over presets of the same name
                totals[index] += float(value)
        # Every reason of every preset with claim requests, 0 when none yet: a series exists
        # before its first miss (so `increase` sees the first one, and hit-rate rules have a
        # miss series to add for presets that never missed).
        for labels in histograms:
            for reason in MissReason.values:
                if reason != MissReason.UNKNOWN:
                    missed_by.setdefault((*labels, reason), 0.0)
        for labels_reason, missed in sorted(missed_by.items()):
            misses.add_metric(list(labels_reason), missed)
        for labels, (count, total, *cumulative) in histograms.items():
            buckets = [(repr(b), v) for b, v in zip(CLAIM_BUCKETS, cumulative, strict=True)]
            buckets.append(("+Inf", count))
            durations.add_metric(list(labels), buckets, sum_value=total)
        yield from (misses, durations)

    def _pool(self) -> Iterator[Metric]:
        latest = (
            ReconciliationPass.objects.filter(lock_acquired=True)
            .order_by("-started_at")
            .values_list("preset_counts", flat=True)
            .first()
        ) or {}
        rows = _rows(
            _PRESETS_SQL, {"ids": list(latest), "hard_limited": PrebuildStatus.HARD_LIMITED}
        )
        families = {
            name: GaugeMetricFamily(f"prebuilt_workspaces_{name}", help_text, labels=LABELS)
            for name, help_text in (
                ("desired", "Prebuilt workspaces the pool wants (latest pass)."),
                ("running", "Running prebuilt workspaces (latest pass)."),
                ("eligible", "Prebuilt workspaces ready to be claimed (latest pass)."),
                (
                    "unhealthy",
                    "Running prebuilt workspaces whose agents are gone, being replaced "
                    "(latest pass).",
                ),
            )
        }
        values: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
        hard_limited: list[tuple[Labels, float]] = []
        for preset_id, *names, status in rows:
            labels = (names[0], names[1], names[2])
            counts = latest.get(str(preset_id))
            if counts is not None:
                # Passes before issue 12 recorded three counts; `unhealthy` is then 0.
                counts = [*counts, 0][:4]
                for name, value in zip(POOL_GAUGES, counts, strict=True):
                    values[name].append((labels, value))
            hard_limited.append((labels, 1.0 if status == PrebuildStatus.HARD_LIMITED else 0.0))
        for name, family in families.items():
            for labels, value in _sum_by_labels(values[name]).items():
                family.add_metric(labels, value)
            yield family
        limited = GaugeMetricFamily(
            "prebuilt_workspaces_preset_hard_limited",
            "1 when the preset hit the prebuild failure hard limit.",
            labels=LABELS,
        )
        # max, not sum: a name is hard-limited when any of its versions' presets is.
        merged: dict[Labels, float] = {}
        for labels, value in hard_limited:
            merged[labels] = max(merged.get(labels, 0.0), value)
        for labels, value in merged.items():
            limited.add_metric(labels, value)
        yield limited

    def _passes(self) -> Iterator[Metric]:
        totals = dict(
            _rows(
                "SELECT name, value FROM prebuilds_metrictotal WHERE name LIKE %(prefix)s "
                "UNION ALL SELECT 'last_pass', EXTRACT(EPOCH FROM MAX(started_at))::float8 "
                "FROM prebuilds_reconciliationpass WHERE lock_acquired",
                {"prefix": DURATION_METRIC + ":%"},
            )
        )
        last = GaugeMetricFamily(
            "prebuilds_reconciliation_last_pass_timestamp_seconds",
            "Unix time the newest reconciliation pass that held the lock started (0: none yet).",
        )
        last.add_metric([], float(totals.pop("last_pass") or 0))
        yield last
        buckets, count, total = _duration_histogram(totals)
        duration = HistogramMetricFamily(
            DURATION_METRIC, "Durations of the reconciliation passes that held the lock."
        )
        duration.add_metric([], [*buckets, ("+Inf", count)], sum_value=total)
        yield duration


def _duration_bound(seconds: float) -> str:
    """The smallest bucket bound ``seconds`` fits in (``+Inf`` past the largest)."""
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            return repr(bound)
    return "+Inf"


def pass_duration_observe(seconds: float) -> None:
    """Add one pass that held the lock to the duration histogram's totals (one statement).

    Buckets are stored *non-cumulative* (the count of passes whose smallest bound is ``le``),
    so one pass touches three rows: its bucket, ``count`` and ``sum``. Two passes recording at
    once (each after releasing the lock) upsert the same rows in the same (sorted) order, so
    they queue on the row locks and never deadlock.
    """
    rows = sorted(
        [
            (f"{DURATION_METRIC}:le={_duration_bound(seconds)}", 1.0),
            (f"{DURATION_METRIC}:count", 1.0),
            (f"{DURATION_METRIC}:sum", float(seconds)),
        ]
    )
    table = MetricTotal._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (name, value) VALUES (%s, %s), (%s, %s), (%s, %s) "
            f"ON CONFLICT (name) DO UPDATE SET value = {table}.value + EXCLUDED.value",
            [part for row in rows for part in row],
        )


def _duration_histogram(
    totals: dict[str, float],
) -> tuple[list[tuple[str, float]], float, float]:
    """Cumulative buckets (without ``+Inf``), count and sum from the stored totals."""
    per_bound: dict[float, float] = defaultdict(float)
    for name, value in totals.items():
        part = name.removeprefix(DURATION_METRIC + ":")
        if part.startswith("le="):
            per_bound[float(part.removeprefix("le="))] += value
    buckets = [
        (repr(bound), sum(v for b, v in per_bound.items() if b <= bound))
        for bound in DURATION_BUCKETS
    ]
    return (
        buckets,
        totals.get(f"{DURATION_METRIC}:count", 0.0),
        totals.get(f"{DURATION_METRIC}:sum", 0.0),
    )


# Our name -> Coder's (enterprise/coderd/prebuilds/metricscollector.go and its reconciler's
# metrics), for metrics that mean the same thing. Not aliased: `prebuilt_workspaces_unhealthy`
# and `prebuilt_workspaces_claim_misses` (Coder has none), and the claim duration (Coder's
# `coderd_prebuilt_workspace_claim_duration_seconds` times the claim's database work; ours
# runs to every agent ready for the new owner).
CODER_NAMES = {
    "prebuilt_workspaces_created": "coderd_prebuilt_workspaces_created",
    "prebuilt_workspaces_failed": "coderd_prebuilt_workspaces_failed",
    "prebuilt_workspaces_claimed": "coderd_prebuilt_workspaces_claimed",
    "prebuilt_workspaces_desired": "coderd_prebuilt_workspaces_desired",
    "prebuilt_workspaces_running": "coderd_prebuilt_workspaces_running",
    "prebuilt_workspaces_eligible": "coderd_prebuilt_workspaces_eligible",
    "prebuilt_workspaces_preset_hard_limited": "coderd_prebuilt_workspaces_preset_hard_limited",
    "prebuilds_reconciliation_paused": "coderd_prebuilt_workspaces_reconciliation_paused",
    DURATION_METRIC: "coderd_prebuilds_reconciliation_duration_seconds",
    # When the pool gauges were computed: Coder's "metrics last updated".
    "prebuilds_reconciliation_last_pass_timestamp_seconds": (
        "coderd_prebuilt_workspaces_metrics_last_updated"
    ),
}
CODER_LABELS = {
    "organization": "organization_name",
    "template": "template_name",
    "preset": "preset_name",
}


def coder_alias(metric: Metric) -> Metric | None:
    """The same figures under Coder's metric name and label names (None: no Coder twin)."""
    name = CODER_NAMES.get(metric.name)
    if name is None:
        return None
    alias = Metric(name, metric.documentation, metric.type, metric.unit)
    alias.samples = [
        sample._replace(
            name=name + sample.name.removeprefix(metric.name),
            labels={CODER_LABELS.get(k, k): v for k, v in sample.labels.items()},
        )
        for sample in metric.samples
    ]
    return alias


registry = CollectorRegistry(auto_describe=False)
registry.register(PrebuildsCollector())
# The answering process's HTTP and process metrics: a registry is itself a collector.
registry.register(http_metrics.registry)


def _authorized(request: HttpRequest) -> int | None:
    """None when the caller may scrape; else the HTTP status to answer (401 or 403).

    `METRICS_TOKEN` is read at each request, so rotating it needs no restart. A request that
    sends `Authorization` is judged by the token alone; without a configured token only staff
    sessions get in.
    """
    header = request.headers.get("Authorization")
    if header is not None:
        expected = os.environ.get("METRICS_TOKEN", "")
        presented = tokens.bearer(header)
        if expected and presented and hmac.compare_digest(presented, expected):
            return None
        return 401
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return 401
    return None if user.is_staff else 403


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition for staff sessions or `Authorization: Bearer $METRICS_TOKEN`."""
    status = _authorized(request)
    if status is not None:
        response = HttpResponse(
            "unauthorized\n" if status == 401 else "forbidden\n",
            status=status,
            content_type="text/plain",
        )
        if status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


# Included from config/urls.py at the root, so the path is exactly `/metrics`.
urlpatterns = [path("metrics", metrics_view, name="metrics")]
