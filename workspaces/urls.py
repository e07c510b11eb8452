from django.urls import path

from workspaces import views

app_name = "workspaces"

urlpatterns = [
    path("", views.workspace_list, name="list"),
    path("new", views.workspace_new, name="new"),
    path("<uuid:workspace_id>/", views.workspace_detail, name="detail"),
    path("<uuid:workspace_id>/builds", views.workspace_build, name="build"),
    path("<uuid:workspace_id>/delete", views.workspace_delete, name="delete"),
]
