"""URL map. Each app owns its own ``urls.py`` (pages) and ``api_urls.py`` (JSON under /api/v2/)."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("workspaces/", include("workspaces.urls")),
    path("prebuilds/", include("prebuilds.urls")),
    path("api/v2/", include("accounts.api_urls")),
    path("api/v2/", include("workspaces.api_urls")),
    path("api/v2/", include("prebuilds.api_urls")),
]
