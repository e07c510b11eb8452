"""Bounds on prebuild pools: a maximum per preset and a total per organization.

Every entry point that sets how many prebuilds a preset keeps, or which presets count, calls
``pool_sizes_check``: the template push service (``push_template``), the admin's preset,
schedule, pool and template forms (``admin_forms``), and the service of the dashboard and the
JSON API (``prebuilds.services.preset_set_desired_instances``). A typo such as
``instances = 1000000000`` is refused with a message naming the field before anything is
written, instead of being turned into a billion workspaces by the next pass.

The two bounds (settings, read at call time):

- ``PREBUILDS_MAX_INSTANCES_PER_PRESET``: no single count a preset declares (its ``instances``,
  each schedule's ``instances`` and, for a pool sized by a goal, its ``max_instances``) may
  exceed it.
- ``PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION``: the organization total, defined in
  ``organization_pool_peaks``, may not be raised above it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db.models import F, Max

from accounts.models import Organization
from workspaces.models import TemplateVersionPreset

PER_PRESET_SETTING = "PREBUILDS_MAX_INSTANCES_PER_PRESET"
PER_ORGANIZATION_SETTING = "PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION"


@dataclass(frozen=True)
class PoolSize:
    """One preset's pool as an entry point would leave it, with that entry point's field names.

    ``instances_field`` and the first item of each ``schedules`` pair are what the caller calls
    those fields (``presets[0].prebuilds.instances`` in a template file, ``desired_instances``
    in the admin), so every message names the field the way its author sees it.
    """

    instances: int | None
    instances_field: str
    schedules: tuple[tuple[str, int], ...] = ()  # (field, instances) per schedule
    preset_id: UUID | None = None  # the stored preset this changes; None: a preset to come
    # A pool sized by a goal (prebuilds.sizing) may grow up to max_instances. An empty field
    # name: the bound is the stored one, unchanged by this entry point (counted in the peak,
    # not checked against the per-preset maximum, since this entry point cannot edit it).
    max_instances: int | None = None
    max_instances_field: str = "max_instances"

    @property
    def peak(self) -> int:
        """The most prebuilds this pool can ask for at any moment."""
        return max(
            [self.instances or 0, self.max_instances or 0, *(count for _, count in self.schedules)]
        )


@dataclass(frozen=True)
class Problem:
    field: str
    message: str  # starts with the field: it reads on its own


class PoolSizeError(ValueError):
    """Refused pool sizes; ``problems`` lists every one, each naming its field."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problem.message for problem in self.problems))

    @property
    def messages(self) -> list[str]:
        return [problem.message for problem in self.problems]


def instances_problem(field: str, value: Any) -> Problem | None:
    """Why ``value`` cannot be one preset's instance count, or None when it can (None: none)."""
    if value is None:
        return None
    maximum = settings.PREBUILDS_MAX_INSTANCES_PER_PRESET
    if value > maximum:
        return Problem(
            field, f"{field}: {value} is above the maximum of {maximum} ({PER_PRESET_SETTING})"
        )
    return None


def organization_pool_peaks(*, organization_id: UUID) -> dict[UUID, tuple[UUID, int]]:
    """``{preset id: (template id, peak)}`` of the presets counted in the organization's total.

    The organization total is the sum, over every preset on the **active version** of each
    **non-deleted** template of the organization (deprecated ones included: un-deprecating
    needs no check then), of the preset's peak: the largest of its ``desired_instances``
    (None counts as 0), its schedules' ``instances`` and its ``max_instances`` (a pool sized
    by a goal grows up to it; counted whether or not a target is set, since a stored bound
    is what an operator can switch on). That is the most prebuilds the
    organization's pools can ask for at one moment, whatever the clock says. One query.
    """
    rows = (
        TemplateVersionPreset.objects.filter(
            template_version__template__organization_id=organization_id,
            template_version__template__deleted=False,
            template_version__template__active_version=F("template_version"),
        )
        .annotate(schedule_peak=Max("schedules__instances"))
        .values_list(
            "id",
            "template_version__template_id",
            "desired_instances",
            "schedule_peak",
            "max_instances",
        )
    )
    return {
        preset_id: (template_id, max(desired or 0, schedule_peak or 0, maximum or 0))
        for preset_id, template_id, desired, schedule_peak, maximum in rows
    }


def pool_sizes_lock(*, organization_id: UUID) -> None:
    """Lock the organization's pool sizes until the current transaction ends.

    ``pool_sizes_check`` takes it; a writer that locks other rows first (the template push
    locks its template) takes it before them, so every writer locks in the same order
    (organization, then template or preset) and two of them cannot deadlock.
    """
    # Outside a transaction Django refuses select_for_update: the lock would end at once.
    list(
        Organization.objects.select_for_update(no_key=True)
        .filter(id=organization_id)
        .values_list("id", flat=True)
    )


def pool_sizes_check(
    *,
    organization_id: UUID,
    pools: Sequence[PoolSize],
    total_field: str,
    activates_template_id: UUID | None = None,
) -> None:
    """Raise ``PoolSizeError`` (every problem, each naming its field) unless ``pools`` fit.

    Call it inside the transaction that writes the pools. Guarantees:

    - Per preset: every count in ``pools`` is at most ``PREBUILDS_MAX_INSTANCES_PER_PRESET``
      (strict, so after lowering the setting a preset above it must come down when edited).
    - Per organization: the total of ``organization_pool_peaks`` after the change is at most
      ``PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION``, or not higher than before the change (so an
      operator who lowered the setting can always shrink pools). "After the change": with
      ``activates_template_id`` the pools become that template's active presets and replace
      whatever of it counts now (a template push that activates, an active version switched in
      the admin); without it, a pool with the ``preset_id`` of a counted preset replaces that
      preset's peak, and any other pool does not count (a preset of an inactive version).
    - Race: two writers each under the limit could together exceed it. The organization row is
      locked (``FOR NO KEY UPDATE``: it does not block inserts of rows referring to the
      organization, such as claims' builds) until the caller's transaction ends, so writers of
      pool sizes in one organization take turns and each sees the others' committed sizes.
    """
    problems = [
        problem
        for pool in pools
        for problem in (
            instances_problem(pool.instances_field, pool.instances),
            instances_problem(pool.max_instances_field, pool.max_instances)
            if pool.max_instances_field
            else None,
            *(instances_problem(field, count) for field, count in pool.schedules),
        )
        if problem is not None
    ]
    if problems:
        raise PoolSizeError(problems)
    pool_sizes_lock(organization_id=organization_id)
    current = organization_pool_peaks(organization_id=organization_id)
    before = sum(peak for _, peak in current.values())
    after_peaks: dict[Any, int] = {
        preset_id: peak
        for preset_id, (template_id, peak) in current.items()
        if activates_template_id is None or template_id != activates_template_id
    }
    for index, pool in enumerate(pools):
        if activates_template_id is not None:
            after_peaks[("new", index)] = pool.peak
        elif pool.preset_id in after_peaks:
            after_peaks[pool.preset_id] = pool.peak
    after = sum(after_peaks.values())
    maximum = settings.PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION
    if after > maximum and after > before:
        raise PoolSizeError(
            [
                Problem(
                    total_field,
                    f"{total_field}: the organization's prebuilt instances would total {after} "
                    f"(now {before}), above the maximum of {maximum} "
                    f"({PER_ORGANIZATION_SETTING})",
                )
            ]
        )


def preset_pool_size(
    preset: TemplateVersionPreset,
    *,
    instances: int | None,
    instances_field: str,
    schedules: Mapping[str, int] | None = None,
) -> PoolSize:
    """The pool of a stored preset with ``instances`` changed; its stored schedules unless
    ``schedules`` (``{field: instances}``) replaces them (named ``schedules[i].instances``)."""
    if schedules is None:
        stored = preset.schedules.order_by("position").values_list("instances", flat=True)
        schedules = {f"schedules[{i}].instances": count for i, count in enumerate(stored)}
    return PoolSize(
        instances=instances,
        instances_field=instances_field,
        schedules=tuple(schedules.items()),
        preset_id=preset.id,
        # The stored bound of a goal-sized pool still counts towards its peak.
        max_instances=preset.max_instances,
        max_instances_field="",
    )
