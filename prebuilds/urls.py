"""Operator pages under /prebuilds/ (staff only). Controls are POST-only."""

from __future__ import annotations

from django.urls import path

from prebuilds import views

app_name = "prebuilds"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("pause", views.pause, name="pause"),
    path("reconcile", views.reconcile_now, name="reconcile"),
    path("presets/<uuid:preset_id>/", views.preset_detail, name="preset"),
    path(
        "presets/<uuid:preset_id>/desired-instances",
        views.preset_desired_instances,
        name="preset-desired-instances",
    ),
    path(
        "presets/<uuid:preset_id>/invalidate",
        views.preset_invalidate_view,
        name="preset-invalidate",
    ),
    path("presets/<uuid:preset_id>/reset", views.preset_reset_view, name="preset-reset"),
    path(
        "presets/<uuid:preset_id>/cancel-pending",
        views.preset_cancel_pending_view,
        name="preset-cancel-pending",
    ),
    path("presets/<uuid:preset_id>/backtest", views.preset_backtest, name="preset-backtest"),
    path(
        "presets/<uuid:preset_id>/confirm/<slug:action>",
        views.preset_confirm,
        name="preset-confirm",
    ),
    path("workspaces/", views.workspaces, name="workspaces"),
    path(
        "workspaces/<uuid:workspace_id>/delete",
        views.prebuild_delete_view,
        name="prebuild-delete",
    ),
    path(
        "workspaces/<uuid:workspace_id>/delete/confirm",
        views.prebuild_delete_confirm,
        name="prebuild-delete-confirm",
    ),
    path("jobs/", views.jobs, name="jobs"),
]
