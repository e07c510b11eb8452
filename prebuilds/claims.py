"""Claiming a prebuilt workspace: the reason prebuilds exist.

``claim_prebuild`` hands one eligible prebuild of a preset to a user in one transaction. The
row lock it takes (``FOR UPDATE … SKIP LOCKED``) is the same lock the reconciler takes before it
queues a delete build, so a prebuild is either claimed or deleted, never both.
"""

from __future__ import annotations

from uuid import UUID

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID, User
from prebuilds.models import PrebuildClaim
from workspaces.models import (
    AgentLifecycle,
    BuildReason,
    TemplateVersion,
    TemplateVersionPreset,
    Transition,
    Workspace,
)
from workspaces.services import WorkspaceConflict, build_create, workspace_name_validate

# One eligible prebuild of the preset, locked for us. No ORDER BY, on purpose: any eligible
# prebuild will do, and without a sort the planner stops at the first match instead of
# evaluating the whole pool (1.5 ms instead of 38 ms for a pool of 5,000).
# Eligible (DESIGN.md §1): owned by the system user, not deleted, latest build a succeeded start
# of this preset on the template's active version (template not deleted), every current agent
# ready (at least one), and not expired by invalidation or TTL. SKIP LOCKED lets concurrent
# claims each take a different prebuild instead of queueing behind one another; a prebuild
# the reconciler is deleting is locked by it and skipped too.
ELIGIBLE_PREBUILD_SQL = """
SELECT w.id, latest.template_version_id
FROM workspaces_workspace w
JOIN LATERAL (
    SELECT b.template_version_id, b.preset_id, b.transition, b.job_id
    FROM workspaces_workspacebuild b
    WHERE b.workspace_id = w.id
    ORDER BY b.build_number DESC
    LIMIT 1
) latest ON true
JOIN workspaces_provisionerjob j ON j.id = latest.job_id
JOIN workspaces_template t ON t.id = w.template_id
JOIN workspaces_templateversionpreset p ON p.id = latest.preset_id
WHERE w.owner_id = %(system)s
  AND NOT w.deleted
  -- Redundant with the latest-build test below, but lets the planner start from this preset's
  -- builds instead of every prebuild of every pool (16 ms -> 3 ms beside 10,000 prebuilds).
  AND w.id IN (SELECT workspace_id FROM workspaces_workspacebuild WHERE preset_id = %(preset)s)
  AND latest.preset_id = %(preset)s
  AND latest.transition = 'start'
  AND j.status = 'succeeded'
  AND NOT t.deleted
  AND t.active_version_id = latest.template_version_id
  AND (p.last_invalidated_at IS NULL OR w.created_at >= p.last_invalidated_at)
  AND (p.invalidate_after IS NULL OR p.invalidate_after <= interval '0'
       OR now() - w.created_at <= p.invalidate_after)
  AND EXISTS (
      SELECT 1 FROM workspaces_workspaceagent a
      WHERE a.workspace_id = w.id AND a.retired_at IS NULL
  )
  AND NOT EXISTS (
      SELECT 1 FROM workspaces_workspaceagent a
      WHERE a.workspace_id = w.id AND a.retired_at IS NULL AND a.lifecycle_state <> %(ready)s
  )
LIMIT 1
FOR UPDATE OF w SKIP LOCKED
"""


# Re-checked after the lock: is the latest build still the succeeded start we selected?
LATEST_BUILD_SQL = """
SELECT b.transition, j.status
FROM workspaces_workspacebuild b
JOIN workspaces_provisionerjob j ON j.id = b.job_id
WHERE b.workspace_id = %s
ORDER BY b.build_number DESC
LIMIT 1
"""

# A few rounds are plenty: each round's statement sees every build committed before it.
LOCK_ATTEMPTS = 3


def _lock_eligible_prebuild(preset: TemplateVersionPreset) -> tuple | None:
    """Lock one eligible prebuild; ``(workspace_id, template_version_id)`` or None.

    Race: the selecting statement judges builds by its snapshot, taken before it waits for
    nothing (SKIP LOCKED) and locks the row. If the reconciler committed a delete build for
    that workspace in between, FOR UPDATE re-checks the workspace row but not the builds, so we
    re-read the latest build in a fresh statement and, if it changed, look again — a statement
    issued now sees that build and no longer selects the workspace.
    """
    params = {"system": SYSTEM_USER_ID, "preset": preset.id, "ready": AgentLifecycle.READY}
    connection.ensure_connection()
    # A server-side prepared statement on Django's connection (same transaction): planning this
    # query costs more than running it, and pooled connections keep the plan between requests.
    with psycopg.Cursor(connection.connection) as cursor:
        for _ in range(LOCK_ATTEMPTS):
            cursor.execute(ELIGIBLE_PREBUILD_SQL, params, prepare=True)
            row = cursor.fetchone()
            if row is None:
                return None
            cursor.execute(LATEST_BUILD_SQL, [row[0]], prepare=True)
            if cursor.fetchone() == (Transition.START, "succeeded"):
                return row
    return None


def claim_prebuild(user: User, preset: TemplateVersionPreset, name: str) -> Workspace | None:
    """Transfer one eligible prebuild of ``preset`` to ``user`` under ``name``.

    In one transaction: lock an eligible prebuild (skipping ones locked by other claims or by
    the reconciler), set owner, name and ``claimed_at``, and insert a ``start`` build marked as
    a claim, initiated by ``user``. Returns the workspace, or None when no prebuild is eligible
    (the caller then runs a normal build). Two concurrent claims never get the same workspace.

    Raises ``WorkspaceError`` for a bad name and ``WorkspaceConflict`` when ``user`` already has
    a live workspace of that name; in both cases nothing changes and the prebuild stays in the
    pool. Membership checks are the caller's (``workspaces.creation``).
    """
    workspace_name_validate(name)
    with transaction.atomic():
        row = _lock_eligible_prebuild(preset)
        if row is None:
            return None
        workspace_id, version_id = row
        try:
            with transaction.atomic():
                # The row is locked by us; the owner check only documents the invariant.
                Workspace.objects.filter(id=workspace_id, owner_id=SYSTEM_USER_ID).update(
                    owner=user, name=name, claimed_at=timezone.now()
                )
        except IntegrityError:
            raise WorkspaceConflict(
                "name_taken", f"name: you already have a workspace named {name!r}."
            ) from None
        workspace = Workspace.objects.select_related("owner", "template").get(id=workspace_id)
        build_create(
            workspace=workspace,
            transition=Transition.START,
            initiator=user,
            reason=BuildReason.CLAIM,
            is_claim=True,
            template_version=TemplateVersion.objects.get(id=version_id),
            preset=preset,
        )
        return workspace


def claim_record(
    *, user: User, preset: TemplateVersionPreset, workspace: Workspace | None
) -> PrebuildClaim:
    """Record a claim (``workspace`` given) or a miss, for metrics and the dashboards."""
    return PrebuildClaim.objects.create(
        preset=preset, user=user, workspace=workspace, claimed=workspace is not None
    )


# Every current agent of the claimed workspace is ready and initialised for its owner.
_MARK_READY_SQL = """
UPDATE prebuilds_prebuildclaim c
   SET ready_at = now()
  FROM workspaces_workspace w
 WHERE c.workspace_id = %s AND c.ready_at IS NULL AND w.id = c.workspace_id
   AND NOT EXISTS (
       SELECT 1 FROM workspaces_workspaceagent a
        WHERE a.workspace_id = w.id AND a.retired_at IS NULL
          AND (a.lifecycle_state <> 'ready' OR a.initialized_owner_id IS DISTINCT FROM w.owner_id)
   )
"""


def claims_mark_ready(*, workspace_id: UUID) -> bool:
    """Stamp ``ready_at`` on the workspace's open claim once all its agents re-initialised.

    Called after an agent reports ``ready``; one UPDATE that matches nothing for workspaces
    that were never claimed (partial index on open claims).
    """
    with connection.cursor() as cursor:
        cursor.execute(_MARK_READY_SQL, [workspace_id])
        return cursor.rowcount > 0
