"""Operational state of the prebuild reconciler: the pause switch and per-pass statistics."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from workspaces.models import TemplateVersionPreset

SETTINGS_ID = 1


class PrebuildsSettings(models.Model):
    """A singleton row (id 1) holding the operator's switches for the reconciler.

    The row may be missing (a fresh database, a truncated test database): readers treat a
    missing row as the defaults, and the services create it on first write.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=SETTINGS_ID, editable=False)
    reconciliation_paused = models.BooleanField(
        default=False,
        help_text="A paused reconciler computes and shows state but executes nothing.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "prebuilds settings"
        verbose_name_plural = "prebuilds settings"
        constraints = [
            models.CheckConstraint(condition=Q(id=SETTINGS_ID), name="prebuilds_settings_singleton")
        ]

    def __str__(self) -> str:
        return "paused" if self.reconciliation_paused else "running"


class ReconciliationPass(models.Model):
    """Statistics of one reconciliation pass, kept for about a day (the pass prunes older rows).

    ``preset_counts`` maps a preset id to ``[desired, actual, eligible, unhealthy]`` at the
    pass's ``now`` (passes before issue 12 have the first three); the compact list form keeps a
    1,000-preset pass around 50 kB so a day of passes stays small.
    """

    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    duration_seconds = models.FloatField(default=0)
    lock_acquired = models.BooleanField(default=True)
    paused = models.BooleanField(default=False)
    presets_seen = models.PositiveIntegerField(default=0)
    actions_taken = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    # [{"preset_id": ..., "error": "..."}], at most a few dozen entries.
    error_details = models.JSONField(default=list, blank=True)
    preset_counts = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-started_at"]
        get_latest_by = "started_at"

    def __str__(self) -> str:
        return f"pass at {self.started_at:%Y-%m-%d %H:%M:%S} ({self.duration_seconds:.3f} s)"


class MetricTotal(models.Model):
    """A running total that outlives the rows it summarises: the state of a Prometheus counter.

    Passes are pruned after a day, but a Prometheus histogram's ``_bucket``/``_count``/``_sum``
    must only grow, so each pass that held the lock adds itself here as well (one upsert,
    ``prebuilds.metrics.pass_duration_observe``). Rows are named ``<metric>:<part>``; nothing
    ever deletes them.
    """

    name = models.CharField(max_length=100, primary_key=True)
    value = models.FloatField(default=0)

    def __str__(self) -> str:
        return f"{self.name} = {self.value:g}"


class MissReason(models.TextChoices):
    """Why a claim request found no prebuild (``prebuilds.claims.miss_reason``); stable codes,
    the same in the database, ``/metrics`` (label ``reason``) and the status document."""

    PAUSED = "reconciliation_paused", "Reconciliation paused"
    HARD_LIMITED = "hard_limited", "Hard limited"
    VALIDATION_FAILED = "validation_failed", "Validation failed"
    DECLARES_NONE = "declares_none", "Preset declares none"
    BACKING_OFF = "backing_off", "Backing off after failures"
    STARTING = "starting", "All prebuilds still starting"
    EXPIRED_OR_UNHEALTHY = "expired_or_unhealthy", "Only expired or unhealthy prebuilds left"
    POOL_EMPTY = "pool_empty", "Pool empty"
    # Misses recorded before reasons were (migration 0005).
    UNKNOWN = "unknown", "Unknown (recorded before reasons)"


class PrebuildClaim(models.Model):
    """One request for a workspace of a preset: a claim or a miss, with its ``miss_reason``.

    ``miss_reason`` is empty for a claim and one of ``MissReason`` for a miss (a check
    constraint holds the two together). ``ready_at`` is set when every agent of the claimed
    workspace is ready *for the new owner* (re-initialised after the claim);
    ``ready_at - requested_at`` is the claim-to-ready time.
    """

    id = models.BigAutoField(primary_key=True)
    preset = models.ForeignKey(
        "workspaces.TemplateVersionPreset", on_delete=models.CASCADE, related_name="claims"
    )
    user = models.ForeignKey("accounts.User", on_delete=models.CASCADE, related_name="+")
    workspace = models.ForeignKey(
        "workspaces.Workspace",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="prebuild_claims",
    )
    claimed = models.BooleanField()
    requested_at = models.DateTimeField(default=timezone.now, db_index=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    miss_reason = models.CharField(max_length=32, blank=True, choices=MissReason.choices)

    class Meta:
        ordering = ["-requested_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(claimed=True, miss_reason="")
                | (Q(claimed=False) & Q(miss_reason__in=MissReason.values)),
                name="claim_miss_reason_valid",
            )
        ]
        indexes = [
            models.Index(
                fields=["workspace"], condition=Q(ready_at__isnull=True), name="claim_not_ready"
            )
        ]

    def __str__(self) -> str:
        return f"{'claim' if self.claimed else 'miss'} of {self.preset_id} by {self.user_id}"


class AuditAction(models.TextChoices):
    """What an operator did; one value per operator control."""

    PAUSE = "pause", "Paused reconciliation"
    RESUME = "resume", "Resumed reconciliation"
    RECONCILE = "reconcile", "Ran a reconciliation pass"
    SET_DESIRED_INSTANCES = "set_desired_instances", "Changed desired instances"
    INVALIDATE = "invalidate", "Invalidated prebuilds"
    RESET = "reset", "Reset preset status"
    CANCEL_PENDING = "cancel_pending", "Canceled pending prebuilds"
    DELETE_PREBUILD = "delete_prebuild", "Deleted a prebuild"


class AuditEntry(models.Model):
    """One operator action on the prebuild pools: who, what, on which target, when.

    Append-only (written by `prebuilds.audit.audit_record`, read-only in the admin). The
    username and a human label of the target are copied into the row so an entry still reads
    correctly after the user, preset or workspace is gone (the foreign keys become NULL).
    """

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(
        "accounts.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    username = models.CharField(max_length=150)
    action = models.CharField(max_length=32, choices=AuditAction.choices)
    preset = models.ForeignKey(
        "workspaces.TemplateVersionPreset",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    workspace = models.ForeignKey(
        "workspaces.Workspace", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    target = models.CharField(max_length=300, blank=True)
    detail = models.TextField(blank=True)
    source = models.CharField(max_length=16, default="dashboard")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit entries"
        constraints = [
            models.CheckConstraint(
                condition=Q(action__in=AuditAction.values), name="audit_action_valid"
            )
        ]

    def __str__(self) -> str:
        return f"{self.username} {self.action} {self.target}".strip()


class PrebuildPool(TemplateVersionPreset):
    """A proxy of `TemplateVersionPreset` for the prebuilds admin: the operator controls live
    here, as admin actions, so the workspaces app's own preset admin stays untouched."""

    class Meta:
        proxy = True
        verbose_name = "prebuild pool"
        verbose_name_plural = "prebuild pools"
