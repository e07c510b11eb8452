"""User pages for workspaces: list, new, detail (with its live status fragment), builds.

Short function views in the healthchecks manner: an access helper that 404s on workspaces the
user may not see, one service call, a redirect. The detail page serves its own fragment to
HTMX (``template#fragment``) and tells HTMX to stop polling once nothing can change by itself.
"""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from workspaces import selectors
from workspaces.creation import workspace_request
from workspaces.forms import WorkspaceNewForm
from workspaces.models import Workspace
from workspaces.services import WorkspaceError, build_create

PAGE_SIZE = 50
# The log pane shows the tail of the job log; a runaway log must not make each poll huge.
LOG_TAIL_CHARS = 64_000
# Which form field a service error belongs to, by error code.
ERROR_FIELDS = {
    "invalid_name": "name",
    "name_taken": "name",
    "invalid_preset": "preset",
    "preset_inactive": "preset",
    "not_found": "template",
    "template_unavailable": "template",
}


def _get_workspace(request: HttpRequest, workspace_id: UUID) -> Workspace:
    """The workspace if the user may see it (owner, or staff), else 404."""
    workspace = selectors.workspace_get_visible(user=request.user, workspace_id=workspace_id)
    if workspace is None:
        raise Http404("No such workspace.")
    return workspace


@login_required
@require_safe
def workspace_list(request: HttpRequest) -> HttpResponse:
    include_prebuilds = request.user.is_staff and request.GET.get("prebuilds") == "1"
    owner = request.GET.get("owner", "").strip() if request.user.is_staff else ""
    queryset = selectors.workspace_list(
        user=request.user, owner_username=owner, include_prebuilds=include_prebuilds
    )
    page = Paginator(queryset, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [(w, selectors.latest_build(w)) for w in page.object_list]
    context = {
        "page": page,
        "rows": rows,
        "owner": owner,
        "include_prebuilds": include_prebuilds,
        "filtered": bool(owner or include_prebuilds),
    }
    return render(request, "workspaces/list.html", context)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def workspace_new(request: HttpRequest) -> HttpResponse:
    form = WorkspaceNewForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        preset = form.cleaned_data["preset"]
        try:
            workspace = workspace_request(
                user=request.user,
                name=form.cleaned_data["name"],
                template=None if preset else form.cleaned_data["template"],
                preset=preset,
            )
        except WorkspaceError as exc:
            field = ERROR_FIELDS.get(exc.code)
            prefix = f"{field}: "
            detail = exc.detail.removeprefix(prefix) if field else exc.detail
            form.add_error(field, detail)
        else:
            messages.success(request, f"Workspace {workspace.name} is being built.")
            return redirect("workspaces:detail", workspace_id=workspace.id)
    return render(request, "workspaces/new.html", {"form": form})


def _status_context(workspace: Workspace) -> dict:
    build = selectors.latest_build(workspace)
    agents = selectors.current_agents(workspace)
    log_tail, log_truncated = (
        selectors.job_log_tail(job_id=build.job_id, chars=LOG_TAIL_CHARS) if build else ("", False)
    )
    return {
        "workspace": workspace,
        "build": build,
        "agents": agents,
        "history": selectors.build_history(workspace=workspace),
        "log_tail": log_tail,
        "log_truncated": log_truncated,
        "settling": selectors.workspace_is_settling(build, agents),
        "busy": build is not None and build.job.is_active,
    }


@login_required
@require_safe
def workspace_detail(request: HttpRequest, workspace_id: UUID) -> HttpResponse:
    """The workspace page; to HTMX, only its ``build-status`` fragment.

    The fragment polls itself every 2 s while the workspace is settling (a build in progress,
    or agents still coming up after a start); the poll that sees it settled is answered with
    status 286 so HTMX swaps in the final state and stops.
    """
    workspace = _get_workspace(request, workspace_id)
    context = _status_context(workspace)
    template_name = "workspaces/detail.html"
    if request.htmx:
        template_name += "#build-status"
        response = render(request, template_name, context)
        if not context["settling"]:
            stop = HttpResponseStopPolling(response.content)
            stop["Content-Type"] = response["Content-Type"]
            return stop
        return response
    return render(request, template_name, context)


@login_required
@require_POST
def workspace_build(request: HttpRequest, workspace_id: UUID) -> HttpResponse:
    """Queue a start, stop or delete build, then back to the workspace page."""
    workspace = _get_workspace(request, workspace_id)
    transition = request.POST.get("transition", "")
    try:
        build = build_create(workspace=workspace, transition=transition, initiator=request.user)
    except WorkspaceError as exc:
        messages.error(request, exc.detail)
    else:
        messages.success(request, f"Build #{build.build_number} ({build.transition}) queued.")
    url = reverse("workspaces:detail", kwargs={"workspace_id": workspace.id})
    if request.htmx:
        return HttpResponseClientRedirect(url)
    return redirect(url)


@login_required
@require_safe
def workspace_delete(request: HttpRequest, workspace_id: UUID) -> HttpResponse:
    """Confirmation page for deleting, for browsers without JavaScript (HTMX uses hx-confirm)."""
    workspace = _get_workspace(request, workspace_id)
    return render(request, "workspaces/delete.html", {"workspace": workspace})
