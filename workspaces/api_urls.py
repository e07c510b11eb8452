"""Workspace endpoints under /api/v2/ (DESIGN.md §7; paths are a fixed contract).

Ids are matched as plain strings and parsed by the views, so a malformed id is a JSON 404 like
any unknown id, not Django's HTML 404.
"""

from django.urls import path

from workspaces import agent_api, api_views

urlpatterns = [
    path("templates", api_views.templates, name="api-templates"),
    path("workspaces", api_views.workspaces, name="api-workspaces"),
    path("workspaces/<str:workspace_id>", api_views.workspace, name="api-workspace"),
    path(
        "workspaces/<str:workspace_id>/builds",
        api_views.workspace_builds,
        name="api-workspace-builds",
    ),
    path("workspaceagents/me/manifest", agent_api.manifest, name="api-agent-manifest"),
    path("workspaceagents/me/lifecycle", agent_api.lifecycle, name="api-agent-lifecycle"),
    path("workspaceagents/me/heartbeat", agent_api.heartbeat, name="api-agent-heartbeat"),
]
