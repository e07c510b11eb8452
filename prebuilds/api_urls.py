"""Prebuild pool endpoints under /api/v2/ (DESIGN.md §7). Ids are plain strings parsed by the
views, so a malformed id is the same JSON 404 as an unknown one."""

from django.urls import path

from prebuilds import api_views

urlpatterns = [
    path("prebuilds/status", api_views.status, name="api-prebuilds-status"),
    path("prebuilds/settings", api_views.settings_view, name="api-prebuilds-settings"),
    path("prebuilds/presets/<str:preset_id>", api_views.preset_view, name="api-prebuilds-preset"),
]
