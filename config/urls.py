"""URL map. Each app owns its own ``urls.py`` (pages) and ``api_urls.py`` (JSON under /api/v2/)."""

from django.contrib import admin
from django.urls import include, path

from config import openapi
from workspaces import reinit_api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("workspaces/", include("workspaces.urls")),
    path("prebuilds/", include("prebuilds.urls")),
    # Async view: listed here so its route is visible next to the ASGI entry point's concerns.
    path("api/v2/workspaceagents/me/reinit", reinit_api.reinit, name="api-agent-reinit"),
    path("api/v2/openapi.json", openapi.openapi_json, name="api-openapi"),
    path("api/docs/", openapi.docs, name="api-docs"),
    path("api/v2/", include("accounts.api_urls")),
    path("api/v2/", include("workspaces.api_urls")),
    path("api/v2/", include("prebuilds.api_urls")),
    path("", include("prebuilds.metrics")),  # /metrics (Prometheus)
]

# Unknown paths under /api/ answer in the API's JSON error shape; pages keep Django's 404.
handler404 = "accounts.api.not_found"
# A database outage answers 503 (JSON under /api/), whatever raised it (config.outage).
handler500 = "config.outage.server_error"
