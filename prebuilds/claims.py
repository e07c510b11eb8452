"""Claiming a prebuilt workspace: the reason prebuilds exist.

``claim_prebuild`` hands one eligible prebuild of a preset to a user in one transaction. The
row lock it takes (``FOR UPDATE … SKIP LOCKED``) is the same lock the reconciler takes before it
queues a delete build, so a prebuild is either claimed or deleted, never both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, models, transaction
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID, User
from config.sql import columns
from config.sql import insert as sql_insert
from prebuilds import eligibility
from prebuilds.models import SETTINGS_ID, MissReason, PrebuildClaim
from prebuilds.reconciliation import Backoff, backoff_until
from workspaces import jobs, selectors
from workspaces.models import (
    BuildReason,
    PrebuildStatus,
    ProvisionerJob,
    TemplateVersionPreset,
    Transition,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.services import (
    WorkspaceConflict,
    build_parameters,
    job_queue,
    workspace_name_validate,
)

M = TypeVar("M", bound=models.Model)

# The database constraint behind "you already have a workspace of that name".
NAME_CONSTRAINT = "workspace_name_unique_live"

# The oldest eligible prebuild of the preset, locked for us. Oldest first because it is the
# one closest to its TTL.
# Eligible: the one rule of ``prebuilds.eligibility`` (claimable: system-owned, running, on the
# active version of a template neither deleted nor deprecated, not expired, every current agent
# ready and connected), for this preset. SKIP LOCKED lets concurrent
# claims each take a different prebuild instead of queueing behind one another; a prebuild
# the reconciler is deleting is locked by it and skipped too.
# Plans: the statement is prepared once per connection and runs on a generic plan, so the
# constants the partial indexes are defined with (the system user, 'ready') are written into
# the text rather than passed: the planner can then match them. A generic plan's row estimates
# are averages (a template's pool counts as "one template's share" of all prebuilds), so the
# planner cannot tell a large pool from a small one: left to itself it judged all 1,100
# prebuilds of a pool and sorted them (10 ms of database CPU per claim once 100 other
# templates had pools of their own), where walking the pool oldest first stops at the first
# eligible one (0.1 ms). So the candidates are a subquery of their own, the template's live
# prebuilds in the order of the ``workspace_prebuild`` index (template, created_at), limited
# to ``window``: a limit the planner can only meet by reading that index in order, and an order
# the outer query keeps (it sorts by the subquery's column), so nothing is sorted and the scan
# stops at the first row it can lock. The claim runs it with ``CANDIDATE_WINDOW`` first and,
# only when that finds nothing (its candidates ineligible, or locked by concurrent claims),
# once more with no limit (``_lock_tries``): the answer is the whole pool's either way.
# Agents are tested through the partial index ``agent_current_not_ready`` and one probe of the
# workspace's current agents for connectivity (``eligibility.agents_claimable``).
ELIGIBLE_PREBUILD_SQL = f"""
SELECT w.id, w.organization_id, w.template_id, w.created_at, w.host_queue, latest.build_number
FROM (
    SELECT c.id, c.created_at
    FROM workspaces_workspace c
    WHERE c.owner_id = '{SYSTEM_USER_ID}'::uuid AND NOT c.deleted AND c.template_id = %(template)s
    ORDER BY c.created_at
    LIMIT %(window)s
) candidate
JOIN workspaces_workspace w ON w.id = candidate.id
{eligibility.LATEST_BUILD_JOINS}WHERE w.template_id = %(template)s
  AND latest.preset_id = %(preset)s
  AND {eligibility.claimable_where()}
ORDER BY candidate.created_at
LIMIT 1
FOR UPDATE OF w SKIP LOCKED
"""

# Candidates judged by the first try: room for the prebuilds concurrent claims hold locked
# (one per claim in flight) and a few older ones of the template's other presets.
CANDIDATE_WINDOW = 32

# The ownership transfer, guarded: it matches nothing unless the locked prebuild still belongs
# to the system user and its latest build is still the one we selected. A fresh statement, so
# it sees any build committed before we took the lock (see ``_lock_and_transfer``).
TRANSFER_SQL = """
UPDATE workspaces_workspace w
   SET owner_id = %(owner)s, name = %(name)s, claimed_at = %(now)s, updated_at = %(now)s
 WHERE w.id = %(workspace)s AND w.owner_id = %(system)s AND NOT w.deleted
   AND (SELECT max(b.build_number) FROM workspaces_workspacebuild b
         WHERE b.workspace_id = w.id) = %(latest)s
"""

# The claimed workspace's current agents, with what the answer shows of them. The other fields
# are deferred on the loaded agents (read on access, as with ``.only()``), so a later ``save()``
# writes back only what was read.
AGENT_FIELDS = ("id", "workspace", "name", "lifecycle_state", "initialized_owner", "last_seen_at")
AGENTS = columns(
    WorkspaceAgent,
    tuple(f.name for f in WorkspaceAgent._meta.concrete_fields if f.name not in AGENT_FIELDS),
)
CURRENT_AGENTS_SQL = f"""
SELECT {AGENTS.select("a")}
FROM workspaces_workspaceagent a
WHERE a.workspace_id = %s AND a.retired_at IS NULL
ORDER BY a.name, a.id
"""

# A few rounds are plenty: each round's statements see every build committed before them.
LOCK_ATTEMPTS = 3


@dataclass(frozen=True)
class _Locked:
    """What the claim needs of the prebuild it locked (read under the lock: current)."""

    id: UUID
    organization_id: UUID
    template_id: UUID
    created_at: datetime
    host_queue: str
    latest_build_number: int


def _lock_and_transfer(
    cursor: psycopg.Cursor, preset: TemplateVersionPreset, transfer: dict[str, Any]
) -> _Locked | None:
    """Lock one eligible prebuild and give it to the new owner; None when there is none.

    Race: the selecting statement judges builds by its snapshot, taken before it waits for
    nothing (SKIP LOCKED) and locks the row. If the reconciler committed a delete build for
    that workspace in between, FOR UPDATE re-checks the workspace row but not the builds. The
    transfer is therefore a fresh statement guarded by "the latest build is still the one we
    selected"; when it matches nothing we look again — a statement issued now sees that build
    and no longer selects the workspace. Once we hold the lock nobody can add a build (the
    reconciler and ``build_create`` take the same row lock first).
    """
    tries = _lock_tries(preset)
    for _ in range(LOCK_ATTEMPTS):
        for params in tries:  # the window first, the whole pool only when it finds nothing
            cursor.execute(ELIGIBLE_PREBUILD_SQL, params, prepare=True)
            row = cursor.fetchone()
            if row is not None:
                break
        else:
            return None
        locked = _Locked(*row)
        cursor.execute(
            TRANSFER_SQL,
            {**transfer, "workspace": locked.id, "latest": locked.latest_build_number},
            prepare=True,
        )
        if cursor.rowcount == 1:
            return locked
    return None


def _saved(instance: M) -> M:
    """Mark ``instance`` as a row of the database (a later ``save()`` updates, not inserts)."""
    # The alias, not ``connection.alias``: that is a context-local lookup, on the hot path.
    instance._state.adding, instance._state.db = False, DEFAULT_DB_ALIAS
    return instance


def claim_prebuild(user: User, preset: TemplateVersionPreset, name: str) -> Workspace | None:
    """Transfer one eligible prebuild of ``preset`` to ``user`` under ``name``.

    In one transaction: lock the oldest eligible prebuild (skipping ones locked by other claims
    or by the reconciler), set owner, name and ``claimed_at``, insert a ``start`` build marked as a
    claim, initiated by ``user``, with its pending job (enqueued after commit), and record the
    claim (``PrebuildClaim``). Returns the workspace loaded as
    ``workspaces.selectors.workspace_queryset()`` loads it (latest build, current agents), or
    None when no prebuild is eligible (the caller then runs a normal build). Two concurrent
    claims never get the same workspace.

    Raises ``WorkspaceError`` for a bad name and ``WorkspaceConflict`` when ``user`` already has
    a live workspace of that name; in both cases nothing changes and the prebuild stays in the
    pool. Membership checks are the caller's (``workspaces.creation``).

    Cost: the claim is the hot path of the product (users waiting, bursts at the start of a
    working day), so it is three statements and a commit — lock, guarded transfer, one
    statement inserting job, build and claim record and reading the agents — with server-side
    prepared plans, instead of the ORM's two dozen round trips. ``claim_prebuild_async`` is the
    same claim on an async connection (the API's fast path, ``workspaces.fast_claim``).
    """
    workspace_name_validate(name)
    now = timezone.now()
    with transaction.atomic():
        connection.ensure_connection()
        # Server-side prepared statements on Django's connection (same transaction): planning
        # these costs more than running them, and pooled connections keep plans across requests.
        with psycopg.Cursor(connection.connection) as cursor, _name_conflict(name):
            locked = _lock_and_transfer(cursor, preset, _transfer(user, name, now))
            if locked is None:
                return None
            claim = _Claim.of(user, preset, locked, now)
            sql, params = claim.insert_statement()
            cursor.execute(sql, params, prepare=True)
            agents = claim.agents(cursor.fetchall())
        transaction.on_commit(partial(jobs.job_enqueue, claim.job.id, claim.job.queue))
    return claim.workspace(name, agents)


async def claim_prebuild_async(
    conn: psycopg.AsyncConnection, user: User, preset: TemplateVersionPreset, name: str
) -> tuple[Workspace, ProvisionerJob] | None:
    """``claim_prebuild`` on ``conn``, an autocommit async connection outside Django.

    Same statements, guarantees, errors, rows and answer, committed on return; the claim
    build's job is returned too, for the caller to enqueue (there is no ``on_commit`` here).
    The statements go one after another: psycopg's pipeline mode saves round trips but, measured
    here, costs more CPU than it saves (0.86 against 0.50 ms for a transaction of 3 statements).
    """
    workspace_name_validate(name)
    now = timezone.now()
    tries = _lock_tries(preset)
    transfer = _transfer(user, name, now)
    with _name_conflict(name):
        for _ in range(LOCK_ATTEMPTS):
            async with conn.transaction():
                for params in tries:  # as in ``_lock_and_transfer``
                    cursor = await conn.execute(ELIGIBLE_PREBUILD_SQL, params, prepare=True)
                    row = await cursor.fetchone()
                    if row is not None:
                        break
                else:
                    return None
                locked = _Locked(*row)
                cursor = await conn.execute(
                    TRANSFER_SQL,
                    {**transfer, "workspace": locked.id, "latest": locked.latest_build_number},
                    prepare=True,
                )
                if cursor.rowcount == 1:
                    claim = _Claim.of(user, preset, locked, now)
                    sql, insert_params = claim.insert_statement()
                    cursor = await conn.execute(sql, insert_params, prepare=True)
                    agents = claim.agents(await cursor.fetchall())
                    claimed = claim.workspace(name, agents), claim.job
                else:
                    # Its latest build changed before we locked it (``_lock_and_transfer``): the
                    # transaction ends with nothing written, and the next statement looks again.
                    claimed = None
            if claimed is not None:
                return claimed
    return None


def _lock_tries(preset: TemplateVersionPreset) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parameters of ``ELIGIBLE_PREBUILD_SQL``: the window of candidates, then all of them."""
    params = {
        "template": preset.template_version.template_id,
        "preset": preset.id,
        **eligibility.params(disconnect_timeout=settings.AGENT_DISCONNECT_TIMEOUT),
    }
    return {**params, "window": CANDIDATE_WINDOW}, {**params, "window": None}  # LIMIT NULL: all


def _transfer(user: User, name: str, now: datetime) -> dict[str, Any]:
    return {"system": SYSTEM_USER_ID, "owner": user.id, "name": name, "now": now}


@contextmanager
def _name_conflict(name: str) -> Iterator[None]:
    """The unique-name violation of the transfer, as the ``WorkspaceConflict`` callers answer."""
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name != NAME_CONSTRAINT:
            raise
        raise WorkspaceConflict(
            "name_taken", f"name: you already have a workspace named {name!r}."
        ) from None


@dataclass(frozen=True)
class _Claim:
    """The rows a claim of ``locked`` writes, and the workspace it answers with."""

    user: User
    preset: TemplateVersionPreset
    locked: _Locked
    now: datetime
    job: ProvisionerJob
    build: WorkspaceBuild
    record: PrebuildClaim

    @classmethod
    def of(
        cls, user: User, preset: TemplateVersionPreset, locked: _Locked, now: datetime
    ) -> _Claim:
        version = preset.template_version
        queue = job_queue(version=version, host_queue=locked.host_queue)
        job = ProvisionerJob(organization_id=locked.organization_id, queue=queue)
        build = WorkspaceBuild(
            workspace_id=locked.id,
            build_number=locked.latest_build_number + 1,
            transition=Transition.START,
            template_version=version,
            preset=preset,
            parameters=build_parameters(version, preset),
            initiator=user,
            reason=BuildReason.CLAIM,
            is_claim=True,
            job=job,
        )
        record = PrebuildClaim(
            preset=preset, user=user, workspace_id=locked.id, claimed=True, requested_at=now
        )
        return cls(user, preset, locked, now, job, build, record)

    def insert_statement(self) -> tuple[str, list[Any]]:
        """One statement inserting job, build and claim record and reading the current agents.

        Data-modifying WITH clauses always run, whether or not the final SELECT reads them.
        """
        parts, params = [], []
        for index, row in enumerate((self.job, self.build, self.record)):
            sql, values = sql_insert(row)
            parts.append(f"insert_{index} AS ({sql})")
            params.extend(values)
        return f"WITH {', '.join(parts)} {CURRENT_AGENTS_SQL}", [*params, self.locked.id]

    def agents(self, rows: list[tuple]) -> list[WorkspaceAgent]:
        """The inserted rows are saved now; ``rows`` (the statement's answer) become agents."""
        for row in (self.job, self.build, self.record):
            _saved(row)
        return [AGENTS.load(values) for values in rows]

    def workspace(self, name: str, agents: list[WorkspaceAgent]) -> Workspace:
        template = self.preset.template_version.template  # loaded with the preset: no query
        workspace = _saved(
            Workspace(
                id=self.locked.id,
                organization=template.organization,
                template=template,
                owner=self.user,
                name=name,
                claimed_at=self.now,
                host_queue=self.locked.host_queue,
                created_at=self.locked.created_at,
                updated_at=self.now,
            )
        )
        setattr(workspace, selectors.LATEST_BUILDS, [self.build])
        setattr(workspace, selectors.CURRENT_AGENTS, agents)
        return workspace


def claim_record(
    *,
    user: User,
    preset: TemplateVersionPreset,
    workspace: Workspace | None,
    miss_reason: str = "",
) -> PrebuildClaim:
    """Record a claim (``workspace`` given) or a miss with its ``miss_reason`` (``MissReason``),
    for metrics and the dashboards.

    ``claim_prebuild`` records its claims itself, in the claim's transaction.
    """
    return PrebuildClaim.objects.create(
        preset=preset,
        user=user,
        workspace=workspace,
        claimed=workspace is not None,
        miss_reason="" if workspace is not None else miss_reason,
    )


# Why the preset had nothing to claim: one statement, run only on a miss (which costs a cold
# build anyway). ``live`` is the preset's live prebuilds as the claim sees them (the template's
# system-owned workspaces whose latest build is of the preset, ``workspace_prebuild`` index),
# each judged by ``prebuilds.eligibility``; ``failures`` are the preset's template failures in
# the back-off look-back (as the reconciler's history query counts them: infrastructure
# failures say nothing about the template); ``pass_desired`` is the pool size the latest pass
# that held the lock wanted (schedules and sizing included), NULL when no pass saw the preset.
MISS_FACTS_SQL = f"""
WITH live AS (
    SELECT (latest.transition = 'start' AND j.status IN ('pending', 'running')) AS building,
           ({eligibility.RUNNING}) AS running,
           NOT ({eligibility.ACTIVE} AND {eligibility.NOT_EXPIRED.format(now="now()")})
               AS expired,
           ({eligibility.agents_claimable("w")}) AS claimable,
           EXISTS (SELECT 1 FROM workspaces_workspaceagent a
                    WHERE a.workspace_id = w.id AND a.retired_at IS NULL
                      AND a.lifecycle_state IN ('created', 'starting')) AS agents_starting
      FROM workspaces_workspace w
      {eligibility.LATEST_BUILD_JOINS}
     WHERE {eligibility.SYSTEM_OWNED} AND w.template_id = %(template)s
       AND latest.preset_id = %(preset)s
)
SELECT COALESCE((SELECT s.reconciliation_paused FROM prebuilds_prebuildssettings s
                  WHERE s.id = %(settings_id)s), false) AS paused,
       (SELECT (r.preset_counts -> %(preset_key)s ->> 0)::int
          FROM prebuilds_reconciliationpass r
         WHERE r.lock_acquired ORDER BY r.started_at DESC LIMIT 1) AS pass_desired,
       (SELECT COUNT(*) FILTER (WHERE building) FROM live) AS building,
       (SELECT COUNT(*) FILTER (WHERE running AND NOT expired AND NOT claimable
                                  AND agents_starting) FROM live) AS agents_starting,
       (SELECT COUNT(*) FILTER (WHERE running AND (expired OR NOT claimable)
                                  AND NOT (NOT expired AND agents_starting)) FROM live)
           AS expired_or_unhealthy,
       f.num_failed, f.last_failed_at
  FROM (SELECT COUNT(*) AS num_failed, MAX(j.completed_at) AS last_failed_at
          FROM workspaces_workspacebuild b
          JOIN workspaces_provisionerjob j ON j.id = b.job_id
         WHERE b.preset_id = %(preset)s AND b.initiator_id = '{SYSTEM_USER_ID}'::uuid
           AND b.reason = 'prebuild' AND b.transition = 'start' AND j.status = 'failed'
           AND j.failure_kind IS DISTINCT FROM 'infrastructure'
           AND j.completed_at >= %(lookback_start)s) f
"""


def miss_reason(preset: TemplateVersionPreset) -> str:
    """Why a request for ``preset`` found no eligible prebuild: a ``MissReason`` code.

    A preset that keeps no pool (``desired_instances`` empty) is ``declares_none`` with no
    query: nothing else could have served it. Otherwise the first that holds, in this order
    (the cause an operator can act on first; a paused reconciler or a limited preset explains
    an empty pool whatever else is true):

    1. ``reconciliation_paused`` — the operator paused the reconciler;
    2. ``hard_limited`` — the preset's last prebuild builds all failed;
    3. ``validation_failed`` — the preset's parameters fail validation;
    4. ``declares_none`` — the pool size the latest pass wanted is 0 (a schedule, sizing, or
       ``desired_instances: 0``), or, before any pass saw the preset, ``desired_instances`` is
       0 with no schedule or goal to say otherwise;
    5. ``backing_off`` — template failures in ``PREBUILDS_BACKOFF_LOOKBACK`` hold creation back
       (the reconciler's rule, ``prebuilds.reconciliation.backoff_until``);
    6. ``starting`` — a prebuild is building, or running with agents still coming up;
    7. ``expired_or_unhealthy`` — the preset has running prebuilds, none claimable: expired
       (TTL, invalidation, a version no longer active) or agents gone or disconnected;
    8. ``pool_empty`` — nothing of the preset is live (or the claimable ones were just taken
       by concurrent claims).

    Cost: one statement (``MISS_FACTS_SQL``), and one more only for ``desired_instances: 0``
    before any pass saw the preset (its schedules); only ever run on a miss.
    """
    if preset.desired_instances is None:
        return MissReason.DECLARES_NONE
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            MISS_FACTS_SQL,
            {
                "template": preset.template_version.template_id,
                "preset": preset.id,
                "preset_key": str(preset.id),
                "settings_id": SETTINGS_ID,
                "lookback_start": now - settings.PREBUILDS_BACKOFF_LOOKBACK,
                **eligibility.params(disconnect_timeout=settings.AGENT_DISCONNECT_TIMEOUT),
            },
        )
        paused, pass_desired, building, agents_starting, left, num_failed, last_failed = (
            cursor.fetchone()
        )
    if paused:
        return MissReason.PAUSED
    if preset.prebuild_status == PrebuildStatus.HARD_LIMITED:
        return MissReason.HARD_LIMITED
    if preset.prebuild_status == PrebuildStatus.VALIDATION_FAILED:
        return MissReason.VALIDATION_FAILED
    if pass_desired == 0 or (
        pass_desired is None
        and preset.desired_instances == 0
        and preset.target_hit_rate is None
        and not preset.schedules.exists()
    ):
        return MissReason.DECLARES_NONE
    until = backoff_until(
        Backoff(num_failed=num_failed, last_build_at=last_failed) if num_failed else None,
        settings.PREBUILDS_BACKOFF_INTERVAL,
    )
    if until is not None and now <= until:
        return MissReason.BACKING_OFF
    if building or agents_starting:
        return MissReason.STARTING
    if left:
        return MissReason.EXPIRED_OR_UNHEALTHY
    return MissReason.POOL_EMPTY


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
