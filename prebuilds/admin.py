"""Admin for the reconciler's operational rows. Writes go through `prebuilds.services`."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from prebuilds.models import PrebuildsSettings, ReconciliationPass
from prebuilds.services import reconciliation_pause, reconciliation_run_now


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
        reconciliation_pause(paused=obj.reconciliation_paused)


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
            self.message_user(request, "Another pass holds the lock.", messages.WARNING)
            return
        self.message_user(
            request,
            f"{result.presets_seen} presets, {result.actions_taken} actions, "
            f"{result.errors} errors.",
        )
