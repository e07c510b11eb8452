"""JSON API of the prebuild pools (DESIGN.md section 7), staff only."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from accounts.api import ApiError, api_view, read_json
from prebuilds.reconciler import status_document
from prebuilds.selectors import reconciliation_paused
from prebuilds.services import PrebuildsError, reconciliation_pause

SETTINGS_FIELDS = frozenset({"reconciliation_paused"})


@api_view(("GET",), staff=True)
def status(request: HttpRequest) -> JsonResponse:
    """The document of `reconcile_prebuilds --dry-run --json`: what a pass would do now."""
    return JsonResponse(status_document())


@api_view(("GET", "PUT"), staff=True)
def settings_view(request: HttpRequest) -> JsonResponse:
    """`{"reconciliation_paused": bool}`; PUT takes exactly that object."""
    if request.method == "PUT":
        body = read_json(request)
        unknown = sorted(set(body) - SETTINGS_FIELDS)
        if unknown:
            raise ApiError(400, "invalid_field", f"Unknown field(s): {', '.join(unknown)}.")
        if "reconciliation_paused" not in body:
            raise ApiError(400, "invalid_field", "reconciliation_paused: this field is required.")
        try:
            reconciliation_pause(paused=body["reconciliation_paused"])
        except PrebuildsError as exc:
            raise ApiError(400, "invalid_field", f"reconciliation_paused: {exc.detail}") from None
    return JsonResponse({"reconciliation_paused": reconciliation_paused()})
