"""Operational state of the prebuild reconciler: the pause switch and per-pass statistics."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

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

    ``preset_counts`` maps a preset id to ``[desired, actual, eligible]`` at the pass's ``now``;
    the compact list form keeps a 1,000-preset pass around 50 kB so a day of passes stays small.
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


class PrebuildClaim(models.Model):
    """One request for a workspace of a preset that keeps prebuilds: a claim or a miss.

    ``ready_at`` is set when every agent of the claimed workspace is ready *for the new owner*
    (re-initialised after the claim); ``ready_at - requested_at`` is the claim-to-ready time.
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

    class Meta:
        ordering = ["-requested_at"]
        indexes = [
            models.Index(
                fields=["workspace"], condition=Q(ready_at__isnull=True), name="claim_not_ready"
            )
        ]

    def __str__(self) -> str:
        return f"{'claim' if self.claimed else 'miss'} of {self.preset_id} by {self.user_id}"
