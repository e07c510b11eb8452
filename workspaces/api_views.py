"""User endpoints of the JSON API for templates, workspaces and builds (DESIGN.md §7).

Every view is a thin caller: validate the body, look rows up through ``selectors`` (which apply
visibility), call one service, answer with a ``serializers`` shape. Workspaces the caller may
not see are answered 404, exactly like unknown ids, so their existence is not revealed.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse

from accounts.api import ApiError, api_view, read_json
from workspaces import listing, selectors, serializers
from workspaces.creation import workspace_request
from workspaces.models import Transition, Workspace
from workspaces.services import WorkspaceError, build_create

NOT_FOUND_WORKSPACE = "No such workspace."


def _check_fields(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(
            400,
            "unknown_fields",
            f"Unknown field(s): {', '.join(unknown)}. Allowed: {', '.join(allowed)}.",
        )


def _string_field(body: dict[str, Any], field: str, *, required: bool = True) -> str | None:
    if field not in body:
        if required:
            raise ApiError(400, "missing_field", f"{field}: this field is required.")
        return None
    value = body[field]
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"{field}: must be a string.")
    return value


def _uuid_field(body: dict[str, Any], field: str) -> str | None:
    value = _string_field(body, field, required=False)
    if value is not None and selectors.parse_uuid(value) is None:
        raise ApiError(400, "invalid_field", f"{field}: not a valid UUID.")
    return value


def _service_error(exc: WorkspaceError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.detail)


def _visible_workspace(request: HttpRequest, workspace_id: str) -> Workspace:
    workspace = selectors.workspace_get_visible(user=request.api_user, workspace_id=workspace_id)
    if workspace is None:
        raise ApiError(404, "not_found", NOT_FOUND_WORKSPACE)
    return workspace


@api_view(("GET",))
def templates(request: HttpRequest) -> JsonResponse:
    """Templates the caller may use, with their versions and presets (fixed query count)."""
    found = selectors.template_list_usable(user=request.api_user)
    return JsonResponse([serializers.template_json(t) for t in found], safe=False)


@api_view(("GET", "POST"))
def workspaces(request: HttpRequest) -> JsonResponse:
    """GET: one page of the caller's workspaces (``workspaces.listing``); POST: create one."""
    if request.method == "POST":
        return _workspace_create(request)
    try:
        query = listing.parse_query(dict(request.GET.lists()))
    except listing.ListingError as exc:
        raise ApiError(400, "invalid_parameter", exc.detail) from None
    page = listing.workspace_page(user=request.api_user, query=query)
    return JsonResponse(
        {
            "workspaces": [serializers.workspace_json(w) for w in page.workspaces],
            "next_cursor": page.next_cursor,
        }
    )


def _workspace_create(request: HttpRequest) -> JsonResponse:
    """Create a workspace from a preset or a template; 201 with the workspace."""
    body = read_json(request)
    _check_fields(body, ("name", "template_version_preset_id", "template_id"))
    name = _string_field(body, "name")
    preset_id = _uuid_field(body, "template_version_preset_id")
    template_id = _uuid_field(body, "template_id")
    if (preset_id is None) == (template_id is None):
        raise ApiError(
            400,
            "invalid_request",
            "Give exactly one of template_version_preset_id and template_id.",
        )
    user = request.api_user
    template = preset = None
    if preset_id is not None:
        # Who may use it is checked by workspace_request (one membership query, not two).
        preset = selectors.preset_get(preset_id=preset_id)
        if preset is None:
            raise ApiError(404, "not_found", "template_version_preset_id: no such preset.")
    else:
        template = selectors.template_get_usable(user=user, template_id=template_id)
        if template is None:
            raise ApiError(404, "not_found", "template_id: no such template.")
    try:
        created = workspace_request(user=user, name=name, template=template, preset=preset)
    except WorkspaceError as exc:
        raise _service_error(exc) from None
    return JsonResponse(serializers.workspace_json(selectors.workspace_loaded(created)), status=201)


@api_view(("GET",))
def workspace(request: HttpRequest, workspace_id: str) -> JsonResponse:
    """One workspace: its owner's or any for staff; everything else is 404."""
    return JsonResponse(serializers.workspace_json(_visible_workspace(request, workspace_id)))


@api_view(("POST",))
def workspace_builds(request: HttpRequest, workspace_id: str) -> JsonResponse:
    """Queue a start, stop or delete build; 201 with the build, 409 while one is in progress."""
    target = _visible_workspace(request, workspace_id)
    body = read_json(request)
    _check_fields(body, ("transition",))
    transition = _string_field(body, "transition")
    if transition not in Transition.values:
        raise ApiError(400, "invalid_transition", "transition: use start, stop or delete.")
    try:
        build = build_create(workspace=target, transition=transition, initiator=request.api_user)
    except WorkspaceError as exc:
        raise _service_error(exc) from None
    return JsonResponse(serializers.build_json(build), status=201)
