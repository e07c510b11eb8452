"""Writes for templates: push a validated template file as a new version."""

from __future__ import annotations

from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Max

from accounts.models import Organization, User
from workspaces.models import (
    PresetSchedule,
    Template,
    TemplateVersion,
    TemplateVersionPreset,
)
from workspaces.pool_limits import PoolSize, pool_sizes_check, pool_sizes_lock
from workspaces.template_files import TemplateSpec

# The partial unique index on (organization, name) among live templates (workspaces/models.py).
TEMPLATE_NAME_CONSTRAINT = "template_name_unique_live"

# How often a push retries after losing the race to create a template. Losing twice in a row
# would take a concurrent create *and* delete of the same name in between; give up then.
_CREATE_ATTEMPTS = 3


def template_push(
    *,
    organization: Organization,
    spec: TemplateSpec,
    source: str,
    created_by: User | None = None,
    activate: bool = True,
) -> TemplateVersion:
    """Store ``spec`` as the next version of the live template of that name, creating it first.

    Guarantees:

    - All or nothing: the template (if new), the version, its presets and their schedules, the
      display name and the active version are written in one transaction.
    - Version numbers per template are gapless and unique even under concurrent pushes of the
      same template: the template row is locked (``SELECT … FOR UPDATE``) before the next
      number is read, and the unique constraint on (template, number) backs that up.
    - Two concurrent first pushes of a new name produce one template: the loser of the race
      to insert hits the partial unique index, rolls back to a savepoint and locks the
      winner's row instead.
    - The version is named ``v<number>``; ``source`` (the file text) is stored on it, so every
      version can be traced back to the file it came from. The version is immutable after this.
    - With ``activate`` the new version becomes the active one; without it the active version
      is left as it was (a new template then has none until one is activated).
    - Presets carry the preset parameters as given, ``desired_instances`` from
      ``prebuilds.instances`` (None without prebuilds), ``invalidate_after`` from
      ``ttl_seconds`` (None when absent or 0: both mean "never expires") and the schedules in
      file order (``position`` 0, 1, …), so the reconciler's first-match rule follows the file.

    - Bounded: the presets' instance counts are checked by ``pool_limits.pool_sizes_check``
      (per preset, and the organization total when the version is activated) before anything
      is written; a refusal raises ``PoolSizeError`` naming the fields
      (``presets[0].prebuilds.instances``) and writes nothing.

    ``spec`` must come from ``workspaces.template_files`` (already validated); nothing else is
    re-validated here.
    """
    with transaction.atomic():
        # The organization before the template: the lock order of every pool-size writer.
        pool_sizes_lock(organization_id=organization.id)
        template = _template_lock_or_create(organization=organization, name=spec.name)
        pool_sizes_check(
            organization_id=organization.id,
            pools=_pool_sizes(spec),
            total_field="presets",
            activates_template_id=template.id if activate else None,
        )
        latest = template.versions.aggregate(latest=Max("number"))["latest"] or 0
        number = latest + 1
        provisioner_config = (
            {"command": list(spec.command)} if spec.provisioner == "command" else {}
        )
        version = TemplateVersion.objects.create(
            template=template,
            number=number,
            name=f"v{number}",
            provisioner=spec.provisioner,
            provisioner_config=provisioner_config,
            parameters=[
                {"name": p.name, "default": p.default, "description": p.description}
                for p in spec.parameters
            ],
            agents=[{"name": a.name, "startup_script": a.startup_script} for a in spec.agents],
            source=source,
            created_by=created_by,
        )
        _presets_create(version=version, spec=spec)

        template.display_name = spec.display_name
        update_fields = ["display_name", "updated_at"]
        if activate:
            template.active_version = version
            update_fields.append("active_version")
        template.save(update_fields=update_fields)
    return version


def _template_lock_or_create(*, organization: Organization, name: str) -> Template:
    """The live template ``name`` of ``organization``, locked for this transaction.

    Race: two pushes of a name that does not exist yet both find nothing to lock and both
    insert. The partial unique index makes the second insert wait for the first transaction
    and then fail; that insert ran in a savepoint, so we roll back to it and, under READ
    COMMITTED, the next ``SELECT … FOR UPDATE`` sees and locks the committed winner.
    """
    for _ in range(_CREATE_ATTEMPTS):
        template = (
            Template.objects.select_for_update()
            .filter(organization=organization, name=name, deleted=False)
            .first()
        )
        if template is not None:
            return template
        try:
            with transaction.atomic():
                # A row we insert stays invisible (and so unlockable) to others until we
                # commit, which serialises later pushes behind this one just like the lock.
                return Template.objects.create(organization=organization, name=name)
        except IntegrityError as exc:
            if _constraint_name(exc) != TEMPLATE_NAME_CONSTRAINT:
                raise
    raise RuntimeError(
        f"template {name!r}: could not lock or create it after {_CREATE_ATTEMPTS} attempts"
    )


def _constraint_name(exc: IntegrityError) -> str | None:
    diag = getattr(exc.__cause__, "diag", None)
    return getattr(diag, "constraint_name", None)


def _pool_sizes(spec: TemplateSpec) -> list[PoolSize]:
    """The presets' pools, their fields named as in the file."""
    pools = []
    for index, preset in enumerate(spec.presets):
        if preset.prebuilds is None:
            continue
        path = f"presets[{index}].prebuilds"
        pools.append(
            PoolSize(
                instances=preset.prebuilds.instances,
                instances_field=f"{path}.instances",
                max_instances=preset.prebuilds.max_instances,
                max_instances_field=f"{path}.max_instances",
                schedules=tuple(
                    (f"{path}.schedule[{position}].instances", schedule.instances)
                    for position, schedule in enumerate(preset.prebuilds.schedules)
                ),
            )
        )
    return pools


def _presets_create(*, version: TemplateVersion, spec: TemplateSpec) -> None:
    presets = []
    schedules = []
    for preset_spec in spec.presets:
        prebuilds = preset_spec.prebuilds
        preset = TemplateVersionPreset(
            template_version=version,
            name=preset_spec.name,
            parameters=dict(preset_spec.parameters),
            desired_instances=prebuilds.instances if prebuilds else None,
            # 0 and "absent" both disable the TTL; store one representation of it.
            invalidate_after=(
                timedelta(seconds=prebuilds.ttl_seconds)
                if prebuilds and prebuilds.ttl_seconds
                else None
            ),
            scheduling_timezone=prebuilds.timezone if prebuilds else "",
            target_hit_rate=prebuilds.target_hit_rate if prebuilds else None,
            min_instances=(prebuilds.min_instances or 0) if prebuilds else 0,
            max_instances=prebuilds.max_instances if prebuilds else None,
            cost_per_hour=prebuilds.cost_per_hour if prebuilds else None,
        )
        presets.append(preset)
        for position, schedule in enumerate(prebuilds.schedules if prebuilds else ()):
            schedules.append(
                PresetSchedule(
                    preset=preset,
                    position=position,
                    cron=schedule.cron,
                    instances=schedule.instances,
                )
            )
    # Primary keys are client-side UUIDs, so the schedules can refer to the presets before
    # they are inserted and both go in with one INSERT each.
    TemplateVersionPreset.objects.bulk_create(presets)
    PresetSchedule.objects.bulk_create(schedules)
