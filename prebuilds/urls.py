from django.urls import path

from prebuilds import views

app_name = "prebuilds"

urlpatterns = [
    path("", views.overview, name="overview"),
]
