"""Operator controls for the prebuild pools (admin, API and commands call these).

Every service is keyword-only, validates its input and raises `PrebuildsError` naming the
field at fault, and writes in one transaction.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID, User
from prebuilds.audit import audit_record
from prebuilds.models import SETTINGS_ID, AuditAction, PrebuildsSettings
from prebuilds.reconciler import PassResult, reconcile
from workspaces.jobs import job_cancel
from workspaces.models import (
    BuildReason,
    JobStatus,
    PrebuildStatus,
    ProvisionerJob,
    TemplateVersionPreset,
    Transition,
)
from workspaces.pool_limits import PoolSizeError, pool_sizes_check, preset_pool_size


class PrebuildsError(ValueError):
    """Refused operator input; `field` names the offending argument."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def _require_preset(preset: Any) -> TemplateVersionPreset:
    if not isinstance(preset, TemplateVersionPreset) or preset.pk is None:
        raise PrebuildsError("preset", "expected a saved template version preset.")
    return preset


@transaction.atomic
def reconciliation_pause(
    *, paused: bool, actor: User | None = None, source: str = "dashboard"
) -> PrebuildsSettings:
    """Pause (True) or resume (False) the reconciler; the next pass obeys it.

    A paused reconciler still computes and reports state; it only stops executing actions.
    With ``actor``, the switch is audited (pause or resume, from ``source``) in the same
    transaction.
    """
    if not isinstance(paused, bool):
        raise PrebuildsError("paused", f"must be true or false (got {paused!r}).")
    with transaction.atomic():
        settings_row, _ = PrebuildsSettings.objects.update_or_create(
            id=SETTINGS_ID, defaults={"reconciliation_paused": paused}
        )
        if actor is not None:
            action = AuditAction.PAUSE if paused else AuditAction.RESUME
            audit_record(user=actor, action=action, source=source)
    return settings_row


@transaction.atomic
def preset_invalidate(*, preset: TemplateVersionPreset) -> TemplateVersionPreset:
    """Mark every current prebuild of the preset as expired: the next pass replaces them.

    Sets `last_invalidated_at` to now; prebuilds created before it are expired (DESIGN.md
    section 4 rule 1).
    """
    preset = _require_preset(preset)
    now = timezone.now()
    TemplateVersionPreset.objects.filter(id=preset.id).update(last_invalidated_at=now)
    preset.last_invalidated_at = now
    return preset


@transaction.atomic
def preset_reset(*, preset: TemplateVersionPreset) -> bool:
    """Clear a hard limit or validation failure so the reconciler tries the preset again.

    Answers False (and changes nothing) when the preset is already healthy. The status change
    time is recorded, and the hard limit only counts builds made after it, so a reset preset
    gets a fresh streak of `PREBUILDS_FAILURE_HARD_LIMIT` attempts.
    """
    preset = _require_preset(preset)
    now = timezone.now()
    changed = (
        TemplateVersionPreset.objects.filter(id=preset.id)
        .exclude(prebuild_status=PrebuildStatus.HEALTHY)
        .update(
            prebuild_status=PrebuildStatus.HEALTHY,
            prebuild_status_reason="",
            prebuild_status_changed_at=now,
        )
    )
    if changed:
        preset.prebuild_status = PrebuildStatus.HEALTHY
        preset.prebuild_status_reason = ""
        preset.prebuild_status_changed_at = now
    return bool(changed)


@transaction.atomic
def preset_cancel_pending(*, preset: TemplateVersionPreset) -> int:
    """Cancel the preset's prebuild start builds that no worker has picked up; answer how many.

    Only jobs still pending are canceled (`job_cancel` is conditional, so a job a worker
    acquires meanwhile is moved to canceling instead and its worker stops at the next
    heartbeat). Claim builds are never touched: they are initiated by the claiming user.
    """
    preset = _require_preset(preset)
    job_ids = list(
        ProvisionerJob.objects.filter(
            status=JobStatus.PENDING,
            build__preset=preset,
            build__transition=Transition.START,
            build__reason=BuildReason.PREBUILD,
            build__initiator_id=SYSTEM_USER_ID,
            build__workspace__owner_id=SYSTEM_USER_ID,
            build__workspace__deleted=False,
        ).values_list("id", flat=True)
    )
    return sum(job_cancel(job_id) is not None for job_id in job_ids)


@transaction.atomic
def preset_set_desired_instances(
    *,
    preset: TemplateVersionPreset,
    instances: int | None,
    actor: User | None = None,
    source: str = "dashboard",
) -> TemplateVersionPreset:
    """Set the pool size of the preset (None: the preset declares no prebuilds).

    The next pass creates or deletes prebuilds to match. Sizes above
    ``PREBUILDS_MAX_INSTANCES_PER_PRESET``, or raising the organization's total above
    ``PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION``, are refused (``workspaces.pool_limits``).
    With ``actor``, the change is audited (``before → after``, from ``source``: the dashboard,
    the admin or the API) in the same transaction; a refusal changes and records nothing.
    """
    preset = _require_preset(preset)
    if instances is not None and (
        not isinstance(instances, int) or isinstance(instances, bool) or instances < 0
    ):
        raise PrebuildsError("instances", f"must be an integer >= 0 or None (got {instances!r}).")
    organization_id, before = (
        TemplateVersionPreset.objects.filter(id=preset.id)
        .values_list("template_version__template__organization_id", "desired_instances")
        .get()
    )
    try:
        pool_sizes_check(
            organization_id=organization_id,
            pools=[preset_pool_size(preset, instances=instances, instances_field="instances")],
            total_field="instances",
        )
    except PoolSizeError as exc:
        detail = "; ".join(m.removeprefix("instances: ") for m in exc.messages)
        raise PrebuildsError("instances", detail) from None
    with transaction.atomic():
        TemplateVersionPreset.objects.filter(id=preset.id).update(desired_instances=instances)
        if actor is not None:
            audit_record(
                user=actor,
                action=AuditAction.SET_DESIRED_INSTANCES,
                preset=preset,
                detail=f"{_instances_text(before)} → {_instances_text(instances)}",
                source=source,
            )
    preset.desired_instances = instances
    return preset


def _instances_text(value: int | None) -> str:
    return "none" if value is None else str(value)


def reconciliation_run_now(*, dry_run: bool = False) -> PassResult:
    """Run one reconciliation pass now (the same pass Celery beat schedules).

    Not wrapped in a transaction on purpose: the pass gives each preset its own transaction
    so that one preset's failure does not undo the others.
    """
    return reconcile(dry_run=dry_run)
