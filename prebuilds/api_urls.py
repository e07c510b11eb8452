from django.urls import path

from prebuilds import api_views

urlpatterns = [
    path("prebuilds/status", api_views.status, name="api-prebuilds-status"),
    path("prebuilds/settings", api_views.settings_view, name="api-prebuilds-settings"),
]
