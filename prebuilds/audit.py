"""The operator audit trail: who did what to which pool, and when.

`audit_record` is the one writer of `AuditEntry`; every operator control (dashboard views, admin
actions and the API's writes alike) calls it *after* its service succeeded and inside the same
transaction where the service has one, so an entry exists exactly when the change happened.
Refused input changes nothing and records nothing.
"""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.models import User
from prebuilds.models import AuditAction, AuditEntry
from workspaces.models import TemplateVersionPreset, Workspace

RECENT_ENTRIES = 10


def preset_label(preset: TemplateVersionPreset) -> str:
    """`organization / template / version / preset` (three queries unless already loaded)."""
    version = preset.template_version
    template = version.template
    return f"{template.organization.name} / {template.name} / {version.name} / {preset.name}"


def audit_record(
    *,
    user: User,
    action: AuditAction | str,
    preset: TemplateVersionPreset | None = None,
    workspace: Workspace | None = None,
    target: str = "",
    detail: str = "",
    source: str = "dashboard",
) -> AuditEntry:
    """Append one audit entry and return it.

    Guarantees: the action is one of `AuditAction` (a `ValueError` otherwise, before any
    write); the username and a readable target are copied into the row, so the entry keeps
    its meaning after the user, preset or workspace is deleted. Without an explicit `target`
    it is the preset's label, else the workspace's name, else empty (global actions).
    """
    action = AuditAction(action)
    if not target:
        if preset is not None:
            target = preset_label(preset)
        elif workspace is not None:
            target = workspace.name
    return AuditEntry.objects.create(
        user=user,
        username=user.get_username(),
        action=action,
        preset=preset,
        workspace=workspace,
        target=target[:300],
        detail=detail,
        source=source,
    )


def audit_recent(*, limit: int = RECENT_ENTRIES) -> QuerySet[AuditEntry]:
    """The newest entries, newest first (one query; no related rows are needed to show them)."""
    return AuditEntry.objects.order_by("-created_at", "-id")[:limit]
