"""The single entry point for "a user asks for a new workspace".

The JSON API (``POST /api/v2/workspaces``) and the "New workspace" page both call
``workspace_request`` and nothing else, so that whatever happens when a user asks for a
workspace — first an attempt to claim a ready prebuild of the preset (DESIGN.md §6), then a
normal first build when the pool is empty — happens the same way for every client.
"""

from __future__ import annotations

from functools import partial

from django.db import transaction

from accounts.models import User
from workspaces import selectors
from workspaces.models import Template, TemplateVersionPreset, Workspace
from workspaces.services import (
    WorkspaceConflict,
    WorkspaceError,
    workspace_create,
    workspace_name_validate,
)


class WorkspaceNotFound(WorkspaceError):
    """The template or preset does not exist or is not visible to the user (answered as 404)."""

    status = 404


@transaction.atomic
def workspace_request(
    *,
    user: User,
    name: str,
    template: Template | None = None,
    preset: TemplateVersionPreset | None = None,
) -> Workspace:
    """Create a workspace for ``user`` from a preset or a template (exactly one of the two).

    Guarantees:

    - the template (given, or the preset's) belongs to an organization ``user`` is a member of
      and is not deleted, else ``WorkspaceNotFound`` (404, worded like an unknown id);
    - a preset must sit on its template's *active* version, else ``WorkspaceConflict``
      (409 ``preset_inactive``): the preset existed, but the template has moved on;
    - name rules and the "name taken" conflict come from ``workspace_create``
      (400 ``invalid_name``, 409 ``name_taken``);
    - a preset that keeps prebuilds is served from its pool when a prebuild is eligible
      (``workspace.claimed_prebuild``), else built cold; every request for a preset is recorded
      as a ``PrebuildClaim`` (a claim, or a miss with its ``prebuilds.claims.miss_reason`` —
      ``declares_none`` for a preset without a pool), and a request for a pool asks for a
      reconciliation pass once the transaction commits (``prebuilds.refill``);
    - one transaction: on any error nothing is written.
    """
    if (template is None) == (preset is None):
        raise WorkspaceError(
            "invalid_request", "Give exactly one of template_id and template_version_preset_id."
        )
    if user.is_system:
        raise WorkspaceError("invalid_owner", "System users cannot request workspaces.")
    if preset is not None:
        template = preset.template_version.template
    assert template is not None
    if template.deleted or not selectors.user_may_use_template(user=user, template=template):
        # Word for word what the API answers for an unknown id: existence is not revealed.
        raise WorkspaceNotFound(
            "not_found",
            "template_version_preset_id: no such preset."
            if preset is not None
            else "template_id: no such template.",
        )
    # Race: an operator may switch the active version between this check and the insert. That
    # is benign — the workspace is built on the version that was active when we read it, and
    # versions are immutable and never removed while builds use them — so no row lock here
    # (it would serialise every request for a popular template).
    if template.active_version_id is None:
        raise WorkspaceConflict("template_unavailable", "template: it has no active version.")
    if preset is not None and preset.template_version_id != template.active_version_id:
        raise WorkspaceConflict(
            "preset_inactive",
            "template_version_preset_id: this preset belongs to version "
            f"{preset.template_version.name!r}, which is no longer the active version of "
            f"template {template.name!r}; pick a preset of the active version.",
        )
    if preset is not None:
        # A request for a preset is a claim request: served from its pool when a prebuild is
        # eligible (DESIGN.md §6), else a miss recorded with its reason (cold build).
        from prebuilds.claims import claim_prebuild, claim_record, miss_reason
        from prebuilds.refill import refill_request

        if preset.desired_instances is not None:
            claimed = claim_prebuild(user, preset, name)  # records the claim itself
            # Claim or miss, the pool is short now: refill it as soon as this commits (never
            # before: a pass reading the snapshot earlier would not see the claim).
            reason = "claim" if claimed is not None else "miss"
            transaction.on_commit(partial(refill_request, reason=reason, preset_id=preset.id))
            if claimed is not None:
                return claimed
        else:
            # No pool to claim from; validate the name first so a refused request records
            # nothing (``claim_prebuild`` does the same).
            workspace_name_validate(name)
        claim_record(user=user, preset=preset, workspace=None, miss_reason=miss_reason(preset))
    return workspace_create(owner=user, template=template, name=name, preset=preset)
