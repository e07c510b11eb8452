"""The reconciler: snapshot → pure `calculate_actions` → execute, one preset at a time.

One pass (`reconcile`):

1. takes the reconciliation advisory lock, or returns at once with `lock_acquired=False`
   (a refill, `prebuilds.refill`, waits for it instead);
2. reads the snapshot (`prebuilds.selectors`, a fixed number of queries);
3. decides each preset's status (validation, hard limit), state and actions with the pure core;
4. unless paused or dry-run: cuts creations to the in-flight caps (`prebuilds.pacing`), makes
   the system user a member of every organization involved, then executes each preset's
   actions in its own transaction, so one preset's failure is logged and counted and the
   others still converge;
5. records a `ReconciliationPass` and prunes passes older than a day.

The lock. A session-level `pg_try_advisory_lock` held on a *dedicated* connection for the
whole pass, rather than `pg_try_advisory_xact_lock` in an outer transaction: an outer
transaction would turn every per-preset transaction into a savepoint, so nothing (new
prebuilds, delete builds, their Celery messages, which wait for commit) would become visible
until the whole pass ended, and the row locks taken for deletions would block claims for the
entire pass. The dedicated connection keeps the lock independent of the default connection's
life (Django may close and reopen that one under `CONN_MAX_AGE`/health checks, which would
silently drop a session lock); if the process dies, PostgreSQL drops the connection and with it
the lock.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal, TypedDict
from uuid import UUID

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections, transaction
from django.utils import timezone

from accounts.models import Membership, Role, User
from accounts.services import system_user
from prebuilds.metrics import pass_duration_observe
from prebuilds.models import MissReason, ReconciliationPass
from prebuilds.pacing import Demand, allowed_creations
from prebuilds.reconciliation import (
    ActionType,
    ReconciliationActions,
    ReconciliationState,
    calculate_actions,
    calculate_state,
    validate_schedules,
)
from prebuilds.selectors import PresetEntry, reconciliation_snapshot
from workspaces.jobs import job_cancel
from workspaces.models import (
    BuildReason,
    PrebuildStatus,
    TemplateVersionPreset,
    Transition,
    Workspace,
)
from workspaces.services import WorkspaceConflict, build_create, workspace_create

logger = logging.getLogger(__name__)

# Any fixed 64-bit key works as long as nothing else in the database uses it; this one is
# the first 8 bytes of sha256("warmstart.prebuilds.reconcile") as a signed integer.
RECONCILIATION_LOCK_KEY = 5681282424664768749
PASS_RETENTION = timedelta(hours=24)
MAX_ERROR_DETAILS = 50
PREBUILD_NAME_PREFIX = "prebuild-"


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PresetResult:
    """One preset's outcome in a pass: effective status, diagnostics, decided actions."""

    entry: PresetEntry
    status: str
    status_reason: str
    state: ReconciliationState
    actions: tuple[ReconciliationActions, ...]
    error: str | None = None


@dataclass(frozen=True)
class PassResult:
    """Statistics of one pass. `presets` is empty when the lock was not acquired."""

    started_at: datetime
    duration_seconds: float
    lock_acquired: bool
    paused: bool
    dry_run: bool
    presets: tuple[PresetResult, ...] = ()
    actions_taken: int = 0  # workspaces created + delete builds inserted + jobs canceled
    errors: int = 0
    error_details: tuple[dict[str, str], ...] = field(default_factory=tuple)

    @property
    def presets_seen(self) -> int:
        return len(self.presets)


class StateDocument(TypedDict):
    actual: int
    desired: int
    eligible: int
    expired: int
    extraneous: int
    starting: int
    stopping: int
    deleting: int
    unhealthy: int  # an extra count (DESIGN.md §7): running prebuilds whose agents are gone


class FailuresDocument(TypedDict):
    template: int
    infrastructure: int


class LastFailureDocument(TypedDict):
    kind: Literal["template", "infrastructure"]
    error: str
    at: str


class SizingDocument(TypedDict):
    policy: Literal["target", "fallback"]
    desired: int
    reason: str


class PresetDocument(TypedDict):
    preset_id: str
    template_id: str
    template_version_id: str
    preset: str
    template: str
    template_version: str
    organization: str
    active: bool
    status: Literal["healthy", "hard_limited", "validation_failed"]
    state: StateDocument
    actions: list[dict[str, object]]
    # Added to DESIGN.md §8's keys: failed prebuild start builds in the back-off look-back
    # window by kind (only `template` ones count towards back-off and the hard limit), and
    # the newest failure whatever its age (null: none).
    failures: FailuresDocument
    last_failure: LastFailureDocument | None
    # Added (issue 17): how a pool sized by a goal got its desired size (null: not sized by a
    # goal). `policy` is "target" (from recorded demand) or "fallback" (history too short).
    sizing: SizingDocument | None
    # Added (issue 17): claim requests of the last `CLAIMS_WINDOW`, hits and misses by reason.
    claims: ClaimsDocument


class ClaimsDocument(TypedDict):
    window_seconds: int
    hits: int
    misses: dict[str, int]  # every `MissReason` code, 0 when none


class PassDocument(TypedDict):
    paused: bool
    lock_acquired: bool
    presets: list[PresetDocument]


# ---------------------------------------------------------------------------------------------
# The pass


@contextmanager
def reconciliation_lock(*, wait: float = 0) -> Iterator[bool]:
    """Take the reconciliation advisory lock on a dedicated connection; yield whether we hold it.

    Never waits unless ``wait`` (seconds) is given, and then at most that long (PostgreSQL's
    ``lock_timeout``). The lock is released (and the connection closed) when the block exits,
    whatever happens inside it.
    """
    lock_connection = connections.create_connection(DEFAULT_DB_ALIAS)
    try:
        with lock_connection.cursor() as cursor:
            if wait > 0:
                acquired = _wait_for_lock(cursor, wait)
            else:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", [RECONCILIATION_LOCK_KEY])
                acquired = bool(cursor.fetchone()[0])
        try:
            yield acquired
        finally:
            if acquired:
                with lock_connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [RECONCILIATION_LOCK_KEY])
    finally:
        lock_connection.close()


def reconciliation_lock_held() -> bool:
    """Whether a session holds the reconciliation lock right now. Never takes it.

    Reads `pg_locks` (one query): a dry run used to probe by taking and releasing the lock, and
    a real pass that tried in that instant skipped, so a dashboard being looked at could make
    passes skip (and two dashboards probing at once told each other "a pass is running").
    """
    key = RECONCILIATION_LOCK_KEY & 0xFFFF_FFFF_FFFF_FFFF  # a bigint key: classid, objid halves
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1)",
            [key >> 32, key & 0xFFFF_FFFF],
        )
        return bool(cursor.fetchone()[0])


def _wait_for_lock(cursor, wait: float) -> bool:
    # Session-level settings on this dedicated connection only (it is closed after the pass).
    cursor.execute("SELECT set_config('lock_timeout', %s, false)", [f"{int(wait * 1000)}ms"])
    try:
        cursor.execute("SELECT pg_advisory_lock(%s)", [RECONCILIATION_LOCK_KEY])
    except OperationalError as exc:
        if not isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
            raise
        return False  # the wait ran out
    return True


def reconcile(
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    preset_ids: Collection[UUID] | None = None,
    wait: float = 0,
    on_locked: Callable[[], object] | None = None,
) -> PassResult:
    """Run one reconciliation pass and return its statistics.

    Guarantees: at most one non-dry-run pass executes at a time in the whole deployment (the
    advisory lock); a pass that cannot take the lock writes nothing but its pass record and
    returns `lock_acquired=False` at once (or after waiting up to ``wait`` seconds for it). A
    paused pass computes and reports everything and writes nothing but its pass record. A dry
    run writes nothing at all and never takes the lock (it executes nothing; `lock_acquired`
    says whether a pass could take it now), and computes the presets either way; `preset_ids`
    limits a dry run to those presets (a pool's page), with the same decisions the whole dry
    run makes for them.

    ``on_locked`` runs once the lock is held, before the snapshot is read: whatever it marks
    as handled is then seen by this pass (``prebuilds.refill`` clears its request there).
    """
    if preset_ids is not None and not dry_run:
        raise ValueError("only a dry run can look at some presets alone")
    clock = time.monotonic()
    started_at = timezone.now()
    given_now = now is not None
    now = now or started_at
    if dry_run:
        acquired = not reconciliation_lock_held()
        snapshot = reconciliation_snapshot(now=now, preset_ids=preset_ids)
        presets = tuple(_decide(entry, now) for entry in snapshot.presets)
        return PassResult(
            started_at=started_at,
            duration_seconds=time.monotonic() - clock,
            lock_acquired=acquired,
            paused=snapshot.paused,
            dry_run=True,
            presets=presets,
        )

    with reconciliation_lock(wait=wait) as acquired:
        if not acquired:
            logger.info("prebuilds_reconcile_skipped reason=lock_held")
            result = PassResult(
                started_at=started_at,
                duration_seconds=time.monotonic() - clock,
                lock_acquired=False,
                paused=False,
                dry_run=False,
            )
            _record(result, now)
            return result
        if wait > 0:
            # The lock may have come after a wait: the pass starts, and judges the pools, now.
            clock, started_at = time.monotonic(), timezone.now()
            now = now if given_now else started_at
        if on_locked is not None:
            on_locked()
        result = _locked_pass(started_at, now, clock)
    _record(result, now)
    logger.info(
        "prebuilds_reconcile_pass presets=%d actions=%d errors=%d paused=%s duration_ms=%.1f",
        result.presets_seen,
        result.actions_taken,
        result.errors,
        result.paused,
        result.duration_seconds * 1000,
    )
    return result


def _locked_pass(started_at: datetime, now: datetime, clock: float) -> PassResult:
    snapshot = reconciliation_snapshot(now=now)
    decided = [_decide(entry, now) for entry in snapshot.presets]
    if snapshot.paused:
        return PassResult(
            started_at=started_at,
            duration_seconds=time.monotonic() - clock,
            lock_acquired=True,
            paused=True,
            dry_run=False,
            presets=tuple(decided),
        )
    decided = _paced(decided)
    owner = system_user()
    _memberships_ensure(owner, {result.entry.organization_id for result in decided})
    executed: list[PresetResult] = []
    taken = 0
    errors: list[dict[str, str]] = []
    for result in decided:
        try:
            _persist_status(result, now)
            taken += _execute(result, owner)
            executed.append(result)
        except Exception as exc:  # one preset's failure must not stop the others
            logger.exception(
                "prebuilds_preset_failed preset=%s preset_id=%s template=%s",
                result.entry.name,
                result.entry.id,
                result.entry.template,
            )
            message = f"{type(exc).__name__}: {exc}"
            errors.append({"preset_id": str(result.entry.id), "error": message[:500]})
            executed.append(replace(result, error=message))
    return PassResult(
        started_at=started_at,
        duration_seconds=time.monotonic() - clock,
        lock_acquired=True,
        paused=False,
        dry_run=False,
        presets=tuple(executed),
        actions_taken=taken,
        errors=len(errors),
        error_details=tuple(errors),
    )


# ---------------------------------------------------------------------------------------------
# Deciding


def preset_validation_problem(entry: PresetEntry) -> str | None:
    """Why the preset cannot be prebuilt, or None: unknown parameters or unusable schedules."""
    unknown = sorted(set(entry.parameters) - entry.version_parameter_names)
    if unknown:
        return f"parameters not declared by the template version: {', '.join(unknown)}"
    problem = validate_schedules(entry.snapshot.timezone, entry.declared_schedules)
    return f"schedules: {problem}" if problem else None


def _decide(entry: PresetEntry, now: datetime) -> PresetResult:
    """Effective status, state and actions for one preset (pure apart from the settings)."""
    status, reason = entry.status, entry.status_reason
    # Only healthy presets that declare prebuilds on an active version are judged; a stored
    # validation failure or hard limit stays until an operator resets it (or a new version
    # brings new presets), so a broken preset is not re-validated or retried every pass.
    judged = entry.active and entry.snapshot.desired_instances is not None
    if judged and status == PrebuildStatus.HEALTHY:
        problem = preset_validation_problem(entry)
        if problem is not None:
            status, reason = PrebuildStatus.VALIDATION_FAILED, problem
        elif entry.failure_streak:
            # Template failures only (the snapshot leaves infrastructure failures out of the
            # streak and the back-off): a prebuild lost to a dead worker or a database outage
            # is not running, so this pass simply creates its replacement. That cannot spin:
            # replacements count as `starting` while they build (README "Reliability").
            limit = settings.PREBUILDS_FAILURE_HARD_LIMIT
            status = PrebuildStatus.HARD_LIMITED
            reason = f"the last {limit} prebuild builds failed (template failures)"
    snapshot = replace(entry.snapshot, hard_limited=status == PrebuildStatus.HARD_LIMITED)
    state = calculate_state(snapshot, now)
    if status == PrebuildStatus.VALIDATION_FAILED and entry.active:
        # Skipped entirely. An inactive one is still cleaned up: deleting needs no parameters.
        actions: list[ReconciliationActions] = []
    else:
        actions = calculate_actions(snapshot, now, settings.PREBUILDS_BACKOFF_INTERVAL)
    return PresetResult(
        entry=entry, status=status, status_reason=reason, state=state, actions=tuple(actions)
    )


def _paced(decided: list[PresetResult]) -> list[PresetResult]:
    """The decided results with their creations cut to the in-flight caps (``prebuilds.pacing``).

    Deletions and back-offs pass unchanged; a creation cut to nothing is dropped (no action is
    emitted with nothing to do). The rest is created by a later pass.
    """
    demands, in_flight_total = [], 0
    for result in decided:
        state = result.state
        in_flight = state.starting + state.stopping + state.deleting
        in_flight_total += in_flight
        want = sum(a.create for a in result.actions if a.type is ActionType.CREATE)
        supply = state.actual - state.expired + state.starting
        demands.append(Demand(key=result.entry.id, want=want, in_flight=in_flight, supply=supply))
    allowed = allowed_creations(
        demands,
        in_flight_total=in_flight_total,
        limit=settings.PREBUILDS_MAX_IN_FLIGHT,
        per_preset_limit=settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET,
    )
    paced = []
    for result, demand in zip(decided, demands, strict=True):
        count = allowed[demand.key]
        if count < demand.want:
            logger.info(
                "prebuilds_create_paced preset=%s preset_id=%s wanted=%d creating=%d "
                "in_flight=%d in_flight_total=%d",
                result.entry.name,
                result.entry.id,
                demand.want,
                count,
                demand.in_flight,
                in_flight_total,
            )
            actions = tuple(
                replace(action, create=count) if action.type is ActionType.CREATE else action
                for action in result.actions
                if action.type is not ActionType.CREATE or count > 0
            )
            result = replace(result, actions=actions)
        paced.append(result)
    return paced


# ---------------------------------------------------------------------------------------------
# Executing


def _memberships_ensure(owner: User, organization_ids: set[UUID]) -> None:
    """Make the system user a member of these organizations: two queries, whatever the count.

    `ignore_conflicts` covers two passes (or a pass and `system_rows_ensure`) racing to add
    the same membership: the unique (organization, user) constraint keeps one row.
    """
    if not organization_ids:
        return
    existing = set(
        Membership.objects.filter(user=owner, organization_id__in=organization_ids).values_list(
            "organization_id", flat=True
        )
    )
    missing = organization_ids - existing
    if missing:
        Membership.objects.bulk_create(
            [
                Membership(user=owner, organization_id=org_id, role=Role.MEMBER)
                for org_id in missing
            ],
            ignore_conflicts=True,
        )
        logger.info("prebuilds_memberships_added organizations=%d", len(missing))


def _persist_status(result: PresetResult, now: datetime) -> None:
    """Store a newly decided hard limit or validation failure, logging it once.

    Conditional on the stored status still being the one the snapshot read: if an operator
    changed it meanwhile, their change wins and this pass logs nothing.
    """
    entry = result.entry
    if result.status == entry.status:
        return
    changed = TemplateVersionPreset.objects.filter(
        id=entry.id, prebuild_status=entry.status
    ).update(
        prebuild_status=result.status,
        prebuild_status_reason=result.status_reason,
        prebuild_status_changed_at=now,
    )
    if changed:
        logger.warning(
            "prebuilds_preset_status preset=%s preset_id=%s template=%s status=%s reason=%r",
            entry.name,
            entry.id,
            entry.template,
            result.status,
            result.status_reason,
        )


def _execute(result: PresetResult, owner: User) -> int:
    """Execute one preset's actions in one transaction; answer how many things were done."""
    if not result.actions:
        return 0
    taken = 0
    with transaction.atomic():
        for action, reason in zip(result.actions, _action_reasons(result), strict=True):
            _log_action(result, action, reason)
            if action.type is ActionType.CREATE:
                taken += _create(result.entry, action.create, owner)
            elif action.type is ActionType.DELETE:
                taken += sum(
                    prebuild_delete(workspace_id=workspace_id, owner=owner)
                    for workspace_id in action.delete_ids
                )
            elif action.type is ActionType.CANCEL_PENDING:
                # Race: a worker may pick a job up after the snapshot; `job_cancel` is
                # conditional and then moves it to canceling instead. The job ids are of
                # prebuild start builds, never of a claim build, so a workspace claimed since
                # is not affected (its claim build has its own job).
                taken += sum(
                    job_cancel(job_id) is not None for job_id in result.entry.pending_job_ids
                )
            # BACKOFF: nothing to do but the log line above.
    return taken


def _create(entry: PresetEntry, count: int, owner: User) -> int:
    # Race: the template's active version may change after the snapshot; `workspace_create`
    # then refuses the preset (not on the active version) and this preset's transaction rolls
    # back. The next pass sees the preset as inactive.
    preset = TemplateVersionPreset.objects.select_related(
        "template_version__template__active_version"
    ).get(id=entry.id)
    template = preset.template_version.template
    for _ in range(count):
        workspace_create(
            owner=owner,
            template=template,
            name=prebuild_name(),
            preset=preset,
            initiator=owner,
            reason=BuildReason.PREBUILD,
        )
    return count


def prebuild_name() -> str:
    """`prebuild-` and 16 lowercase base32 characters (80 random bits: collisions never happen
    in practice, and the database's unique constraint would refuse one anyway)."""
    return PREBUILD_NAME_PREFIX + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def prebuild_delete(*, workspace_id: UUID, owner: User) -> bool:
    """Insert a delete build for a prebuild if it is still one; answer whether it did.

    Race: a user may claim the prebuild between the snapshot and now. The workspace row is
    locked (`SELECT … FOR UPDATE`) and its owner re-read under the lock, in the same
    transaction as the insert: a claim holding the row makes us wait and then see the new
    owner, and a claim arriving after us skips the locked row (`SKIP LOCKED`) and, once we
    commit, no longer finds it eligible (its latest build is a delete). A claimed workspace is
    never touched. A build started meanwhile by someone else is left alone too.
    """
    with transaction.atomic():
        workspace = (
            Workspace.objects.select_for_update()
            .filter(id=workspace_id, owner_id=owner.id, deleted=False)
            .first()
        )
        if workspace is None:
            logger.info("prebuilds_delete_skipped workspace=%s reason=not_a_prebuild", workspace_id)
            return False
        try:
            build_create(
                workspace=workspace,
                transition=Transition.DELETE,
                initiator=owner,
                reason=BuildReason.PREBUILD,
            )
        except WorkspaceConflict as exc:
            logger.info("prebuilds_delete_skipped workspace=%s reason=%s", workspace_id, exc.code)
            return False
    return True


def _log_action(result: PresetResult, action: ReconciliationActions, reason: str) -> None:
    entry, state = result.entry, result.state
    until = action.backoff_until.isoformat() if action.backoff_until else ""
    detail = {
        ActionType.CREATE: f"count={action.create}",
        ActionType.DELETE: f"count={len(action.delete_ids)}" + _unhealthy_detail(entry, action),
        ActionType.BACKOFF: f"until={until}",
        ActionType.CANCEL_PENDING: f"count={action.cancel_count}",
    }[action.type]
    logger.info(
        "prebuilds_action type=%s %s preset=%s preset_id=%s template=%s version=%s active=%s "
        "desired=%d actual=%d eligible=%d expired=%d extraneous=%d starting=%d stopping=%d "
        "deleting=%d unhealthy=%d reason=%s",
        action.type.value,
        detail,
        entry.name,
        entry.id,
        entry.template,
        entry.template_version,
        entry.active,
        state.desired,
        state.actual,
        state.eligible,
        state.expired,
        state.extraneous,
        state.starting,
        state.stopping,
        state.deleting,
        state.unhealthy,
        reason,
    )


def _unhealthy_detail(entry: PresetEntry, action: ReconciliationActions) -> str:
    """` unhealthy=<workspace>:<why>,…` for a delete of unhealthy prebuilds (what happened)."""
    if action.reason != "unhealthy":
        return ""
    reasons = entry.unhealthy_reasons
    return " unhealthy=" + ",".join(f"{i}:{reasons.get(i, '?')}" for i in action.delete_ids)


def _action_reasons(result: PresetResult) -> list[str]:
    """Why each action was decided, for the log line (the core emits expired deletions first)."""
    reasons = []
    for action in result.actions:
        if not result.entry.active:
            reasons.append("inactive_version")
        elif action.type is ActionType.DELETE:
            reasons.append(action.reason or "extraneous")  # the core says why
        elif action.type is ActionType.BACKOFF:
            backoff = result.entry.snapshot.backoff
            reasons.append(f"recent_failures_{backoff.num_failed if backoff else 0}")
        else:
            reasons.append("below_desired")
    return reasons


def _record(result: PassResult, now: datetime) -> None:
    """Store the pass's statistics and prune passes older than `PASS_RETENTION`.

    A pass that held the lock is also added to the duration histogram's never-pruned totals.
    """
    ReconciliationPass.objects.create(
        started_at=result.started_at,
        duration_seconds=result.duration_seconds,
        lock_acquired=result.lock_acquired,
        paused=result.paused,
        presets_seen=result.presets_seen,
        actions_taken=result.actions_taken,
        errors=result.errors,
        error_details=list(result.error_details[:MAX_ERROR_DETAILS]),
        preset_counts={
            str(p.entry.id): [p.state.desired, p.state.actual, p.state.eligible, p.state.unhealthy]
            for p in result.presets
        },
    )
    if result.lock_acquired:
        pass_duration_observe(result.duration_seconds)
    ReconciliationPass.objects.filter(started_at__lt=now - PASS_RETENTION).delete()


# ---------------------------------------------------------------------------------------------
# The JSON document (DESIGN.md section 8): `reconcile_prebuilds --json` and the status API


# The claim requests the status document counts per preset: recent enough to say what users
# meet now, long enough to hold more than a handful.
CLAIMS_WINDOW = timedelta(hours=1)

# Claim requests per preset and miss reason ('' for hits) in the window: one query per
# document, on the claims' requested_at index.
_CLAIM_COUNTS_SQL = """
SELECT c.preset_id, c.miss_reason, COUNT(*)
  FROM prebuilds_prebuildclaim c
 WHERE c.requested_at >= %(since)s AND c.preset_id = ANY(%(preset_ids)s::uuid[])
 GROUP BY c.preset_id, c.miss_reason
"""


def pass_document(result: PassResult) -> PassDocument:
    """The contract's JSON document for a pass (one query: the presets' recent claims)."""
    claims = _claim_counts([preset.entry.id for preset in result.presets])
    return {
        "paused": result.paused,
        "lock_acquired": result.lock_acquired,
        "presets": [
            _preset_document(preset, claims.get(preset.entry.id)) for preset in result.presets
        ],
    }


def _claim_counts(preset_ids: list[UUID]) -> dict[UUID, ClaimsDocument]:
    counts: dict[UUID, ClaimsDocument] = {}
    if not preset_ids:
        return counts
    with connection.cursor() as cursor:
        cursor.execute(
            _CLAIM_COUNTS_SQL,
            {"since": timezone.now() - CLAIMS_WINDOW, "preset_ids": preset_ids},
        )
        for preset_id, reason, count in cursor.fetchall():
            document = counts.setdefault(preset_id, _claims_document())
            if reason:
                document["misses"][reason] = document["misses"].get(reason, 0) + count
            else:
                document["hits"] += count
    return counts


def _claims_document() -> ClaimsDocument:
    return {
        "window_seconds": int(CLAIMS_WINDOW.total_seconds()),
        "hits": 0,
        "misses": dict.fromkeys(MissReason.values, 0),
    }


def _preset_document(result: PresetResult, claims: ClaimsDocument | None) -> PresetDocument:
    entry, state = result.entry, result.state
    return {
        "preset_id": str(entry.id),
        "template_id": str(entry.template_id),
        "template_version_id": str(entry.template_version_id),
        "preset": entry.name,
        "template": entry.template,
        "template_version": entry.template_version,
        "organization": entry.organization,
        "active": entry.active,
        "status": result.status,  # type: ignore[typeddict-item]
        "state": {
            "actual": state.actual,
            "desired": state.desired,
            "eligible": state.eligible,
            "expired": state.expired,
            "extraneous": state.extraneous,
            "starting": state.starting,
            "stopping": state.stopping,
            "deleting": state.deleting,
            "unhealthy": state.unhealthy,
        },
        "actions": [
            {**action_document(action), "reason": reason}
            for action, reason in zip(result.actions, _action_reasons(result), strict=True)
        ],
        "failures": {
            "template": entry.failures.template,
            "infrastructure": entry.failures.infrastructure,
        },
        "last_failure": _last_failure_document(entry),
        "sizing": (
            {
                "policy": entry.sizing.policy,  # type: ignore[typeddict-item]
                "desired": entry.sizing.desired,
                "reason": entry.sizing.reason,
            }
            if entry.sizing is not None
            else None
        ),
        "claims": claims or _claims_document(),
    }


def _last_failure_document(entry: PresetEntry) -> LastFailureDocument | None:
    last = entry.failures.last
    if last is None:
        return None
    return {"kind": last.kind, "error": last.error, "at": last.at.isoformat()}  # type: ignore[typeddict-item]


def action_document(action: ReconciliationActions) -> dict[str, object]:
    if action.type is ActionType.CREATE:
        return {"type": "create", "count": action.create}
    if action.type is ActionType.DELETE:
        return {"type": "delete", "workspace_ids": [str(i) for i in action.delete_ids]}
    if action.type is ActionType.BACKOFF:
        until = action.backoff_until.isoformat() if action.backoff_until else None
        return {"type": "backoff", "until": until}
    return {"type": "cancel_pending", "count": action.cancel_count}


def status_document() -> PassDocument:
    """What the reconciler would do now: the document of a dry-run pass (writes nothing)."""
    return pass_document(reconcile(dry_run=True))
