"""JSON API of the prebuild pools (DESIGN.md section 7), staff only."""

from __future__ import annotations

import json
from typing import Any, TypedDict

from django.http import HttpRequest, JsonResponse

from accounts.api import ApiError, api_view, read_json
from prebuilds.reconciler import status_document
from prebuilds.selectors import preset_get_for_operator, preset_is_active, reconciliation_paused
from prebuilds.services import PrebuildsError, preset_set_desired_instances, reconciliation_pause
from workspaces.models import TemplateVersionPreset

SETTINGS_FIELDS = frozenset({"reconciliation_paused"})
PRESET_FIELDS = frozenset({"desired_instances"})
NOT_FOUND_PRESET = "No such preset."


class PresetDocument(TypedDict):
    preset_id: str
    preset: str
    template_id: str
    template: str
    template_version_id: str
    organization: str
    active: bool
    desired_instances: int | None
    status: str
    status_reason: str


@api_view(("GET",), staff=True)
def status(request: HttpRequest) -> JsonResponse:
    """The document of `reconcile_prebuilds --dry-run --json`: what a pass would do now."""
    return JsonResponse(status_document())


@api_view(("GET", "PUT"), staff=True)
def settings_view(request: HttpRequest) -> JsonResponse:
    """`{"reconciliation_paused": bool}`; PUT takes exactly that object and is audited."""
    if request.method == "PUT":
        body = read_json(request)
        unknown = sorted(set(body) - SETTINGS_FIELDS)
        if unknown:
            raise ApiError(400, "invalid_field", f"Unknown field(s): {', '.join(unknown)}.")
        if "reconciliation_paused" not in body:
            raise ApiError(400, "invalid_field", "reconciliation_paused: this field is required.")
        paused = body["reconciliation_paused"]
        try:
            # Audited like the dashboard's switch, so a scripted pause is on the record too.
            reconciliation_pause(paused=paused, actor=request.api_user, source="api")
        except PrebuildsError as exc:
            raise ApiError(400, "invalid_field", f"reconciliation_paused: {exc.detail}") from None
    return JsonResponse({"reconciliation_paused": reconciliation_paused()})


def _preset_document(preset: TemplateVersionPreset) -> PresetDocument:
    version = preset.template_version
    template = version.template
    return {
        "preset_id": str(preset.id),
        "preset": preset.name,
        "template_id": str(template.id),
        "template": template.name,
        "template_version_id": str(version.id),
        "organization": template.organization.name,
        "active": preset_is_active(preset),
        "desired_instances": preset.desired_instances,
        "status": preset.prebuild_status,
        "status_reason": preset.prebuild_status_reason,
    }


def _desired_instances(body: dict[str, Any]) -> int:
    """The body's pool size: exactly `{"desired_instances": <integer >= 0>}`, else a 400."""
    unknown = sorted(set(body) - PRESET_FIELDS)
    if unknown:
        raise ApiError(
            400,
            "invalid_field",
            f"Unknown field(s): {', '.join(unknown)}. Allowed: desired_instances.",
        )
    if "desired_instances" not in body:
        raise ApiError(400, "invalid_field", "desired_instances: this field is required.")
    value = body["desired_instances"]
    # JSON has one number type: 14.0 is the integer 14 (JSON Schema says so too, and clients
    # that hold numbers as floats send it). Found by Schemathesis (issue 18).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # JSON true is a Python int: refuse it rather than read it as 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ApiError(
            400,
            "invalid_field",
            f"desired_instances: must be an integer >= 0 (got {_shown(value)}).",
        )
    return value


def _shown(value: Any) -> str:
    """A refused value as JSON spells it, kept short (a body may carry a megabyte of it)."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "…"


@api_view(("GET", "PUT"), staff=True)
def preset_view(request: HttpRequest, preset_id: str) -> JsonResponse:
    """One preset's pool (`PresetDocument`); PUT `{"desired_instances": N}` sets its size.

    Only presets of organizations the operator is a member of exist here: any other id is the
    same 404 as an unknown one. The size goes through `preset_set_desired_instances` (the
    per-preset and per-organization limits, as for the admin and the dashboard) and is audited
    like the dashboard's control, in the same transaction; a refusal changes and records
    nothing.
    """
    preset = preset_get_for_operator(user=request.api_user, preset_id=preset_id)
    if preset is None:
        raise ApiError(404, "not_found", NOT_FOUND_PRESET)
    if request.method == "PUT":
        instances = _desired_instances(read_json(request))
        try:
            preset_set_desired_instances(
                preset=preset, instances=instances, actor=request.api_user, source="api"
            )
        except PrebuildsError as exc:
            raise ApiError(400, "invalid_field", f"desired_instances: {exc.detail}") from None
    return JsonResponse(_preset_document(preset))
