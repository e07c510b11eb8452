"""The inputs of a backtest (`simulate_prebuilds`): demand and build durations, from the database
or from files, checked with messages that name the option at fault.

The replay itself is `prebuilds.simulation` (pure). Demand read from the database is the
preset's claim requests (`PrebuildClaim`, hits and misses) across its template's versions by
preset name, as the reconciler's sizing reads it (`prebuilds.selectors`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from prebuilds.models import PrebuildClaim
from prebuilds.reconciliation import PrebuildSchedule
from prebuilds.selectors import recent_prebuild_build_seconds
from prebuilds.simulation import Policy, PolicyReport, parse_policy, simulate
from workspaces.models import TemplateVersionPreset
from workspaces.selectors import parse_uuid


class BacktestError(ValueError):
    """Bad input; the message starts with the option it concerns (``--demand: line 3: ...``)."""


@dataclass(frozen=True)
class Backtest:
    """A replay ready to run: requests (history included), build durations and the window."""

    preset: str
    requests: tuple[datetime, ...]
    build_seconds: tuple[float, ...]
    start: datetime
    end: datetime
    policies: tuple[Policy, ...]
    interval: float

    def run(self, seed: int) -> list[PolicyReport]:
        return [
            simulate(
                policy=policy,
                requests=self.requests,
                build_seconds=self.build_seconds,
                start=self.start,
                end=self.end,
                interval=self.interval,
                seed=seed,
                lookback=timedelta(days=settings.PREBUILDS_SIZING_LOOKBACK_DAYS),
                max_in_flight=settings.PREBUILDS_MAX_IN_FLIGHT,
                max_in_flight_per_preset=settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET,
            )
            for policy in self.policies
        ]

    def scored_requests(self) -> int:
        return sum(1 for at in self.requests if self.start <= at < self.end)


def backtest_prepare(
    *,
    preset_id: str | None,
    days: float,
    demand_path: str | None,
    build_seconds_path: str | None,
    policies: Sequence[str],
    interval: float | None = None,
    now: datetime | None = None,
) -> Backtest:
    """Check and load everything a backtest needs; `BacktestError` naming the option otherwise.

    The window is the last `days` days: up to `now` for recorded demand, up to the end of the
    last request's hour for a demand file. Earlier requests (within the sizing look-back) are
    the history the `target` policy sizes from.
    """
    if not math.isfinite(days) or days <= 0:
        raise BacktestError(f"--days: must be a positive number of days (got {days:g})")
    preset = _preset(preset_id) if preset_id is not None else None
    if preset is None and demand_path is None:
        raise BacktestError("--preset: give a preset id, or a demand file with --demand FILE")
    lookback = timedelta(days=settings.PREBUILDS_SIZING_LOOKBACK_DAYS)
    if demand_path is not None:
        label, requests = _demand_file(demand_path, preset_id, preset)
        last = max(requests)
        end = last.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    else:
        assert preset is not None
        end = now or timezone.now()
        label = preset.name
        requests = _recorded_requests(preset, since=end - timedelta(days=days) - lookback)
    if build_seconds_path is not None:
        build_seconds = _build_seconds_file(build_seconds_path)
    else:
        build_seconds = (
            recent_prebuild_build_seconds(preset__in=_same_presets(preset))
            if preset is not None
            else []
        )
        if not build_seconds:
            raise BacktestError(
                "--build-seconds-file: no recorded prebuild build durations"
                + (f" for preset {preset.name!r}" if preset else " without --preset")
                + "; give a file with one duration in seconds a line"
            )
    parsed = tuple(_policy(text, preset) for text in (policies or _default_policies(preset)))
    return Backtest(
        preset=label,
        requests=tuple(sorted(requests)),
        build_seconds=tuple(build_seconds),
        start=end - timedelta(days=days),
        end=end,
        policies=parsed,
        interval=interval or settings.PREBUILDS_RECONCILIATION_INTERVAL,
    )


def _preset(preset_id: str) -> TemplateVersionPreset:
    parsed = parse_uuid(preset_id)
    preset = (
        TemplateVersionPreset.objects.filter(id=parsed).prefetch_related("schedules").first()
        if parsed is not None
        else None
    )
    if preset is None:
        raise BacktestError(f"--preset: no preset with id {preset_id!r}")
    return preset


def _default_policies(preset: TemplateVersionPreset | None) -> list[str]:
    if preset is None:
        return ["target:0.95"]
    policies = [f"fixed:{preset.desired_instances or 0}"]
    if preset.schedules.all():
        policies.append("schedule")
    policies.append(f"target:{preset.target_hit_rate or 0.95:g}")
    return policies


def _policy(text: str, preset: TemplateVersionPreset | None) -> Policy:
    try:
        policy = parse_policy(text)
    except ValueError as exc:
        raise BacktestError(f"--policy: {exc}") from None
    if policy.kind == "fixed":
        return policy
    if policy.kind == "schedule" and preset is None:
        raise BacktestError("--policy: schedule needs --preset (the preset's schedule is used)")
    if preset is None:  # a target for a demand file: no bounds but the per-preset maximum
        return replace(policy, max_instances=settings.PREBUILDS_MAX_INSTANCES_PER_PRESET)
    schedules = tuple(
        PrebuildSchedule(cron=s.cron, instances=s.instances)
        for s in sorted(preset.schedules.all(), key=lambda s: s.position)
    )
    return replace(
        policy,
        instances=preset.desired_instances or 0,
        timezone=preset.scheduling_timezone,
        schedules=schedules,
        min_instances=preset.min_instances if policy.kind == "target" else 0,
        max_instances=(
            preset.max_instances or settings.PREBUILDS_MAX_INSTANCES_PER_PRESET
            if policy.kind == "target"
            else None
        ),
    )


def _same_presets(preset: TemplateVersionPreset):
    """The preset and its namesakes on the template's other versions (one demand)."""
    return TemplateVersionPreset.objects.filter(
        template_version__template_id=preset.template_version.template_id, name=preset.name
    )


def _recorded_requests(preset: TemplateVersionPreset, *, since: datetime) -> list[datetime]:
    return list(
        PrebuildClaim.objects.filter(
            preset__in=_same_presets(preset), requested_at__gte=since
        ).values_list("requested_at", flat=True)
    )


def _demand_file(
    path: str, preset_id: str | None, preset: TemplateVersionPreset | None
) -> tuple[str, list[datetime]]:
    """(preset label, request times) from the CSV of DESIGN.md section 8."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BacktestError(f"--demand: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BacktestError(f"--demand: {path} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [column for column in ("requested_at", "preset") if column not in header]
    if missing:
        raise BacktestError(
            f"--demand: the header must name the columns requested_at and preset "
            f"(missing: {', '.join(missing)})"
        )
    wanted = {preset_id} if preset_id else set()
    if preset is not None:
        wanted |= {str(preset.id), preset.name}
    by_preset: dict[str, list[datetime]] = {}
    try:
        for row in reader:
            line = reader.line_num
            key = (row.get("preset") or "").strip()
            if not key:
                raise BacktestError(f"--demand: line {line}: preset is empty")
            if wanted and key not in wanted:
                continue
            by_preset.setdefault(key, []).append(_instant(row.get("requested_at"), line))
    except csv.Error as exc:
        raise BacktestError(f"--demand: line {reader.line_num}: {exc}") from None
    if not by_preset:
        which = f" for preset {preset_id!r}" if preset_id else ""
        raise BacktestError(f"--demand: no requests{which} in {path}")
    if len(by_preset) > 1 and not wanted:
        names = ", ".join(sorted(by_preset)[:5])
        raise BacktestError(f"--preset: the demand file has several presets ({names}); choose one")
    label = preset.name if preset is not None else next(iter(by_preset))
    return label, [at for times in by_preset.values() for at in times]


def _instant(text: str | None, line: int) -> datetime:
    try:
        value = datetime.fromisoformat((text or "").strip())
    except ValueError:
        raise BacktestError(
            f"--demand: line {line}: requested_at must be ISO 8601 with an offset (got {text!r})"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise BacktestError(
            f"--demand: line {line}: requested_at needs an offset, e.g. 2026-11-30T09:00:00+00:00 "
            f"(got {text!r})"
        )
    return value


def _build_seconds_file(path: str) -> list[float]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BacktestError(f"--build-seconds-file: cannot read {path}: {exc}") from None
    values = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = float(line)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise BacktestError(
                f"--build-seconds-file: line {number}: must be a positive number of seconds "
                f"(got {line.strip()!r})"
            )
        values.append(value)
    if not values:
        raise BacktestError(f"--build-seconds-file: no durations in {path}")
    return values
