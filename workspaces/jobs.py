"""Provisioner job state machine: ``pending → running → succeeded / failed / canceled``.

Every transition is a conditional ``UPDATE … WHERE status = <expected>`` whose row count says
whether this caller won. That is what makes two workers racing for one job safe: exactly one
``job_acquire`` sees a row count of 1, the other gets ``None`` and walks away. A worker also only
completes a job it still holds (``worker`` matches and the job is running or canceling), so a
job failed by the stale-heartbeat sweep cannot be resurrected by a worker that wakes up late.

Execution (``job_execute``, called by the Celery task ``workspaces.run_provisioner_job``) runs a
provisioner for the job's build while a background thread heartbeats; the completion and its
side effects on the workspace (host queue, agents, deletion) commit in one transaction.

Every failed job records its ``failure_kind`` (``failure_kind_of``): ``template`` when the
template itself failed (provisioner error, failing startup script), ``infrastructure`` when the
machinery did (lost worker, unserved host queue, database or broker error, interrupted worker).
Only template failures count towards a preset's back-off and hard limit.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from uuid import UUID

import kombu.exceptions
import psycopg
import redis.exceptions
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F, QuerySet, Value
from django.db.models.functions import Concat
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from config import outage
from workspaces import provisioners, routing
from workspaces.models import (
    AgentLifecycle,
    BuildReason,
    FailureKind,
    JobStatus,
    Provisioner,
    ProvisionerJob,
    Transition,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.provisioners import AgentSpec, ProvisionAborted, ProvisionError, ProvisionRequest

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "workspaces.run_provisioner_job"
STOP_FAILED_PREBUILD_TASK = "workspaces.stop_failed_prebuild"
# A pending job older than this is re-enqueued by ``jobs_requeue_pending``: its broker message may
# have been lost (broker restart, enqueue during an outage).
REQUEUE_PENDING_AFTER = timedelta(seconds=30)
REQUEUE_BATCH = 1000


def job_enqueue(job_id: UUID, queue: str) -> None:
    """Hand a job to Celery. Never raises: a job whose message is lost stays ``pending`` and is
    re-enqueued by the periodic sweep, so a broker outage delays builds but loses none."""
    from config.celery import app

    try:
        app.send_task(RUN_JOB_TASK, args=[str(job_id)], queue=queue)
    except Exception as exc:  # the broker may be down; the sweep will retry
        outage.broker.failed(exc)  # logged once per interval, not once per job


def job_acquire(job_id: UUID, *, worker: str) -> ProvisionerJob | None:
    """Move a pending job to running for ``worker``; None if someone else got it first."""
    now = timezone.now()
    won = ProvisionerJob.objects.filter(id=job_id, status=JobStatus.PENDING).update(
        status=JobStatus.RUNNING, worker=worker, started_at=now, heartbeat_at=now
    )
    return ProvisionerJob.objects.get(id=job_id) if won else None


def job_heartbeat(job_id: UUID, *, worker: str) -> str | None:
    """Record that ``worker`` is alive on this job; answer the job's status (None: not ours).

    The executor stops its work when the answer is ``canceling`` or None.
    """
    updated = ProvisionerJob.objects.filter(
        id=job_id, worker=worker, status__in=(JobStatus.RUNNING, JobStatus.CANCELING)
    ).update(heartbeat_at=timezone.now())
    if not updated:
        return None
    return ProvisionerJob.objects.values_list("status", flat=True).get(id=job_id)


def job_append_log(job_id: UUID, text: str, *, worker: str | None = None) -> bool:
    """Append to the job's log in the database (one UPDATE, no read-modify-write race).

    With ``worker``, only while that worker still holds the job (running or canceling): output
    of a worker that lost its job (failed by the stale sweep) must not follow the line that says
    the job failed. Returns whether the text was appended.
    """
    if not text:
        return False
    jobs = ProvisionerJob.objects.filter(id=job_id)
    if worker is not None:
        jobs = jobs.filter(worker=worker, status__in=(JobStatus.RUNNING, JobStatus.CANCELING))
    return bool(jobs.update(logs=Concat(F("logs"), Value(text))))


@transaction.atomic
def job_complete(
    job_id: UUID,
    *,
    worker: str,
    succeeded: bool,
    error: str = "",
    failure_kind: str = FailureKind.TEMPLATE,
) -> ProvisionerJob | None:
    """Finish a job ``worker`` holds. A canceling job ends as canceled whatever the outcome;
    a failed one records ``failure_kind``.

    Returns the finished job, or None when the job was no longer ours (failed by the stale
    sweep, or never acquired), in which case nothing changes.

    When the job succeeds, the build's effects on its workspace commit in the same transaction
    (``build_succeeded``): nobody ever sees a succeeded delete of a workspace that is not
    deleted, or a succeeded local start without the host queue that later builds need.
    """
    job = (
        ProvisionerJob.objects.select_for_update()
        .filter(id=job_id, worker=worker, status__in=(JobStatus.RUNNING, JobStatus.CANCELING))
        .first()
    )
    if job is None:
        return None
    now = timezone.now()
    if job.status == JobStatus.CANCELING:
        job.status, job.canceled_at = JobStatus.CANCELED, now
    else:
        job.status = JobStatus.SUCCEEDED if succeeded else JobStatus.FAILED
    job.error = "" if job.status == JobStatus.SUCCEEDED else (error or job.error)
    job.failure_kind = failure_kind if job.status == JobStatus.FAILED else ""
    job.completed_at = now
    job.save(update_fields=["status", "error", "failure_kind", "completed_at", "canceled_at"])
    if job.status == JobStatus.SUCCEEDED:
        build = (
            WorkspaceBuild.objects.select_related("template_version").filter(job_id=job.id).first()
        )
        if build is not None:
            build_succeeded(build)
    return job


def job_cancel(job_id: UUID) -> str | None:
    """Cancel a job: a pending one ends as canceled at once, a running one becomes canceling
    (its worker notices at the next heartbeat). Returns the new status, None if already final."""
    now = timezone.now()
    if ProvisionerJob.objects.filter(id=job_id, status=JobStatus.PENDING).update(
        status=JobStatus.CANCELED, canceled_at=now, completed_at=now, error="Canceled."
    ):
        return JobStatus.CANCELED
    if ProvisionerJob.objects.filter(id=job_id, status=JobStatus.RUNNING).update(
        status=JobStatus.CANCELING
    ):
        return JobStatus.CANCELING
    return None


def _fail_if_still(matching: QuerySet, job_id: UUID, *, error: str, log_line: str) -> bool:
    """Fail job ``job_id`` if it is still in ``matching``, appending ``log_line`` to its log.
    Only the sweeps call it: the failure is the infrastructure's (a worker or host gone).

    The condition is re-checked in the UPDATE itself, so a job that moved on meanwhile (picked
    up, heartbeated, completed) is left alone, and several sweepers never fail one job twice.
    """
    return bool(
        matching.filter(id=job_id).update(
            status=JobStatus.FAILED,
            failure_kind=FailureKind.INFRASTRUCTURE,
            completed_at=timezone.now(),
            error=error,
            logs=Concat(F("logs"), Value(log_line)),
        )
    )


def jobs_fail_stale(*, timeout: timedelta) -> list[UUID]:
    """Fail running/canceling jobs whose heartbeat is older than ``timeout`` (worker died).

    Returns the ids failed. Each job gets a log line saying why and the ``infrastructure``
    failure kind. The processes a lost prebuild start left behind are stopped on their host
    (``prebuild_stop_processes_later``): the worker that started them is gone.
    """
    cutoff = timezone.now() - timeout
    stale = ProvisionerJob.objects.filter(
        status__in=(JobStatus.RUNNING, JobStatus.CANCELING), heartbeat_at__lt=cutoff
    )
    message = (
        f"Worker stopped sending heartbeats for more than {int(timeout.total_seconds())} s; "
        "the job is marked failed.\n"
    )
    failed = []
    for job_id in list(stale.values_list("id", flat=True)):
        if _fail_if_still(
            stale, job_id, error="Worker lost (heartbeat timeout).", log_line=message
        ):
            logger.warning("job_failed_stale job=%s timeout=%s", job_id, timeout)
            failed.append(job_id)
    prebuild_stop_processes_later(failed)
    return failed


def jobs_fail_unserved_host_jobs(*, timeout: timedelta) -> list[UUID]:
    """Fail jobs pending on a worker host's own queue for longer than ``timeout``.

    A local workspace's later builds can only run on the host holding its processes (see
    ``workspaces.routing``). When that host is gone for good, nothing will ever consume its
    queue, and re-enqueueing the job forever would leave the build "pending" with no word of
    why: it fails instead, saying which host never came, so an operator can act. An
    ``infrastructure`` failure: it does not count towards a preset's back-off or hard limit.
    Returns the ids failed.
    """
    cutoff = timezone.now() - timeout
    unserved = ProvisionerJob.objects.filter(
        status=JobStatus.PENDING,
        queue__startswith=routing.HOST_QUEUE_PREFIX,
        created_at__lt=cutoff,
    )
    minutes = timeout.total_seconds() / 60
    failed = []
    for job_id, queue in list(unserved.values_list("id", "queue")[:REQUEUE_BATCH]):
        host = routing.queue_host(queue)
        message = (
            f"No worker on host {host!r} took this job within {minutes:g} minutes. The "
            "workspace's processes live on that host; if it is gone for good, use the admin "
            'action "Forget worker host" on the workspace: its next builds run on any worker.\n'
        )
        if _fail_if_still(
            unserved, job_id, error=f"Worker host {host!r} unavailable.", log_line=message
        ):
            logger.warning("job_failed_host_unavailable job=%s queue=%s", job_id, queue)
            failed.append(job_id)
    return failed


def jobs_requeue_pending(*, older_than: timedelta = REQUEUE_PENDING_AFTER) -> list[UUID]:
    """Re-enqueue pending jobs created more than ``older_than`` ago; return their ids.

    A pending job this old has most likely lost its broker message (broker restart, enqueue
    during an outage), and a lost message must not lose a build. If the message was merely
    waiting behind a busy worker, the job is now delivered twice: harmless, because
    ``job_acquire`` lets exactly one delivery win and the others return at once.
    """
    cutoff = timezone.now() - older_than
    pending = list(
        ProvisionerJob.objects.filter(status=JobStatus.PENDING, created_at__lt=cutoff)
        .order_by("created_at")
        .values_list("id", "queue")[:REQUEUE_BATCH]
    )
    for job_id, queue in pending:
        job_enqueue(job_id, queue)
    if pending:
        logger.info("jobs_requeued count=%d", len(pending))
    return [job_id for job_id, _ in pending]


# --- Failure kinds and the processes of failed prebuilds -----------------------------------

# Exceptions that say the machinery failed, not the template: the database or the broker was
# unreachable or dropped the connection mid-build.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def failure_kind_of(exc: BaseException) -> FailureKind:
    """The kind of failure an exception that ended a build is.

    - ``ProvisionError``: the provisioner said the template failed (a command's non-zero exit,
      a startup script's ``start_error``, agents that never became ready, an agent that could
      not start): ``template``;
    - a database or broker error (``INFRASTRUCTURE_ERRORS``), or the worker being interrupted
      (``SystemExit``/``KeyboardInterrupt`` of a shutting-down worker): ``infrastructure``;
    - anything else is a bug we cannot place: ``template``, the conservative choice, because a
      template failure keeps the back-off and hard limit that stop a build loop.
    """
    if isinstance(exc, ProvisionError):
        return FailureKind.TEMPLATE
    if isinstance(exc, INFRASTRUCTURE_ERRORS) or not isinstance(exc, Exception):
        return FailureKind.INFRASTRUCTURE
    return FailureKind.TEMPLATE


def _is_prebuild_start(build: WorkspaceBuild) -> bool:
    """A reconciler's start build of a prebuild (what back-off and the hard limit count)."""
    return (
        build.reason == BuildReason.PREBUILD
        and build.transition == Transition.START
        and not build.is_claim
    )


def prebuild_stop_processes_later(job_ids: list[UUID]) -> int:
    """Ask the host of each failed prebuild start build among ``job_ids`` to stop what the
    build started (``prebuild_stop_processes``); answer how many were asked.

    The message goes to the workspace's host queue, recorded before any process was started
    (``job_prepare``): only a worker on that host can see the processes. If no worker ever
    serves that queue the message waits there, which is harmless. Never raises: a database or
    broker outage leaves the processes running (logged), as they were before this existed.
    """
    if not job_ids:
        return 0
    from config.celery import app

    try:
        targets = list(_stop_targets(job_ids))
    except Exception:  # the database may be what failed (an interrupted worker's last act)
        logger.exception("prebuild_stop_lookup_failed jobs=%d", len(job_ids))
        return 0
    sent = 0
    for job_id, queue in targets:
        try:
            app.send_task(STOP_FAILED_PREBUILD_TASK, args=[str(job_id)], queue=queue)
            sent += 1
        except Exception:  # the broker may be down; the processes stay, nothing else is hurt
            logger.exception("prebuild_stop_enqueue_failed job=%s queue=%s", job_id, queue)
    return sent


def _stop_targets(job_ids: list[UUID]) -> QuerySet:
    """``(job id, host queue)`` of the failed local prebuild start builds among ``job_ids``."""
    return (
        WorkspaceBuild.objects.filter(
            job_id__in=job_ids,
            job__status=JobStatus.FAILED,
            workspace__owner_id=SYSTEM_USER_ID,
            reason=BuildReason.PREBUILD,
            transition=Transition.START,
            is_claim=False,
            template_version__provisioner=Provisioner.LOCAL,
        )
        .exclude(workspace__host_queue="")
        .values_list("job_id", "workspace__host_queue")
    )


def prebuild_stop_processes(job_id: UUID) -> bool:
    """Stop the local processes of a prebuild whose start build (``job_id``) failed, on this
    host, keeping the workspace, its build log and its directory as evidence; answer whether
    it stopped anything. What it did is appended to the failed build's log.

    Only while that failed build is still the latest of a live prebuild: a workspace that
    moved on (deleted, or built again) belongs to its newer build, which manages its processes.
    """
    build = (
        WorkspaceBuild.objects.select_related("template_version", "workspace")
        .filter(job_id=job_id, job__status=JobStatus.FAILED)
        .first()
    )
    if build is None or not _is_prebuild_start(build):
        return False
    workspace = build.workspace
    latest = (
        WorkspaceBuild.objects.filter(workspace_id=workspace.id)
        .order_by("-build_number")
        .values_list("id", flat=True)
        .first()
    )
    if workspace.deleted or workspace.owner_id != SYSTEM_USER_ID or latest != build.id:
        return False
    lines: list[str] = []
    provisioner = provisioners.provisioner_for(
        build.template_version.provisioner, data_dir=settings.DATA_DIR
    )
    provisioner.stop_processes(str(workspace.id), lines.append)
    report = "".join(f"{line}\n" for line in lines)
    job_append_log(job_id, f"stopping the processes of this failed prebuild\n{report}")
    logger.info("prebuild_processes_stopped job=%s workspace=%s", job_id, workspace.id)
    return True


# --- Completion side effects ---------------------------------------------------------------


def build_succeeded(build: WorkspaceBuild) -> None:
    """Apply a succeeded build to its workspace. Runs inside ``job_complete``'s transaction.

    - start of a ``local`` workspace: the workspace records this host's queue, so its later
      builds run where its processes are;
    - claim (a start that keeps the running agents): ``on_claim_build_succeeded``;
    - stop: the current agents are ``off``;
    - delete: the workspace is deleted and its agents retired (their tokens stop working).
    """
    from workspaces.services import agents_retire  # services imports this module

    now = timezone.now()
    workspace_id = build.workspace_id
    if build.transition == Transition.START:
        if build.template_version.provisioner == Provisioner.LOCAL:
            Workspace.objects.filter(id=workspace_id).update(
                host_queue=routing.host_queue(), updated_at=now
            )
        if build.is_claim:
            on_claim_build_succeeded(build)
    elif build.transition == Transition.STOP:
        _agents_off(workspace_id, now)
    elif build.transition == Transition.DELETE:
        _agents_off(workspace_id, now)
        Workspace.objects.filter(id=workspace_id).update(deleted=True, updated_at=now)
        agents_retire(workspace=Workspace(id=workspace_id))


def on_claim_build_succeeded(build: WorkspaceBuild) -> None:
    """A claim build succeeded; called inside its completion transaction.

    The agents keep running and must re-initialise for the new owner. The notification is
    queued in this transaction, so it is delivered exactly when the claim build commits as
    succeeded, and never for a claim build that failed or rolled back (DESIGN.md §6).
    """
    from workspaces.reinit import notify_reinit

    owner_id = Workspace.objects.values_list("owner_id", flat=True).get(id=build.workspace_id)
    notify_reinit(workspace_id=build.workspace_id, owner_id=owner_id)


def _agents_off(workspace_id: UUID, now) -> None:
    WorkspaceAgent.objects.filter(workspace_id=workspace_id, retired_at__isnull=True).exclude(
        lifecycle_state=AgentLifecycle.OFF
    ).update(lifecycle_state=AgentLifecycle.OFF, lifecycle_changed_at=now)


# --- Execution -----------------------------------------------------------------------------


def job_prepare(build: WorkspaceBuild, *, worker: str) -> ProvisionRequest | None:
    """Prepare the provisioner request of a job ``worker`` holds; None if it no longer holds it.

    In one transaction, with the job row locked (race: the stale sweep or a cancel may have
    changed the job since it was acquired; agents are only replaced while we hold it):

    - a non-claim start retires the workspace's current agents and creates one agent per
      ``version.agents`` entry with a fresh token. The plain tokens exist only in the returned
      request (the database keeps hashes). They are committed before the provisioner runs
      because the new agents authenticate as soon as they start;
    - a start of a ``local`` workspace records this host's queue *before* any process is
      started: if this worker dies mid-build, the failed build still points later builds (a
      stop or delete that must find the processes) at the host that may hold them.
    """
    from workspaces.services import agent_create, agents_retire  # services imports this module

    version = build.template_version
    with transaction.atomic():
        held = (
            ProvisionerJob.objects.select_for_update()
            .filter(id=build.job_id, worker=worker, status=JobStatus.RUNNING)
            .exists()
        )
        if not held:
            return None
        # Owner and name as committed now, not as they were when the build row was read.
        workspace = Workspace.objects.select_related("owner").get(id=build.workspace_id)
        if build.transition == Transition.START and not build.is_claim:
            agents_retire(workspace=workspace)
            specs = []
            for entry in version.agents:
                agent, token = agent_create(
                    build=build,
                    name=entry["name"],
                    startup_script=entry.get("startup_script", ""),
                )
                specs.append(AgentSpec(agent.name, agent.startup_script, token))
        else:
            specs = [
                AgentSpec(agent.name, agent.startup_script, None)
                for agent in WorkspaceAgent.objects.filter(
                    workspace=workspace, retired_at__isnull=True
                ).order_by("name")
            ]
        if build.transition == Transition.START and version.provisioner == Provisioner.LOCAL:
            Workspace.objects.filter(id=workspace.id).update(
                host_queue=routing.host_queue(), updated_at=timezone.now()
            )
    owner = workspace.owner
    return ProvisionRequest(
        transition=build.transition,
        is_claim=build.is_claim,
        workspace_id=str(workspace.id),
        workspace_name=workspace.name,
        owner_id=str(owner.id),
        owner_username=owner.username,
        is_prebuild=owner.is_system,
        access_url=settings.ACCESS_URL,
        parameters=dict(build.parameters),
        agents=tuple(specs),
        provisioner_config=dict(version.provisioner_config),
        build_id=str(build.id),
        build_number=build.build_number,
        template_version_id=str(version.id),
    )


def job_execute(job_id: UUID, *, worker: str) -> ProvisionerJob | None:
    """Run one provisioner job to its end; None when this worker did not get (or lost) it.

    Guarantees:

    - **At most one execution.** The job is acquired with a conditional update: of any number of
      deliveries of the same job (duplicate messages, re-enqueues, two workers), exactly one
      runs the provisioner; the others, and any delivery of a running or final job, return None
      at once without touching anything.
    - **Never left running.** Once acquired, every path ends in ``job_complete``: success,
      ``ProvisionError`` (its message in ``error``), any other exception (its type and message
      in ``error``, the traceback's last line in the log), even ``SystemExit`` of a shutting-down
      worker. Only if the database itself is unreachable does the job stay running; its
      heartbeat stops, and the stale sweep fails it. A failure records its kind
      (``failure_kind_of``).
    - **A failed prebuild leaves nothing running.** When a prebuild's start build fails (or is
      canceled, or lost), the processes it started are stopped before the job completes, and
      the build log says so; the workspace, its log and its directory stay as evidence. An
      interrupted worker leaves that to a later worker of its host (the message is queued).
    - **Heartbeats and cancellation.** A background thread records a heartbeat every
      ``PROVISIONER_HEARTBEAT_INTERVAL`` seconds. When the answer is ``canceling`` (a user
      canceled) or None (the job is no longer ours: the sweep failed it), the provisioner is told
      to abort; a canceled job ends canceled, a lost one is left as the sweep made it.
    - **Live log.** Provisioner output reaches the job log in small batches (about four a
      second) while the job runs, and only while this worker still holds the job.
    """
    if job_acquire(job_id, worker=worker) is None:
        logger.info("job_not_acquired job=%s worker=%s (taken or final)", job_id, worker)
        return None
    logger.info("job_started job=%s worker=%s", job_id, worker)
    sink = _LogSink(job_id, worker)
    heartbeat = _Heartbeat(job_id, worker, settings.PROVISIONER_HEARTBEAT_INTERVAL)
    heartbeat.start()
    succeeded, error, kind = False, "", FailureKind.TEMPLATE
    interrupted: BaseException | None = None
    build: WorkspaceBuild | None = None
    provisioner: provisioners.Provisioner | None = None
    try:
        build = WorkspaceBuild.objects.select_related(
            "workspace", "workspace__owner", "template_version"
        ).get(job_id=job_id)
        provisioner = provisioners.provisioner_for(
            build.template_version.provisioner, data_dir=settings.DATA_DIR
        )
        request = job_prepare(build, worker=worker)
        if request is None:
            raise ProvisionError("the job was canceled or lost before it started")
        sink.line(
            f"{build.transition}{' (claim)' if build.is_claim else ''} of workspace "
            f"{request.workspace_name} with the {provisioner.kind} provisioner on {worker}"
        )

        def should_abort() -> bool:
            sink.flush_if_due()  # the provisioner polls this often: a good moment to flush
            return heartbeat.abort.is_set()

        provisioner.apply(request, sink.line, should_abort)
        if build.transition == Transition.START and not build.is_claim:
            _await_agents(build, provisioner, request, sink.line, should_abort)
        succeeded = True
        sink.line(f"{build.transition} succeeded")
    except ProvisionError as exc:
        error, kind = str(exc), failure_kind_of(exc)
        sink.line(f"error: {exc}")
    except Exception as exc:
        logger.exception("job_crashed job=%s worker=%s", job_id, worker)
        error, kind = f"{type(exc).__name__}: {exc}", failure_kind_of(exc)
        sink.line(traceback.format_exception_only(exc)[-1].rstrip())
    except BaseException as exc:  # SystemExit / KeyboardInterrupt of a worker shutting down
        interrupted, kind = exc, failure_kind_of(exc)
        error = f"The worker was interrupted ({type(exc).__name__})."
        sink.line(error)
    finally:
        if not succeeded and interrupted is None:
            # While the heartbeat still runs: the stop may take a few seconds.
            _stop_failed_prebuild(build, provisioner, sink.line)
        heartbeat.stop()
    try:
        _flush_retrying(sink)
        job = _complete_retrying(
            job_id, worker=worker, succeeded=succeeded, error=error, failure_kind=kind
        )
    finally:
        if interrupted is not None:
            prebuild_stop_processes_later([job_id])
            raise interrupted
    if job is None:
        logger.warning("job_lost job=%s worker=%s (failed by the stale sweep?)", job_id, worker)
    else:
        logger.info("job_finished job=%s worker=%s status=%s", job_id, worker, job.status)
    return job


def _stop_failed_prebuild(
    build: WorkspaceBuild | None,
    provisioner: provisioners.Provisioner | None,
    log: Callable[[str], None],
) -> None:
    """Stop what a failed prebuild start build started; never raises (the job must still
    complete). A user's workspace is left as it is: its owner decides what to do with it."""
    if build is None or provisioner is None or not _is_prebuild_start(build):
        return
    if build.workspace.owner_id != SYSTEM_USER_ID:
        return
    try:
        log("stopping the processes of this failed prebuild")
        provisioner.stop_processes(str(build.workspace_id), log)
    except Exception:
        logger.exception("prebuild_stop_failed job=%s build=%s", build.job_id, build.id)


AGENT_POLL_INTERVAL = 0.2


def _await_agents(
    build: WorkspaceBuild,
    provisioner: provisioners.Provisioner,
    request: provisioners.ProvisionRequest,
    log: Callable[[str], None],
    should_abort: Callable[[], bool],
) -> None:
    """Hold a (non-claim) start build until its agents report ``ready``.

    A workspace is usable when its agents are, not when their processes exist: so the build
    succeeds only once every new agent has run its startup script successfully, and fails on
    ``start_error`` (with the tail of the agent's log when the provisioner keeps one) or when
    ``PROVISIONER_AGENT_READY_TIMEOUT`` passes. That is what makes a template whose startup
    script fails count as a failed build for prebuild back-off and the hard limit. Lifecycle
    changes are written to the build log as they happen. A timeout of 0 turns waiting off.
    """
    timeout = settings.PROVISIONER_AGENT_READY_TIMEOUT
    if timeout <= 0 or not request.agents:
        return
    log(f"waiting for {len(request.agents)} agent(s) to run their startup scripts")
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        states = dict(
            WorkspaceAgent.objects.filter(build=build, retired_at__isnull=True).values_list(
                "name", "lifecycle_state"
            )
        )
        for name, state in sorted(states.items()):
            if seen.get(name) != state:
                log(f"agent {name}: {state}")
        seen = states
        failed = sorted(
            name for name, state in states.items() if state == AgentLifecycle.START_ERROR
        )
        if failed:
            for name in failed:
                tail = provisioner.agent_log_tail(request.workspace_id, name)
                if tail:
                    log(f"last lines of agent {name}'s log:")
                    for line in tail.splitlines():
                        log(f"  {line}")
            raise ProvisionError(f"the startup script of agent(s) {', '.join(failed)} failed")
        if states and all(state == AgentLifecycle.READY for state in states.values()):
            return
        if should_abort():
            raise ProvisionAborted("aborted while waiting for the agents")
        if time.monotonic() > deadline:
            waiting = sorted(
                name for name, state in states.items() if state != AgentLifecycle.READY
            )
            raise ProvisionError(
                f"agent(s) {', '.join(waiting)} did not report ready within {timeout:g} s; "
                f"check that they can reach the control plane at {request.access_url}"
            )
        time.sleep(AGENT_POLL_INTERVAL)


def _flush_retrying(sink: _LogSink) -> None:
    # After a database error this thread's connection may be dead (a restarted server, a cut
    # connection): reconnect once rather than let the error escape, which would leave the job
    # running until the stale sweep. The last lines are lost only if the database is still gone.
    try:
        sink.flush()
    except Exception:
        logger.warning("job_log_flush_failed job=%s; reconnecting", sink.job_id)
        connection.close()
        try:
            sink.flush()
        except Exception:
            logger.exception("job_log_flush_failed job=%s; lines lost", sink.job_id)
            connection.close()


def _complete_retrying(
    job_id: UUID,
    *,
    worker: str,
    succeeded: bool,
    error: str,
    failure_kind: str = FailureKind.TEMPLATE,
    attempts: int = 3,
) -> ProvisionerJob | None:
    # A database blip at the very end must not leave the job running until the stale sweep;
    # a few quick retries on a fresh connection cover a restarted server or a dropped socket.
    for attempt in range(1, attempts + 1):
        try:
            return job_complete(
                job_id,
                worker=worker,
                succeeded=succeeded,
                error=error,
                failure_kind=failure_kind,
            )
        except Exception:
            if attempt == attempts:
                raise
            logger.exception("job_complete_failed job=%s attempt=%d; retrying", job_id, attempt)
            connection.close()
            time.sleep(0.5 * attempt)
    return None


class _LogSink:
    """Buffers provisioner output and appends it to the job log in batches.

    Only the executing thread uses it (the provisioner contract), so it needs no lock. The log
    is capped: a runaway command must not fill the database.
    """

    FLUSH_INTERVAL = 0.25
    FLUSH_BYTES = 32 * 1024
    LIMIT = 1024 * 1024

    def __init__(self, job_id: UUID, worker: str) -> None:
        self.job_id, self.worker = job_id, worker
        self.buffer: list[str] = []
        self.buffered = 0
        self.written = 0
        self.truncated = False
        self.last_flush = time.monotonic()

    def line(self, text: str) -> None:
        if self.truncated:
            return
        for part in text.splitlines() or [""]:
            if self.written + self.buffered + len(part) + 1 > self.LIMIT:
                if not self.truncated:
                    self.truncated = True
                    self.buffer.append("[log truncated: further output is not kept]\n")
                break
            self.buffer.append(part + "\n")
            self.buffered += len(part) + 1
        self.flush_if_due()

    def flush_if_due(self) -> None:
        if self.buffer and (
            self.buffered >= self.FLUSH_BYTES
            or time.monotonic() - self.last_flush >= self.FLUSH_INTERVAL
        ):
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            job_append_log(self.job_id, "".join(self.buffer), worker=self.worker)
            self.written += self.buffered
            self.buffer, self.buffered = [], 0
        self.last_flush = time.monotonic()


class _Heartbeat:
    """Records the job's heartbeat from a thread of its own while the provisioner runs.

    Sets ``abort`` when the job is canceling or no longer ours. Keeps beating after that (a
    canceling job must not look dead while the provisioner cleans up). Uses, and closes, its own
    database connection: Django connections are per thread.
    """

    def __init__(self, job_id: UUID, worker: str, interval: float) -> None:
        self.job_id, self.worker, self.interval = job_id, worker, interval
        self.abort = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stopped.wait(self.interval):
                try:
                    status = job_heartbeat(self.job_id, worker=self.worker)
                except Exception:
                    # A database blip: keep trying. If it lasts, the sweep fails the job and the
                    # next successful beat answers None, which aborts the provisioner.
                    logger.exception("job_heartbeat_failed job=%s", self.job_id)
                    connection.close()  # reconnect on the next beat
                    continue
                if status is None or status == JobStatus.CANCELING:
                    if not self.abort.is_set():
                        logger.info("job_abort job=%s status=%s", self.job_id, status)
                    self.abort.set()
        finally:
            connection.close()
