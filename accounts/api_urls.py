from django.urls import path

from accounts import api_views

urlpatterns = [
    path("users/me", api_views.me, name="api-users-me"),
]
