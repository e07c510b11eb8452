"""URL map. Each app owns its own ``urls.py``; this file only mounts them."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("prebuilds/", include("prebuilds.urls")),
    path("api/v2/", include("accounts.api_urls")),
]
