"""Admin forms of presets and schedules: exactly as strict as a template file.

Time zones and crons go through the template file's own checks (``template_files``), instance
counts through ``pool_limits`` (per preset and the organization total), so an operator cannot
store in the admin a pool that ``push_template`` would refuse. Messages name the field.

Django's admin runs a change view in one transaction (``changeform_view`` is atomic), so the
organization lock ``pool_sizes_check`` takes while the forms are cleaned holds until the change
is saved: two operators editing pools of one organization take turns.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.forms.models import BaseInlineFormSet

from workspaces.models import PresetSchedule, TemplateVersionPreset
from workspaces.pool_limits import (
    PoolSize,
    PoolSizeError,
    instances_problem,
    pool_sizes_check,
    preset_pool_size,
)
from workspaces.template_files import cron_problem, schedule_overlaps, timezone_problem

TIMEZONE_REQUIRED = 'required when schedules are given (an IANA name, e.g. "UTC")'


def _organization_id(preset: TemplateVersionPreset) -> Any:
    return preset.template_version.template.organization_id


def _check(preset: TemplateVersionPreset, pool: PoolSize, total_field: str) -> None:
    """``pool_sizes_check`` for one stored preset, its refusal as a form error."""
    try:
        pool_sizes_check(
            organization_id=_organization_id(preset), pools=[pool], total_field=total_field
        )
    except PoolSizeError as exc:
        raise ValidationError(exc.messages) from None


class DesiredInstancesAdminForm(forms.ModelForm):
    """A preset's ``desired_instances``, bounded per preset and per organization."""

    def clean_desired_instances(self) -> int | None:
        value = self.cleaned_data.get("desired_instances")
        problem = instances_problem("desired_instances", value)
        if problem is not None:
            raise ValidationError(problem.message)
        return value


class PoolAdminForm(DesiredInstancesAdminForm):
    """The pool size alone (the prebuilds admin): the organization total is checked here,
    with the preset's stored schedules."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if "desired_instances" in cleaned and not self.errors:
            pool = preset_pool_size(
                self.instance,
                instances=cleaned["desired_instances"],
                instances_field="desired_instances",
            )
            try:
                _check(self.instance, pool, "desired_instances")
            except ValidationError as exc:
                self.add_error("desired_instances", exc)
        return cleaned


class PresetAdminForm(DesiredInstancesAdminForm):
    """Pool size and time zone of a preset; its schedules' formset checks the rest (it sees
    both this form's values and every schedule)."""

    def clean_scheduling_timezone(self) -> str:
        value = self.cleaned_data.get("scheduling_timezone") or ""
        problem = timezone_problem(value)
        if problem is not None:
            raise ValidationError(f"scheduling_timezone: {problem}")
        return value


class ScheduleForm(forms.ModelForm):
    """One schedule: a cron the reconciler accepts (DESIGN.md §4 rule 4) and a bounded count."""

    def clean_cron(self) -> str:
        value = self.cleaned_data.get("cron") or ""
        problem = cron_problem(value)
        if problem is not None:
            raise ValidationError(f"cron: {problem}")
        return value

    def clean_instances(self) -> int | None:
        value = self.cleaned_data.get("instances")
        problem = instances_problem("instances", value)
        if problem is not None:
            raise ValidationError(problem.message)
        return value


def _schedules_problems(crons: list[str], timezone: str) -> list[str]:
    """Overlaps between ``crons`` and a missing time zone, as the template file words them."""
    problems = [
        f"schedules[{later}].cron: {crons[later]!r} overlaps schedules[{earlier}] "
        f"({crons[earlier]!r}); schedules must not overlap"
        for later, earlier in schedule_overlaps(crons)
    ]
    if crons and not timezone:
        problems.append(f"scheduling_timezone: {TIMEZONE_REQUIRED}")
    return problems


class ScheduleFormSet(BaseInlineFormSet):
    """A preset's schedules in the preset's admin page: no overlaps, a time zone when there are
    any, and the pool (the preset's new size and every schedule) within the bounds."""

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return  # each row's own problems are shown on the row
        rows = [
            form.cleaned_data
            for form in self.forms
            if form.cleaned_data and not form.cleaned_data.get("DELETE")
        ]
        # The formset's instance carries the preset form's cleaned values (Django builds the
        # formsets on the same object), so the new time zone and size are seen here.
        preset = self.instance
        crons = [row["cron"] for row in rows]
        problems = _schedules_problems(crons, preset.scheduling_timezone)
        if problems:
            raise ValidationError(problems)
        pool = preset_pool_size(
            preset,
            instances=preset.desired_instances,
            instances_field="desired_instances",
            schedules={
                f"schedules[{index}].instances": row["instances"] for index, row in enumerate(rows)
            },
        )
        _check(preset, pool, "desired_instances")


class ScheduleAdminForm(ScheduleForm):
    """A schedule edited on its own: checked together with its preset's other schedules."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        preset = cleaned.get("preset")
        if preset is None or self.errors:
            return cleaned
        others = PresetSchedule.objects.filter(preset=preset).order_by("position")
        if self.instance.pk is not None:
            others = others.exclude(pk=self.instance.pk)
        schedules = [(cron, count) for cron, count in others.values_list("cron", "instances")]
        schedules.append((cleaned["cron"], cleaned["instances"]))
        problems = _schedules_problems([cron for cron, _ in schedules], preset.scheduling_timezone)
        if problems:
            raise ValidationError(problems)
        pool = preset_pool_size(
            preset,
            instances=preset.desired_instances,
            instances_field="desired_instances",
            schedules={
                f"schedules[{index}].instances": count for index, (_, count) in enumerate(schedules)
            },
        )
        _check(preset, pool, "instances")
        return cleaned


class TemplateAdminForm(forms.ModelForm):
    """A template's active version and flags. Switching the active version, or bringing a
    deleted template back, makes other presets count in the organization's total: checked."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors or not ({"active_version", "deleted"} & set(self.changed_data)):
            return cleaned
        version = cleaned.get("active_version")
        if version is None or cleaned.get("deleted"):
            return cleaned  # nothing of this template counts any more: the total only drops
        pools = []
        rows = version.presets.order_by("name").values_list("name", "desired_instances", "id")
        for name, instances, preset_id in rows:
            schedule_counts = PresetSchedule.objects.filter(preset_id=preset_id).order_by(
                "position"
            )
            pools.append(
                PoolSize(
                    instances=instances,
                    instances_field=f"active_version: preset {name!r}",
                    schedules=tuple(
                        (f"active_version: preset {name!r} schedule {position}", count)
                        for position, count in schedule_counts.values_list("position", "instances")
                    ),
                )
            )
        try:
            pool_sizes_check(
                organization_id=self.instance.organization_id,
                pools=pools,
                total_field="active_version",
                activates_template_id=self.instance.id,
            )
        except PoolSizeError as exc:
            self.add_error("active_version", exc.messages)
        return cleaned
