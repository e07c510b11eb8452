"""Admin for the reconciler's operational rows. Writes go through `prebuilds.services`.

The operator controls on presets are admin actions of `PrebuildPoolAdmin`, on the
`PrebuildPool` proxy, so the workspaces app's own preset admin stays as it is. Every action
records an `AuditEntry` (source "admin"), which the admin shows read-only.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from prebuilds.audit import audit_record
from prebuilds.models import (
    AuditAction,
    AuditEntry,
    PrebuildPool,
    PrebuildsSettings,
    ReconciliationPass,
)
from prebuilds.services import (
    preset_cancel_pending,
    preset_invalidate,
    preset_reset,
    preset_set_desired_instances,
    reconciliation_pause,
    reconciliation_run_now,
)
from workspaces.admin_forms import PoolAdminForm


@admin.register(PrebuildsSettings)
class PrebuildsSettingsAdmin(admin.ModelAdmin):
    list_display = ("id", "reconciliation_paused", "updated_at")
    fields = ("reconciliation_paused", "updated_at")
    readonly_fields = ("updated_at",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not PrebuildsSettings.objects.exists()

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: PrebuildsSettings, form, change) -> None:
        changed = "reconciliation_paused" in form.changed_data  # audited only when it changed
        reconciliation_pause(
            paused=obj.reconciliation_paused,
            actor=request.user if changed else None,
            source="admin",
        )


@admin.register(ReconciliationPass)
class ReconciliationPassAdmin(admin.ModelAdmin):
    list_display = (
        "started_at",
        "duration_seconds",
        "lock_acquired",
        "paused",
        "presets_seen",
        "actions_taken",
        "errors",
    )
    list_filter = ("lock_acquired", "paused")
    date_hierarchy = "started_at"
    actions = ("run_pass_now",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.action(description="Run a reconciliation pass now (selection ignored)")
    def run_pass_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        result = reconciliation_run_now()
        if not result.lock_acquired:
            audit_record(
                user=request.user,
                action=AuditAction.RECONCILE,
                detail="skipped: another pass holds the lock",
                source="admin",
            )
            self.message_user(request, "Another pass holds the lock.", messages.WARNING)
            return
        detail = (
            f"{result.presets_seen} presets, {result.actions_taken} actions, {result.errors} errors"
        )
        audit_record(user=request.user, action=AuditAction.RECONCILE, detail=detail, source="admin")
        self.message_user(request, f"{detail}.")


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """The audit trail, read-only: entries are written by the controls, never by hand."""

    list_display = ("created_at", "username", "action", "target", "detail", "source")
    list_filter = ("action", "source")
    search_fields = ("username", "target", "detail")
    date_hierarchy = "created_at"
    list_select_related = ()
    readonly_fields = (
        "created_at",
        "user",
        "username",
        "action",
        "preset",
        "workspace",
        "target",
        "detail",
        "source",
    )
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(PrebuildPool)
class PrebuildPoolAdmin(admin.ModelAdmin):
    """Presets as prebuild pools, with the operator controls as admin actions.

    Only `desired_instances` is editable here (through the service, audited); everything else
    is shown for context and changed elsewhere (the template file, the workspaces admin).
    The form refuses sizes above the bounds (``PREBUILDS_MAX_INSTANCES_PER_*``) naming the
    field, before the service (which checks them again) is called.
    """

    form = PoolAdminForm

    list_display = (
        "name",
        "template_version",
        "template_name",
        "desired_instances",
        "prebuild_status",
        "last_invalidated_at",
        "dashboard_link",
    )
    list_filter = ("prebuild_status", "template_version__template__organization")
    list_select_related = ("template_version", "template_version__template")
    search_fields = ("name", "template_version__template__name", "id")
    readonly_fields = (
        "id",
        "template_version",
        "name",
        "parameters",
        "invalidate_after",
        "last_invalidated_at",
        "prebuild_status",
        "prebuild_status_reason",
        "dashboard_link",
    )
    fields = ("desired_instances", *readonly_fields)
    actions = ("invalidate_prebuilds", "reset_status", "cancel_pending_builds")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super().get_queryset(request).select_related("template_version__template__organization")
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.display(description="template", ordering="template_version__template__name")
    def template_name(self, obj: PrebuildPool) -> str:
        return obj.template_version.template.name

    @admin.display(description="dashboard")
    def dashboard_link(self, obj: PrebuildPool) -> str:
        url = reverse("prebuilds:preset", kwargs={"preset_id": obj.id})
        return format_html('<a href="{}">open</a>', url)

    def save_model(self, request: HttpRequest, obj: PrebuildPool, form, change) -> None:
        if "desired_instances" not in form.changed_data:
            return
        preset_set_desired_instances(
            preset=obj, instances=obj.desired_instances, actor=request.user, source="admin"
        )

    @admin.action(description="Invalidate prebuilds of the selected presets")
    def invalidate_prebuilds(self, request: HttpRequest, queryset: QuerySet) -> None:
        with transaction.atomic():
            for preset in queryset:
                preset_invalidate(preset=preset)
                audit_record(
                    user=request.user,
                    action=AuditAction.INVALIDATE,
                    preset=preset,
                    source="admin",
                )
        self.message_user(request, f"{len(queryset)} presets invalidated.")

    @admin.action(description="Reset the selected presets to healthy")
    def reset_status(self, request: HttpRequest, queryset: QuerySet) -> None:
        reset = 0
        with transaction.atomic():
            for preset in queryset:
                before = preset.get_prebuild_status_display()
                if preset_reset(preset=preset):
                    reset += 1
                    audit_record(
                        user=request.user,
                        action=AuditAction.RESET,
                        preset=preset,
                        detail=f"was {before}",
                        source="admin",
                    )
        self.message_user(request, f"{reset} presets reset to healthy.")

    @admin.action(description="Cancel pending prebuild builds of the selected presets")
    def cancel_pending_builds(self, request: HttpRequest, queryset: QuerySet) -> None:
        total = 0
        with transaction.atomic():
            for preset in queryset:
                count = preset_cancel_pending(preset=preset)
                total += count
                audit_record(
                    user=request.user,
                    action=AuditAction.CANCEL_PENDING,
                    preset=preset,
                    detail=f"{count} canceled",
                    source="admin",
                )
        self.message_user(request, f"{total} pending prebuild builds canceled.")
