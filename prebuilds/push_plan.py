"""What pushing a template file would do to its pools, computed without changing anything.

``push_template PATH --plan`` (DESIGN.md §8). The plan runs the real push
(``template_push``: the same validation and pool limits, so an over-limit file is refused the
same way) inside a transaction that is always rolled back, reads the reconciler's own snapshot
of the old and new presets in that transaction, and asks the pure core (``calculate_actions``)
what the next pass would do: the old version's presets are inactive, so their prebuilds are
deleted and their pending builds canceled; the new version's presets start empty, so they
create up to their desired size. Nothing is committed and nothing is queued (``on_commit``
hooks of a rolled-back transaction never run).

The cold-build window is an estimate: how long a preset's users get cold builds after the
push = the time until the new pool's first prebuild is ready, and the pool is full after as
many build "waves" as the in-flight caps (``prebuilds.pacing``) need, each taking the p90 of
the template's recent prebuild build durations. It assumes the workers are otherwise idle
(builds of other templates in flight would only delay it) and ignores backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import Organization
from prebuilds.pacing import Demand, allowed_creations
from prebuilds.reconciliation import ActionType, calculate_actions
from prebuilds.selectors import recent_prebuild_build_seconds, reconciliation_snapshot
from prebuilds.services import preset_invalidate
from prebuilds.sizing import percentile
from workspaces.models import Template, TemplateVersionPreset
from workspaces.template_files import TemplateSpec
from workspaces.template_services import template_push

BUILD_PERCENTILE = 90


@dataclass(frozen=True)
class PoolPlan:
    """One pool (a preset name) across the push: what the next passes would do to it."""

    preset: str
    deleted: int  # running prebuilds of the current version's preset deleted
    canceled: int  # pending first builds of the current version's preset canceled
    created: int  # prebuilds of the new version's preset created (its desired size)
    first_ready_seconds: float | None  # cold builds until then; None: unknown or no pool
    full_seconds: float | None  # the new pool is full after this; None: unknown or no pool

    def as_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "deleted": self.deleted,
            "canceled": self.canceled,
            "created": self.created,
            "cold_window_seconds": self.first_ready_seconds,
            "full_seconds": self.full_seconds,
        }


@dataclass(frozen=True)
class PushPlan:
    template: str
    new_template: bool  # no live template of that name yet
    current_version: str | None  # the active version now (None: none)
    new_version: str  # the name the push would give the version
    activates: bool
    paused: bool  # reconciliation is paused: nothing happens until it resumes
    build_p90_seconds: float | None  # None: no recorded prebuild builds of the template
    build_samples: int
    pools: tuple[PoolPlan, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "new_template": self.new_template,
            "current_version": self.current_version,
            "new_version": self.new_version,
            "activates": self.activates,
            "paused": self.paused,
            "build_p90_seconds": self.build_p90_seconds,
            "build_samples": self.build_samples,
            "pools": [pool.as_json() for pool in self.pools],
        }


class _Rollback(Exception):
    pass


def template_push_plan(
    *, organization: Organization, spec: TemplateSpec, source: str, activate: bool = True
) -> PushPlan:
    """The plan of ``template_push`` with the same arguments; writes nothing.

    Guarantees: raises exactly what ``template_push`` would (``PoolSizeError``), and every
    row the push wrote is rolled back before this returns or raises. While it runs it holds
    the same locks as a push (the organization row, the template row), briefly.
    """
    now = timezone.now()
    result: PushPlan | None = None
    try:
        with transaction.atomic():
            template = (
                Template.objects.filter(organization=organization, name=spec.name, deleted=False)
                .select_related("active_version")
                .first()
            )
            current = template.active_version if template is not None else None
            version = template_push(
                organization=organization, spec=spec, source=source, activate=activate
            )
            samples = recent_prebuild_build_seconds(workspace__template_id=version.template_id)
            p90 = percentile(samples, BUILD_PERCENTILE) if samples else None
            pools: tuple[PoolPlan, ...] = ()
            paused = False
            if activate:
                old_ids = list(current.presets.values_list("id", flat=True)) if current else []
                new_ids = list(version.presets.values_list("id", flat=True))
                snapshot = reconciliation_snapshot(now=now, preset_ids=old_ids + new_ids)
                paused = snapshot.paused
                pools = _pools(snapshot, set(new_ids), p90)
            result = PushPlan(
                template=spec.name,
                new_template=template is None,
                current_version=current.name if current else None,
                new_version=version.name,
                activates=activate,
                paused=paused,
                build_p90_seconds=p90,
                build_samples=len(samples),
                pools=pools,
            )
            raise _Rollback
    except _Rollback:
        pass
    assert result is not None
    return result


def preset_invalidate_plan(*, preset: TemplateVersionPreset) -> tuple[PoolPlan | None, int]:
    """What invalidating ``preset`` (``prebuilds.services.preset_invalidate``) would do, and the
    number of recorded build durations behind its times; writes nothing.

    Runs the real invalidation and the reconciler's snapshot and core in a transaction it
    rolls back: every current prebuild becomes expired, so the next pass deletes it and
    creates its replacement. None when the pass would do nothing (an inactive preset, or no
    prebuilds and none desired).
    """
    now = timezone.now()
    result: tuple[PoolPlan | None, int] | None = None
    try:
        with transaction.atomic():
            preset_invalidate(preset=preset)
            samples = recent_prebuild_build_seconds(
                workspace__template_id=preset.template_version.template_id
            )
            p90 = percentile(samples, BUILD_PERCENTILE) if samples else None
            snapshot = reconciliation_snapshot(now=now, preset_ids=[preset.id])
            pools = _pools(snapshot, {preset.id}, p90)
            result = (pools[0] if pools else None, len(samples))
            raise _Rollback
    except _Rollback:
        pass
    assert result is not None
    return result


def _pools(snapshot, new_ids: set, p90: float | None) -> tuple[PoolPlan, ...]:
    deleted: dict[str, int] = {}
    canceled: dict[str, int] = {}
    created: dict[str, int] = {}
    for entry in snapshot.presets:
        actions = calculate_actions(
            entry.snapshot, snapshot.now, settings.PREBUILDS_BACKOFF_INTERVAL
        )
        for action in actions:
            if action.type is ActionType.DELETE:
                deleted[entry.name] = deleted.get(entry.name, 0) + len(action.delete_ids)
            elif action.type is ActionType.CANCEL_PENDING:
                canceled[entry.name] = canceled.get(entry.name, 0) + action.cancel_count
            elif action.type is ActionType.CREATE and entry.id in new_ids:
                created[entry.name] = created.get(entry.name, 0) + action.create
    waves = fill_waves(created)
    names = sorted(set(deleted) | set(canceled) | set(created))
    return tuple(
        PoolPlan(
            preset=name,
            deleted=deleted.get(name, 0),
            canceled=canceled.get(name, 0),
            created=created.get(name, 0),
            first_ready_seconds=(
                (waves[name][0] * p90) if p90 is not None and name in waves else None
            ),
            full_seconds=(waves[name][1] * p90) if p90 is not None and name in waves else None,
        )
        for name in names
    )


def fill_waves(wanted: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``{pool: (wave of its first build, wave of its last build)}``, waves counted from 1.

    Empty pools filling at once under the in-flight caps, as the reconciler paces them
    (``prebuilds.pacing.allowed_creations``): each wave the caps allow some builds, and the
    next wave starts when they finish. Pools wanting nothing are left out.
    """
    supply = dict.fromkeys(wanted, 0)
    result: dict[str, list[int]] = {}
    wave = 0
    while any(supply[name] < want for name, want in wanted.items()):
        wave += 1
        allowed = allowed_creations(
            [
                Demand(key=name, want=want - supply[name], in_flight=0, supply=supply[name])
                for name, want in wanted.items()
            ],
            in_flight_total=0,
            limit=settings.PREBUILDS_MAX_IN_FLIGHT,
            per_preset_limit=settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET,
        )
        for name, count in allowed.items():
            if count > 0:
                supply[name] += count
                result.setdefault(name, [wave, wave])[1] = wave
        if not any(allowed.values()):  # cannot happen with a cap > 0; never loop forever
            break
    return {name: (first, last) for name, (first, last) in result.items()}


def format_duration(seconds: float) -> str:
    """``45 s``, ``4.8 min``, ``2.5 h``: what a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(plan: PushPlan) -> list[str]:
    """The human-readable plan, one line each."""
    current = plan.current_version or "none (new template)"
    head = f"template {plan.template}: {current} -> {plan.new_version}"
    if not plan.activates:
        return [
            head + " (not activated)",
            "no pool changes: --no-activate keeps the active version",
        ]
    lines = [head]
    if plan.paused:
        lines.append("reconciliation is paused: nothing happens until it is resumed")
    if plan.build_p90_seconds is None:
        lines.append("prebuild build time: unknown (no recorded builds)")
    else:
        lines.append(
            f"prebuild build time: p{BUILD_PERCENTILE} {format_duration(plan.build_p90_seconds)}"
            f" over {plan.build_samples} recent builds"
        )
    if not plan.pools:
        lines.append("no pools change")
    lines.extend(f"  {pool.preset}: {pool_line(pool)}" for pool in plan.pools)
    return lines


def pool_line(pool: PoolPlan) -> str:
    """``delete 2, create 2; cold builds for ~5.0 min, full after ~5.0 min``."""
    parts = [f"delete {pool.deleted}"]
    if pool.canceled:
        parts.append(f"cancel {pool.canceled} pending")
    parts.append(f"create {pool.created}")
    if pool.created == 0:
        window = "no new prebuilds"
    elif pool.first_ready_seconds is None or pool.full_seconds is None:
        window = "cold builds: unknown (no recorded builds)"
    else:
        window = (
            f"cold builds for ~{format_duration(pool.first_ready_seconds)},"
            f" full after ~{format_duration(pool.full_seconds)}"
        )
    return f"{', '.join(parts)}; {window}"
